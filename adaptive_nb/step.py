"""What one training step is: the user's step function, and what an engine measured
while running it (read by the controllers, the loop and the report)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

__all__ = ["StepFn", "StepOutcome"]

StepFn = Callable[[nn.Module, Any], torch.Tensor]
"""``step(model, batch) -> loss``: the user's per-step code."""


@dataclass
class StepOutcome:
    """What the engine measured for one completed forward/backward."""

    loss: torch.Tensor  # the scalar loss of the whole batch (detached)
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
