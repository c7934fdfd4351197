"""What exact retries cost per step: :class:`adaptive_nb.run.rollback.StepRollback` copies a
model's buffers (batch-norm running statistics) before every step, so that a retry after
an out-of-memory starts from them. This measures ``take()`` against a whole training step
of a small batch-norm CNN on the CPU (median of interleaved repeats).

    .venv/bin/python benchmarks/rollback_cost.py

Printed on the 2-core development machine (torch 2.13 CPU, load average ~5-6 from other
jobs, so the step time is inflated), two runs each:

    model: batch-norm CNN, 6 buffers (194 values), batch 32×3×32×32
    walking the modules every step:   take() 118.0 µs | 91.2 µs  (0.04 % | 0.05 % of a step)
    module walk kept between steps:   take()  70.0 µs | 65.4 µs  (0.03 % | 0.04 % of a step)
    training step (median of 60):     177-304 ms across the four runs

The copies themselves are tiny; the module walk is now done once (and every 100 steps).
On a GPU the copies are device-to-device ``copy_`` calls into preallocated tensors (no
allocation after the first step, no synchronisation).
"""

from __future__ import annotations

import statistics
import time

import torch
from torch import nn

from adaptive_nb.run.rollback import StepRollback


def bn_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1),
        nn.BatchNorm2d(32),
        nn.ReLU(),
        nn.Conv2d(32, 64, 3, padding=1, stride=2),
        nn.BatchNorm2d(64),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(64, 10),
    )


def main(repeats: int = 60) -> None:
    model = bn_cnn()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x, y = torch.randn(32, 3, 32, 32), torch.randint(0, 10, (32,))
    rollback = StepRollback(model, opt)

    def train_step() -> None:
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()

    for _ in range(5):
        train_step()
        rollback.take()
    steps: list[float] = []
    takes: list[float] = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        train_step()
        t1 = time.perf_counter()
        rollback.take()
        t2 = time.perf_counter()
        steps.append(t1 - t0)
        takes.append(t2 - t1)
    n_buffers = sum(1 for _ in model.buffers())
    n_values = sum(b.numel() for b in model.buffers())
    step_ms = statistics.median(steps) * 1e3
    take_us = statistics.median(takes) * 1e6
    print(f"model: batch-norm CNN, {n_buffers} buffers ({n_values} values), batch 32×3×32×32")
    print(f"training step (median of {repeats}): {step_ms:.2f} ms")
    print(f"StepRollback.take() (median):       {take_us:.1f} µs")
    print(f"overhead: {100 * take_us / 1e3 / step_ms:.2f} % of a step")


if __name__ == "__main__":
    main()
