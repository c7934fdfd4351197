"""Shared helpers for the Ray engine tests: one local Ray per test module (started the
way a run starts it: loopback only, token authentication on), the single-process
full-batch reference, and checks that no Ray process is left behind."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from typing import Any

import psutil
import pytest
import torch
from torch import nn

ray = pytest.importorskip("ray", reason="the Ray engine tests need adaptive_nb[ray]")

from adaptive_nb.engine.ray_train import RayConnection  # noqa: E402


def local_ray() -> Iterator[RayConnection]:
    """Body of a module-scoped fixture: a local Ray with 2 CPUs, shut down afterwards,
    with every process it started gone."""
    assert not ray.is_initialized(), "a Ray from an earlier test is still connected"
    connection = RayConnection(None, num_cpus=2)
    connection.open()
    ray_procs = [p for p in psutil.Process().children(recursive=True) if p.is_running()]
    try:
        yield connection
    finally:
        connection.close()
        assert not ray.is_initialized()
        left = wait_gone(ray_procs, 30.0)
        assert left == [], f"Ray processes left after ray.shutdown(): {left}"


def wait_gone(procs: list[psutil.Process], timeout: float) -> list[str]:
    """The processes of ``procs`` still running after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        alive = []
        for p in procs:
            try:
                if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                    alive.append(f"{p.pid} {' '.join(p.cmdline())[:80]}")
            except psutil.NoSuchProcess:
                continue
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.2)


def pids_alive(pids: list[int], timeout: float) -> list[int]:
    """The pids still running after ``timeout`` seconds (zombies count as gone)."""
    deadline = time.monotonic() + timeout
    while True:
        alive = []
        for pid in pids:
            try:
                if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                    alive.append(pid)
            except psutil.NoSuchProcess:
                continue
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.2)


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def step(model: Any, batch: Any) -> torch.Tensor:
    x, y = batch
    return nn.functional.cross_entropy(model(x), y)


def job(n_batches: int, batch: int = 10, seed: int = 0) -> tuple[nn.Module, Any, list[Any]]:
    g = torch.Generator().manual_seed(seed)
    data = [
        (torch.randn(batch, 6, generator=g), torch.randint(0, 3, (batch,), generator=g))
        for _ in range(n_batches)
    ]
    torch.manual_seed(seed)
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    return model, opt, data


def reference(n_batches: int, batch: int = 10, seed: int = 0) -> nn.Module:
    """The same job trained in this process on full batches."""
    model, opt, data = job(n_batches, batch, seed)
    for b in data:
        opt.zero_grad()
        step(model, b).backward()
        opt.step()
    return model


def max_diff(a: nn.Module, b: nn.Module) -> float:
    return max(
        (p - q).abs().max().item() for p, q in zip(a.parameters(), b.parameters(), strict=True)
    )


def raylet_pid_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k.startswith("RAY_")}


def slow_rank1_step(model: Any, batch: Any) -> torch.Tensor:
    """``step``, with worker 1 made slower per sample (a slower device of a mixed cluster):
    3 ms per sample of its slice, on top of the compute."""
    import torch.distributed as dist

    x, y = batch
    if dist.is_initialized() and dist.get_rank() == 1:
        time.sleep(0.003 * len(x))
    return nn.functional.cross_entropy(model(x), y)
