"""What the allocation controller needs from an engine, and what it keeps per device."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Protocol

from ..layout import Plan
from ..predict import Holt, StepTimeModel

__all__ = ["AllocatableEngine", "DeviceState"]


class AllocatableEngine(Protocol):
    """What the controller needs from an engine (DataParallel or simulated).

    Optional: ``release_device(position)``, called after a plan stops using a device (left
    out or failed) so the engine gives that device's cached memory back (CUDA:
    ``torch.cuda.empty_cache()`` under ``torch.cuda.device``); engines without it are fine.
    """

    def device_names(self) -> list[str]: ...

    def monitor_keys(self) -> list[int | None]: ...

    def apply_plan(self, plan: Plan) -> None: ...

    @property
    def last_batch(self) -> int:
        """Samples in the batch of the latest (possibly failed) step; 0 before any."""
        ...


@dataclass
class DeviceState:
    """One device as the controller sees it: models, forecasts, caps, why it is out."""

    position: int
    name: str
    key: int | None  # GpuSample.index that monitors it
    time_model: StepTimeModel
    enabled: bool = True
    failed: bool = False
    missing: bool = False
    util: Holt = field(default_factory=lambda: Holt(0.5, 0.3, 0.0, 1.0, jump=0.3))
    util_seen: deque[tuple[float, float]] = field(default_factory=lambda: deque(maxlen=64))
    ext_mem: Holt = field(default_factory=lambda: Holt(0.5, 0.3, 0.0, jump=1024.0))
    total_mb: float | None = None
    oom_cap: int | None = None
    oom_avail_mb: float | None = None
    history: deque[tuple[float, float, float]] = field(default_factory=lambda: deque(maxlen=64))
    best: tuple[float, float] | None = None  # (alpha, beta) when fastest
    dropped_reason: str | None = None
    seed: tuple[float, float] | None = None  # (alpha, beta) a won probe measured
