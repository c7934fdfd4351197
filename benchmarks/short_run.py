"""Overhead on a short run: 40 steps of the 3-layer MLP at batch 512 (≈ 30 ms/step on 2
cores), plain PyTorch vs ``adaptive_nb.train`` with ``policy="adaptive"`` and ``"static"``.

A short run is where probing thread counts cannot pay for itself, so this is the case
that shows whether the default policy stays within 1 % of plain PyTorch. Same method as
``overhead.py`` (rotated rounds, per-round ratios against the plain run of the round,
median and IQR); see its docstring for why the monitor is stopped before plain runs.

    .venv/bin/python benchmarks/short_run.py [--rounds 15] [--json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from overhead import measure, print_result  # a sibling script, not a package

STEPS = 40


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=15, help="rotated rounds (at least 11)")
    ap.add_argument("--json", action="store_true", help="also print the result as JSON")
    args = ap.parse_args(argv)
    if args.rounds < 11:
        ap.error("--rounds must be at least 11: fewer give no usable spread")
    res = measure(STEPS, args.rounds)
    print_result(res)
    if args.json:
        print(json.dumps(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
