"""``python -m adaptive_nb.bench SCENARIO.json [...] [--json | --markdown]``: adaptive vs
static vs oracle on simulated fleets (virtual time, no model compute). Adaptive and static
run the real training loop; the oracle is an exact evaluation (see :mod:`.oracle`)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from typing import Any

from ..errors import UsageError
from ..sim.scenario import load_scenario
from .oracle import METHOD
from .runner import compare

__all__ = ["main"]


def _row(r: dict[str, Any]) -> str:
    a, s, o = r["adaptive"], r["static"], r["oracle"]

    def cell(p: dict[str, Any]) -> str:
        return f"{p['samples_per_s']:.1f}" + (" (failed)" if p["failed"] else "")

    return (
        f"| {r['scenario']} | {cell(a)} | {cell(s)} | {cell(o)} | "
        f"{r['ratio_vs_oracle']:.3f} | {r['ratio_vs_static']:.3f} | {a['oom']} / "
        f"{a['oom_recovered']} | {a['prediction_mape_pct']} |"
    )


HEADER = (
    "| scenario | adaptive samples/s | static samples/s | oracle samples/s | vs oracle | "
    "vs static | OOM / recovered | MAPE % |\n|---|---|---|---|---|---|---|---|"
)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m adaptive_nb.bench",
        description="Simulated-fleet benchmark: adaptive vs static vs oracle (virtual time).",
    )
    ap.add_argument("scenarios", nargs="+", help="scenario JSON file(s)")
    ap.add_argument("--json", action="store_true", help="print one JSON record per scenario")
    ap.add_argument("--markdown", action="store_true", help="print a Markdown table")
    ap.add_argument("--events", action="store_true", help="print the adaptive run's events")
    ap.add_argument("--control-interval", type=float, default=2.0)
    ap.add_argument("--headroom", type=float, default=0.1)
    ap.add_argument(
        "--backward-estimate",
        type=float,
        default=None,
        metavar="FACTOR",
        help="simulate an engine that times forward and estimates backward as FACTOR x "
        "forward (default: the real engine's own method)",
    )
    args = ap.parse_args(argv)
    logger = logging.getLogger("adaptive_nb")
    level = logger.level
    logger.setLevel(logging.ERROR)  # a simulated GPU loss is expected, not news
    try:
        return _run(args)
    finally:
        logger.setLevel(level)


def _run(args: argparse.Namespace) -> int:
    try:
        scenarios = [load_scenario(p) for p in args.scenarios]
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    results = []
    for sc in scenarios:
        r = compare(
            sc,
            control_interval=args.control_interval,
            headroom=args.headroom,
            backward_estimate=args.backward_estimate,
        )
        events = r.pop("_events")
        results.append(r)
        if args.events:
            for e in events:
                print(f"  [{sc.name}] t={e.t:7.2f}s step {e.step:5d} {e.kind}: {e.detail}")
        if not args.markdown:
            a, s, o = r["adaptive"], r["static"], r["oracle"]
            print(
                f"{sc.name} (simulated): adaptive {a['samples_per_s']:.1f} samples/s"
                f"{' FAILED' if a['failed'] else ''}, static {s['samples_per_s']:.1f}"
                f"{' (failed: ' + s['reason'] + ')' if s['failed'] else ''}, oracle "
                f"{o['samples_per_s']:.1f}; vs oracle {r['ratio_vs_oracle']}, vs static "
                f"{r['ratio_vs_static']}; OOM {a['oom']} (recovered {a['oom_recovered']}), "
                f"MAPE {a['prediction_mape_pct']}%"
            )
    if args.markdown:
        print(HEADER)
        for r in results:
            print(_row(r))
        print(
            f"\noracle: {METHOD}. Adaptive and static run the real training loop on the "
            "model-free simulated engine (virtual time)."
        )
    if args.json:
        for r in results:
            print(json.dumps(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
