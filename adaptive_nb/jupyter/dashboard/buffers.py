"""Bounded time series for live plots.

A :class:`Series` keeps at most ``max_points`` points yet covers the whole run: when it
is full, every other point is dropped and only every second new point is kept from then
on (the stride doubles). The newest point is always shown, so the plot's right edge is
current even while points are being skipped.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

__all__ = ["MultiSeries", "Series"]

NAN = math.nan


class MultiSeries:
    """Several y series sharing one x axis (e.g. utilisation per device).

    Names may appear later in the run; earlier points of a new name are NaN (a gap)."""

    def __init__(self, max_points: int = 300) -> None:
        if max_points < 4:
            raise ValueError("max_points must be at least 4")
        self.max_points = max_points
        self._x: list[float] = []
        self._y: dict[str, list[float]] = {}
        self._stride = 1
        self._seen = 0
        self._tail: tuple[float, dict[str, float]] | None = None

    @property
    def names(self) -> list[str]:
        return list(self._y)

    def __len__(self) -> int:
        return len(self._x) + (1 if self._tail is not None else 0)

    def append(self, x: float, values: Mapping[str, float | None]) -> None:
        clean = {k: (NAN if v is None else float(v)) for k, v in values.items()}
        for name in clean:
            if name not in self._y:
                self._y[name] = [NAN] * len(self._x)
        keep = self._seen % self._stride == 0
        self._seen += 1
        if not keep:
            self._tail = (float(x), clean)
            return
        self._tail = None
        self._x.append(float(x))
        for name, ys in self._y.items():
            ys.append(clean.get(name, NAN))
        if len(self._x) > self.max_points - 1:  # leave room for the tail point
            self._x = self._x[::2]
            for name in self._y:
                self._y[name] = self._y[name][::2]
            self._stride *= 2
            self._seen = 1  # the point just kept counts as the first of the new stride

    def data(self, names: Sequence[str] | None = None) -> tuple[list[float], list[list[float]]]:
        """``(x, [y of each name])``, including the newest point."""
        names = list(self._y) if names is None else list(names)
        x = list(self._x)
        ys = [list(self._y.get(n, [NAN] * len(self._x))) for n in names]
        if self._tail is not None:
            tx, tv = self._tail
            x.append(tx)
            for n, y in zip(names, ys, strict=True):
                y.append(tv.get(n, NAN))
        return x, ys


class Series:
    """One bounded y series (see :class:`MultiSeries`)."""

    def __init__(self, max_points: int = 300) -> None:
        self._multi = MultiSeries(max_points)

    def __len__(self) -> int:
        return len(self._multi)

    def append(self, x: float, y: float | None) -> None:
        self._multi.append(x, {"y": y})

    def data(self) -> tuple[list[float], list[float]]:
        x, ys = self._multi.data(["y"])
        return x, ys[0]
