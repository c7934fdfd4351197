"""Gradient clipping by total norm, applied once per optimizer step: after every
micro-batch and accumulated batch has added its gradient, after a GradScaler unscaled
them, before ``optimizer.step``. The norm before clipping is returned for the history.

A non-finite norm (inf/NaN gradients) means the step would write NaN into the model, so
the loop skips that step (the gradients are dropped, the model and optimizer state are
unchanged) and reports it as a ``nonfinite`` event; under fp16 the GradScaler makes the
same decision itself."""

from __future__ import annotations

import math
from typing import Any

import torch

from ..errors import UsageError

__all__ = ["check_clip", "clip_gradients"]


def check_clip(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise UsageError(
            f"clip_grad_norm={value!r} (--clip-grad-norm) must be a positive number, "
            "e.g. 1.0 (the largest total gradient norm allowed)."
        )
    if not (math.isfinite(value) and value > 0):
        raise UsageError(
            f"clip_grad_norm={value!r} (--clip-grad-norm) must be a positive finite number, "
            "e.g. 1.0; leave it out not to clip."
        )
    return float(value)


def clip_gradients(optimizer: torch.optim.Optimizer, max_norm: float) -> float:
    """``clip_grad_norm_`` over the optimizer's parameters; the total norm before clipping."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    return float(norm)
