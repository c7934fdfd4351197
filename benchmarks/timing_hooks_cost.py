"""Host cost of measuring backward per device: per replica and step, the DataParallel
engine passes the replica's parameter copies through one identity autograd function
(:func:`adaptive_nb.engine.timing.mark_replica_backward_end`) and hooks its outputs
(:func:`~adaptive_nb.engine.timing.mark_backward_start`). This times both, plus the extra
backward work they add, on the CPU for a model with ResNet-50's parameter count
(161 tensors), against a forward+backward of the same replica (median of repeats).

    .venv/bin/python benchmarks/timing_hooks_cost.py

Printed on the 2-core development machine (torch 2.13 CPU; load average ~5.5 from other
jobs, so the figures are noisy: four runs, each the median of 50 steps):

    161 parameter tensors in the replica
    mark_replica_backward_end (median): 0.84 | 1.40 | 1.50 | 1.66 ms
    forward+backward without marks:     13.61 | 18.18 | 13.90 | 18.20 ms
                     with marks:        14.70 | 22.97 | 16.01 | 22.79 ms

So about 1–1.5 ms of host time per replica per step at this parameter count (mostly the
identity function over 161 tensors), on top of ``replicate``'s own per-parameter work; on
a GPU this is launch-side time, overlapped with the device work already queued. It matters
for small, launch-bound steps, not for the large ones DataParallel is meant for.
"""

from __future__ import annotations

import statistics
import time
from collections import OrderedDict
from typing import Any

import torch
from torch import nn

from adaptive_nb.engine.timing import mark_backward_start, mark_replica_backward_end


def many_params(n_layers: int = 80) -> nn.Module:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for _ in range(n_layers):
        layers += [nn.Linear(32, 32), nn.Tanh()]
    layers.append(nn.Linear(32, 4, bias=False))
    return nn.Sequential(*layers)  # 161 parameter tensors


def replica_of(module: Any) -> Any:
    """A replica as ``replicate`` makes it (non-leaf parameter copies), on the CPU."""
    r = module._replicate_for_data_parallel()
    r._former_parameters = OrderedDict()
    for key, p in module._parameters.items():
        view = None if p is None else p.view_as(p)
        setattr(r, key, view)
        if view is not None:
            r._former_parameters[key] = view
    for name, child in module._modules.items():
        r._modules[name] = replica_of(child)
    return r


def main(repeats: int = 50) -> None:
    model = many_params()
    x = torch.randn(64, 32)
    n_params = sum(1 for _ in model.parameters())

    def step(marks: bool) -> tuple[float, float]:
        replica = replica_of(model)
        t0 = time.perf_counter()
        if marks:
            mark_replica_backward_end(replica, lambda: None)
        t1 = time.perf_counter()
        out = replica(x)
        handles = mark_backward_start(out, lambda: None) if marks else []
        out.square().mean().backward()
        for h in handles:
            h.remove()
        return t1 - t0, time.perf_counter() - t0

    for _ in range(5):
        step(True)
        step(False)
    insert, with_marks, without = [], [], []
    for _ in range(repeats):
        a, b = step(True)
        insert.append(a)
        with_marks.append(b)
        without.append(step(False)[1])
    print(f"{n_params} parameter tensors in the replica")
    print(f"mark_replica_backward_end (median): {statistics.median(insert) * 1e3:.2f} ms")
    print(
        f"forward+backward without marks: {statistics.median(without) * 1e3:.2f} ms   "
        f"with marks: {statistics.median(with_marks) * 1e3:.2f} ms"
    )


if __name__ == "__main__":
    main()
