"""What a gradient hook on every parameter costs a CPU training step, by kind: none, a
plain tensor hook (``register_hook``, what the DDP ranks stamp the last gradient with),
a post-accumulate-grad hook, and one multi-grad hook over all parameters. Each hook does
nothing. Same MLP, data and step as ``ddp_overhead.py`` (forward, backward; 1 torch
thread), blocks of steps rotating through the kinds; median per-step time of each.

    .venv/bin/python benchmarks/grad_hook_cost.py [--steps 100] [--rounds 12]
    .venv/bin/python benchmarks/grad_hook_cost.py --batch 8 --hidden 16 --steps 1000
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

import ddp_overhead as job  # the same model, data and step


def _none(_: object) -> None:
    return None


def block_of(kind: str, data: list[tuple[torch.Tensor, torch.Tensor]]) -> Callable[[int], float]:
    model = job.make_model()
    params = list(model.parameters())
    if kind == "tensor hook":
        for p in params:
            p.register_hook(_none)  # type: ignore[no-untyped-call]
    elif kind == "post-accumulate hook":
        for p in params:
            p.register_post_accumulate_grad_hook(_none)  # type: ignore[no-untyped-call]
    elif kind == "multi-grad hook":
        torch.autograd.graph.register_multi_grad_hook(params, _none, mode="all")

    def block(n: int) -> float:
        t0 = time.perf_counter()
        for i in range(n):
            x, y = data[i % len(data)]
            for p in params:
                p.grad = None
            F.cross_entropy(model(x), y).backward()
        return (time.perf_counter() - t0) / n

    return block


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--batch", type=int, default=job.BATCH)
    ap.add_argument("--hidden", type=int, default=job.HIDDEN)
    args = ap.parse_args()
    job.set_size(args.batch, args.hidden)
    torch.set_num_threads(1)
    data = job.make_data(16)
    kinds = ["none", "tensor hook", "post-accumulate hook", "multi-grad hook"]
    blocks = {k: block_of(k, data) for k in kinds}
    for b in blocks.values():
        b(20)
    times: dict[str, list[float]] = {k: [] for k in kinds}
    for r in range(args.rounds):
        for k in kinds[r % len(kinds) :] + kinds[: r % len(kinds)]:
            times[k].append(blocks[k](args.steps))
    base = statistics.median(times["none"])
    for k in kinds:
        med = statistics.median(times[k])
        print(f"{k:22s} {med * 1e3:.3f} ms/step ({(med - base) * 1e3:+.3f} ms)")


if __name__ == "__main__":
    main()
