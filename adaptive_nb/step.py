"""What one training step is: the user's step function, and what an engine measured
while running it (read by the controllers, the loop and the report)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .errors import LossError

__all__ = ["StepFn", "StepOutcome", "check_loss"]

StepFn = Callable[[nn.Module, Any], torch.Tensor]
"""``step(model, batch) -> loss``: the user's per-step code."""


@dataclass
class StepOutcome:
    """What the engine measured for one completed forward/backward."""

    # the scalar loss of the whole batch (detached); a float from an engine whose workers
    # computed it in other processes (no tensor made for it in the kernel)
    loss: torch.Tensor | float
    samples: int
    wall_s: float  # step wall time on the engine's clock (virtual when simulated)
    device_time_s: dict[int, float] = field(default_factory=dict)  # position -> compute s
    device_batch: dict[int, int] = field(default_factory=dict)  # position -> samples
    peak_mem_mb: dict[int, float] = field(default_factory=dict)
    micro_batches: int = 1
    # From the CUDA caching allocator, when the engine has it (position -> MB over the step):
    # peak *allocated* is what the step needs (the memory model's demand); peak *reserved*
    # minus it is the allocator's cache/fragmentation slack, kept as a separate margin.
    peak_alloc_mb: dict[int, float] = field(default_factory=dict)
    reserved_mb: dict[int, float] = field(default_factory=dict)
    # Measured device seconds per position and phase ("forward", "backward", and on the
    # primary "loss", "optimizer"), when the engine measures them; device_time_s is their sum.
    device_phase_s: dict[int, dict[str, float]] = field(default_factory=dict)


def check_loss(loss: Any, loss_name: str | None = None) -> torch.Tensor:
    """``loss`` as a 0-d tensor that can be trained on, or a :class:`LossError` saying what
    is wrong and how to fix it. ``loss_name``: the variable the cell body assigns (None for
    a step function, which returns its loss)."""
    what = f"`{loss_name}`" if loss_name else "the step's loss"
    if loss is None:
        raise LossError(
            f"the step never assigned `{loss_name}`: end the cell with e.g. "
            f"`{loss_name} = F.cross_entropy(model(x), y)` (the step was not applied)."
            if loss_name
            else "the step returned None, not a loss tensor: return the loss (the step was "
            "not applied)."
        )
    if not isinstance(loss, torch.Tensor):
        raise LossError(
            f"{what} is a {type(loss).__name__}, not a loss tensor: use the loss tensor "
            "itself, not `.item()` (the step was not applied)."
        )
    if loss.numel() != 1:
        fix = f"`{loss_name} = {loss_name}.mean()`" if loss_name else "`loss.mean()`"
        raise LossError(
            f"{what} has shape {tuple(loss.shape)}; it must be a scalar: reduce it, e.g. "
            f"{fix} (the step was not applied)."
        )
    if not loss.requires_grad:
        raise LossError(
            f"{what} does not require grad: it was computed under torch.no_grad() or from "
            "detached tensors, so nothing can be trained (the step was not applied)."
        )
    return loss if loss.dim() == 0 else loss.reshape(())
