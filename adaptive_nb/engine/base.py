"""The engine interface: how one training step is executed on the chosen devices.

An engine owns *where* the step's compute runs (CPU, weighted DataParallel over GPUs, or
a simulated fleet) and *how the batch is split*. The loop owns *when* (step boundaries,
zero_grad / optimizer.step, retries) so that a step is applied exactly once.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..step import StepFn, StepOutcome

__all__ = ["Engine"]


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
        :class:`OutOfMemory` / :class:`DeviceFailure` having applied nothing; what a failed
        attempt changed in place (buffers such as batch-norm statistics, gradients) the loop
        restores before retrying (:mod:`adaptive_nb.run.rollback`)."""

    def timed_update(self, update: Callable[[], object]) -> Callable[[], object]:
        """``update`` (the optimizer step), possibly timed by the engine: the loop runs the
        update through this so that an engine can charge its device time to the step.
        Default: unchanged."""
        return update

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
