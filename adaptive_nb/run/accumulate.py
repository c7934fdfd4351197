"""User gradient accumulation: one optimizer step per ``accumulate`` loader batches.

Batch ``i`` of ``b_i`` samples has its (mean) loss weighted by ``b_i / Σb``, so the
accumulated gradient is the gradient of the mean loss over all the group's samples (the
last group of an epoch may be shorter; groups never span two epochs).

Each batch's gradient is moved into a buffer as soon as its backward is done, and the sum
is put back into ``.grad`` just before the optimizer step. An out-of-memory retry clears
``.grad`` to re-run *its* batch; the buffer keeps the gradients of the batches before it,
so a retry never loses or doubles a batch's contribution.
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import UsageError

__all__ = ["GradBuffer", "check_accumulate"]


def check_accumulate(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UsageError(
            f"accumulate={value!r} (--accumulate) must be a whole number of loader batches "
            "per optimizer step, at least 1 (1: no accumulation)."
        )
    return value


class GradBuffer:
    """Sums the optimizer parameters' gradients across batches outside ``.grad``."""

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self._params = [p for group in optimizer.param_groups for p in group["params"]]
        self._sums: dict[int, torch.Tensor] = {}

    def stash(self) -> None:
        """Move the gradients of the batch just run into the buffer (``.grad`` → None)."""
        for i, p in enumerate(self._params):
            g = p.grad
            if g is None:
                continue
            held = self._sums.get(i)
            if held is None:
                self._sums[i] = g
            else:
                held.add_(g)
            p.grad = None

    def restore(self) -> None:
        """Put the summed gradients back into ``.grad`` and empty the buffer."""
        for i, p in enumerate(self._params):
            p.grad = self._sums.get(i)
        self._sums = {}

    def clear(self) -> None:
        self._sums = {}
