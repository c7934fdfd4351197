"""Micro-batching: run one global batch as several smaller ones with gradient
accumulation, so the gradient equals the full batch's.

The step's loss is taken to be a mean over the samples of its batch (PyTorch's default
reduction). Micro-batch ``i`` of ``n_i`` samples then contributes ``loss_i · n_i / B`` to
the backward pass, and the accumulated gradient is the gradient of the full-batch mean.
(Batch-norm statistics are computed per micro-batch, as with any split of the batch.)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from ..batches import batch_size_of, split_nested
from ..layout import micro_batch_sizes
from ..step import StepFn

__all__ = ["run_micro_batches", "split_batch"]


def split_batch(batch: Any, sizes: Sequence[int]) -> list[Any]:
    """Split every tensor in a nested tuple/list/dict/namedtuple along dim 0 into pieces of
    ``sizes``. Tensors whose first dimension is not the batch size, and non-tensors, are
    passed to every piece unchanged."""
    total = int(sum(sizes))
    parts = len(sizes)

    def split_tensor(t: torch.Tensor) -> list[torch.Tensor]:
        if t.dim() > 0 and t.shape[0] == total:
            return list(torch.split(t, list(sizes), dim=0))
        return [t] * parts

    return split_nested(batch, parts, split_tensor)


def run_micro_batches(
    step: StepFn,
    model: nn.Module,
    batch: Any,
    micro_batches: int,
    before_each: Callable[[int, int], None] | None = None,
) -> tuple[torch.Tensor, list[int]]:
    """Forward + backward ``batch`` as ``micro_batches`` pieces, accumulating gradients.

    ``before_each(index, size)`` runs before each piece (engines set the chunk split or
    check simulated memory there). Returns the full-batch loss (detached, the weighted
    mean of the pieces' losses) and the piece sizes.
    """
    total = batch_size_of(batch)
    sizes = micro_batch_sizes(total, micro_batches) if total > 0 else [0]
    pieces = [batch] if len(sizes) == 1 else split_batch(batch, sizes)
    loss_sum: torch.Tensor | None = None
    for i, (piece, n) in enumerate(zip(pieces, sizes, strict=True)):
        if before_each is not None:
            before_each(i, n)
        loss = step(model, piece)
        weight = n / total if len(sizes) > 1 else 1.0
        (loss * weight if weight != 1.0 else loss).backward()  # type: ignore[no-untyped-call]
        part = loss.detach() * weight
        loss_sum = part if loss_sum is None else loss_sum + part
    assert loss_sum is not None
    return loss_sum, sizes
