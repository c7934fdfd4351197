"""The CPU engine: forward and backward on the host, no wrapping."""

from __future__ import annotations

import time
from typing import Any

from torch import nn

from ..batches import batch_size_of
from ..step import StepFn, StepOutcome
from .base import Engine

__all__ = ["CpuEngine"]


class CpuEngine(Engine):
    """Runs the step on the CPU; what adapts is torch's intra-op thread count."""

    def __init__(self) -> None:
        self._model: nn.Module | None = None

    def device_names(self) -> list[str]:
        return ["cpu"]

    def prepare(self, model: nn.Module) -> nn.Module:
        self._model = model
        return model

    def forward_backward(self, step: StepFn, batch: Any) -> StepOutcome:
        if self._model is None:
            raise RuntimeError("CpuEngine.prepare() must be called before forward_backward()")
        t0 = time.perf_counter()
        loss = step(self._model, batch)
        loss.backward()  # type: ignore[no-untyped-call]
        dt = time.perf_counter() - t0
        n = batch_size_of(batch)
        return StepOutcome(
            loss=loss.detach(),
            samples=n,
            wall_s=dt,
            device_time_s={0: dt},
            device_batch={0: n},
        )
