"""Shared helpers for the DDP engine tests: a worker group that is always killed, a
check that no child process is left, and the single-process full-batch reference."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import psutil
import torch
from torch import nn

from adaptive_nb.engine.ddp import WorkerGroup


def live_children() -> list[psutil.Process]:
    """Child processes of this test process that are still running (zombies excluded)."""
    out = []
    for child in psutil.Process().children(recursive=True):
        try:
            if child.status() != psutil.STATUS_ZOMBIE:
                out.append(child)
        except psutil.NoSuchProcess:
            continue
    return out


def worker_children() -> list[psutil.Process]:
    """Running children that are DDP ranks (other helpers' children are not ours)."""
    found = []
    for child in live_children():
        try:
            if any("engine.ddp.worker" in part for part in child.cmdline()):
                found.append(child)
        except psutil.NoSuchProcess:
            continue
    return found


@contextmanager
def group_of(world_size: int, **kwargs: Any) -> Iterator[WorkerGroup]:
    group = WorkerGroup(world_size, threads=1, **kwargs)
    try:
        yield group.start()
    finally:
        group.kill()


def reference_steps(
    step: Callable[[nn.Module, Any], torch.Tensor],
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    batches: Sequence[Any],
) -> tuple[list[dict[str, torch.Tensor]], list[float]]:
    """A plain loop on the full batches: the gradients of every step, and its losses."""
    grads: list[dict[str, torch.Tensor]] = []
    losses: list[float] = []
    model.train()
    for batch in batches:
        optimizer.zero_grad(set_to_none=True)
        loss = step(model, batch)
        loss.backward()  # type: ignore[no-untyped-call]
        grads.append(
            {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
        )
        losses.append(float(loss.detach()))
        optimizer.step()
    return grads, losses
