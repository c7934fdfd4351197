"""Prediction error tracking (mean absolute percentage error)."""

from __future__ import annotations

__all__ = ["MapeTracker"]


class MapeTracker:
    """Running MAPE of predicted vs measured values."""

    def __init__(self) -> None:
        self.count = 0
        self._sum = 0.0

    def add(self, predicted: float, measured: float) -> None:
        if measured <= 0 or predicted <= 0:
            return
        self._sum += abs(predicted - measured) / measured
        self.count += 1

    def value_pct(self) -> float | None:
        return None if self.count == 0 else 100.0 * self._sum / self.count
