"""Cost of :meth:`AllocationController.observe`, which runs after every training step.

Synthetic step outcomes (per-device times, chunk sizes, peak memory) for 1, 4 and 8
devices; median over repeats of the mean time per call.

    python benchmarks/observe_cost.py [--steps 2000] [--repeats 7]
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import torch

from adaptive_nb.layout import Plan
from adaptive_nb.plan.allocation import AllocationController
from adaptive_nb.step import StepOutcome


class _Engine:
    def __init__(self, n: int) -> None:
        self.n = n
        self.last_batch = 256

    def device_names(self) -> list[str]:
        return [f"GPU {i}" for i in range(self.n)]

    def monitor_keys(self) -> list[int | None]:
        return list(range(self.n))

    def apply_plan(self, plan: Plan) -> None:
        pass


def outcomes(n: int, steps: int, seed: int = 0) -> list[StepOutcome]:
    rng = random.Random(seed)
    out = []
    for _ in range(steps):
        b = {p: 256 // n + rng.randint(-3, 3) for p in range(n)}
        out.append(
            StepOutcome(
                loss=torch.zeros(()),
                samples=256,
                wall_s=0.1 + 0.01 * rng.random(),
                device_time_s={p: 0.05 + 0.0004 * b[p] * (1 + 0.05 * rng.random()) for p in b},
                device_batch=b,
                peak_mem_mb={p: 1000.0 + 10.0 * b[p] for p in b},
            )
        )
    return out


def cost_us(n: int, steps: int, repeats: int) -> float:
    data = outcomes(n, steps)
    times = []
    for _ in range(repeats):
        ctl = AllocationController(_Engine(n))
        t0 = time.perf_counter()
        for o in data:
            ctl.observe(o)
        times.append((time.perf_counter() - t0) / steps * 1e6)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    for n in (1, 4, 8):
        print(f"observe, {n} device(s): {cost_us(n, args.steps, args.repeats):.1f} µs/step")


if __name__ == "__main__":
    main()
