"""The controller interface: decides, every control tick, how the engine should run.

A controller reads measurements (per completed step) and monitor snapshots (per tick)
and changes its engine's plan: threads on CPU, device set and batch shares on GPUs.
Each decision is returned as events for the report.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

from ..errors import DeviceFailure, OutOfMemory
from ..events import Event
from ..monitor.snapshot import Snapshot
from ..step import StepOutcome

__all__ = ["Controller", "NullController"]


class Controller(ABC):
    """Adapts an engine while training runs. All methods run on the training thread,
    between steps, and must be cheap (``observe`` runs every step)."""

    policy: str = "adaptive"
    headroom: float = 0.1

    @abstractmethod
    def observe(self, outcome: StepOutcome) -> None:
        """Record one completed step's measurements (every step: keep it O(devices))."""

    @abstractmethod
    def tick(self, now: float, step: int, snapshot: Snapshot | None) -> list[Event]:
        """Control tick: update forecasts, maybe re-plan. ``now`` is the engine clock
        relative to the run start."""

    def on_oom(self, error: OutOfMemory, now: float, step: int) -> list[Event]:
        """Adjust the plan so that retrying the same batch fits. Default: re-raise."""
        raise error

    def on_device_failure(self, error: DeviceFailure, now: float, step: int) -> list[Event]:
        """Drop the device and re-plan on the rest. Default: re-raise."""
        raise error

    def set_policy(self, policy: str, now: float, step: int) -> list[Event]:
        self.policy = policy
        return []

    def set_headroom(self, headroom: float, now: float, step: int) -> list[Event]:
        self.headroom = headroom
        return []

    def set_device_enabled(
        self, position: int, enabled: bool, now: float, step: int
    ) -> list[Event]:
        return []

    def shares(self) -> dict[str, float]:
        """Current share of the global batch per device display name."""
        return {}

    def threads(self) -> int | None:
        return None

    def predicted_step_s(self) -> float | None:
        return None

    def summary(self) -> dict[str, object]:
        """Extra fields for the report summary (e.g. prediction error)."""
        return {}


class NullController(Controller):
    """Changes nothing (used for monitor-only runs and as a baseline)."""

    policy = "static"

    def observe(self, outcome: StepOutcome) -> None:
        pass

    def tick(self, now: float, step: int, snapshot: Snapshot | None) -> list[Event]:
        return []
