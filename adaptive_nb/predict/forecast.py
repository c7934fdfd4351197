"""Holt's linear-trend forecast for irregularly spaced readings (external GPU load,
free memory)."""

from __future__ import annotations

__all__ = ["Holt"]


class Holt:
    """Level + trend (per second). ``forecast(h)`` predicts ``h`` seconds ahead, clamped
    to ``[lo, hi]``. Large jumps re-level at once instead of being smoothed over."""

    def __init__(
        self,
        level_gain: float = 0.5,
        trend_gain: float = 0.3,
        lo: float = float("-inf"),
        hi: float = float("inf"),
        jump: float | None = None,
    ) -> None:
        self.level_gain = level_gain
        self.trend_gain = trend_gain
        self.lo = lo
        self.hi = hi
        self.jump = jump
        self.level: float | None = None
        self.trend = 0.0
        self.t: float | None = None
        self.last: float | None = None

    def update(self, t: float, y: float) -> None:
        self.last = y
        if self.level is None or self.t is None:
            self.level, self.t, self.trend = y, t, 0.0
            return
        dt = t - self.t
        if dt <= 0:
            self.level = y
            return
        pred = self.level + self.trend * dt
        if self.jump is not None and abs(y - pred) > self.jump:
            self.level, self.trend, self.t = y, 0.0, t
            return
        prev = self.level
        self.level = self.level_gain * y + (1 - self.level_gain) * pred
        self.trend = self.trend_gain * (self.level - prev) / dt + (1 - self.trend_gain) * self.trend
        self.t = t

    def forecast(self, horizon: float) -> float | None:
        if self.level is None:
            return None
        return min(self.hi, max(self.lo, self.level + self.trend * max(horizon, 0.0)))
