"""The engine interface: how one training step is executed on the chosen devices.

An engine owns *where* the step's compute runs (CPU, weighted DataParallel over GPUs, or
a simulated fleet) and *how the batch is split*. The loop owns *when* (step boundaries,
zero_grad / optimizer.step, retries) so that a step is applied exactly once.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

__all__ = [
    "DeviceFailure",
    "Engine",
    "OutOfMemory",
    "StepFn",
    "StepOutcome",
    "batch_size_of",
    "move_to",
]

StepFn = Callable[[nn.Module, Any], torch.Tensor]
"""``step(model, batch) -> loss``: the user's per-step code."""


class OutOfMemory(RuntimeError):
    """A device ran out of memory during a step; nothing was applied, the batch is retried.

    ``device`` is the engine's device position (index into ``Engine.device_names()``),
    or None when unknown."""

    def __init__(self, message: str, device: int | None = None) -> None:
        super().__init__(message)
        self.device = device


class DeviceFailure(RuntimeError):
    """A device errored (not OOM) or disappeared; it is dropped and the batch retried."""

    def __init__(self, message: str, device: int) -> None:
        super().__init__(message)
        self.device = device


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


class Engine(ABC):
    """Runs forward + backward of one global batch. Subclasses: CPU, DataParallel, simulated."""

    simulated: bool = False

    @abstractmethod
    def device_names(self) -> list[str]:
        """Display names of every device the engine may use, by position."""

    @abstractmethod
    def prepare(self, model: nn.Module) -> nn.Module:
        """Return the model as the step body should see it (possibly wrapped)."""

    @abstractmethod
    def forward_backward(self, step: StepFn, batch: Any) -> StepOutcome:
        """Run ``step`` on the batch and ``backward()`` the loss (the gradient must equal
        the full-batch gradient). Must not call ``optimizer.step``. Raises
        :class:`OutOfMemory` / :class:`DeviceFailure` with no lasting effect on the model."""

    def primary_device(self) -> torch.device:
        return torch.device("cpu")

    def monitor_keys(self) -> list[int | None]:
        """For each device position, the ``GpuSample.index`` that monitors it in a
        :class:`~adaptive_nb.monitor.snapshot.Snapshot` (None: the host CPU/RAM)."""
        return [None] * len(self.device_names())

    def clock(self) -> float:
        """Seconds on the engine's clock (virtual for simulated fleets)."""
        return time.perf_counter()

    def close(self) -> None:  # noqa: B027 - optional hook, nothing to release by default
        """Release resources at the end of a run."""


def move_to(batch: Any, device: torch.device) -> Any:
    """Move every tensor in a nested tuple/list/dict structure to ``device``."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True) if batch.device != device else batch
    if isinstance(batch, dict):
        return {k: move_to(v, device) for k, v in batch.items()}
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # namedtuple
        return type(batch)(*(move_to(v, device) for v in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(move_to(v, device) for v in batch)
    return batch


def batch_size_of(batch: Any) -> int:
    """Samples in a batch: the first dimension of its first tensor (0 if none)."""
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0]) if batch.dim() > 0 else 1
    if isinstance(batch, dict):
        for v in batch.values():
            n = batch_size_of(v)
            if n:
                return n
        return 0
    if isinstance(batch, (list, tuple)):
        for v in batch:
            n = batch_size_of(v)
            if n:
                return n
    return 0
