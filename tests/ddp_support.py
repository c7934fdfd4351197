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


def labelled_batches(
    sizes: Sequence[int], seed: int = 1
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Batches of the given sizes: 6 features, 3 classes."""
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, 6, generator=g), torch.randint(0, 3, (n,), generator=g)) for n in sizes]


def accumulation_reference(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    data: Sequence[tuple[torch.Tensor, torch.Tensor]],
    k: int,
    *,
    autocast: bool = False,
) -> list[float]:
    """A plain accumulation loop with cross-entropy: per group of k batches, each batch's
    mean loss times b_i/Σb, backward per batch, one optimizer step (optionally the forward
    under CPU bf16 autocast). Returns each group's mean loss."""
    losses = []
    model.train()
    for start in range(0, len(data), k):
        grp = data[start : start + k]
        total = sum(x.shape[0] for x, _ in grp)
        optimizer.zero_grad(set_to_none=True)
        mean = 0.0
        for x, y in grp:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                loss = torch.nn.functional.cross_entropy(model(x), y)
            (loss * (x.shape[0] / total)).backward()  # type: ignore[no-untyped-call]
            mean += float(loss.detach()) * x.shape[0] / total
        optimizer.step()
        losses.append(mean)
    return losses
