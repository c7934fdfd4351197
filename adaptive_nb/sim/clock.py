"""A virtual clock: simulated time advances only when the simulator says so."""

from __future__ import annotations

__all__ = ["VirtualClock"]


class VirtualClock:
    """Seconds since the simulated run began; never sleeps."""

    def __init__(self, start: float = 0.0) -> None:
        self._now = float(start)

    def now(self) -> float:
        return self._now

    def advance(self, seconds: float) -> float:
        if seconds < 0:
            raise ValueError("time only moves forward")
        self._now += seconds
        return self._now
