"""Bounded ring buffers: a fixed amount of memory however long a run lasts.

:class:`NumericRing` holds floats in a preallocated numpy array; :class:`Ring` holds any
objects (e.g. :class:`~adaptive_nb.monitor.snapshot.Snapshot`) in a preallocated list.
Appending is O(1) and never allocates new backing storage; once full, the oldest entry is
overwritten. Neither class locks: the owner (e.g. :class:`~adaptive_nb.monitor.Monitor`)
serialises access.

>>> r = NumericRing(3)
>>> for x in (1, 2, 3, 4):
...     r.append(x)
>>> r.values().tolist()
[2.0, 3.0, 4.0]
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Generic, TypeVar, cast

import numpy as np
import numpy.typing as npt

__all__ = ["NumericRing", "Ring"]

T = TypeVar("T")


def _check_capacity(capacity: int) -> int:
    capacity = int(capacity)
    if capacity < 1:
        raise ValueError(f"ring capacity must be at least 1, got {capacity}")
    return capacity


class NumericRing:
    """The last ``capacity`` floats, backed by one preallocated numpy array."""

    __slots__ = ("_buf", "_count", "_head")

    def __init__(self, capacity: int, dtype: npt.DTypeLike = np.float64) -> None:
        self._buf: npt.NDArray[np.floating] = np.full(
            _check_capacity(capacity), np.nan, dtype=dtype
        )
        self._head = 0  # next slot to write
        self._count = 0

    @property
    def capacity(self) -> int:
        return int(self._buf.shape[0])

    @property
    def nbytes(self) -> int:
        """Bytes held by the backing array (constant for the ring's lifetime)."""
        return int(self._buf.nbytes)

    def __len__(self) -> int:
        return self._count

    def append(self, value: float) -> None:
        self._buf[self._head] = value
        self._head = (self._head + 1) % self._buf.shape[0]
        if self._count < self._buf.shape[0]:
            self._count += 1

    def values(self) -> npt.NDArray[np.floating]:
        """A copy of the stored values, oldest first."""
        if self._count < self._buf.shape[0]:
            return self._buf[: self._count].copy()
        return np.concatenate((self._buf[self._head :], self._buf[: self._head]))

    def last(self) -> float | None:
        if self._count == 0:
            return None
        return float(self._buf[self._head - 1])

    def clear(self) -> None:
        self._buf.fill(np.nan)
        self._head = 0
        self._count = 0


class Ring(Generic[T]):
    """The last ``capacity`` objects, in a preallocated list."""

    __slots__ = ("_buf", "_count", "_head")

    def __init__(self, capacity: int) -> None:
        self._buf: list[T | None] = [None] * _check_capacity(capacity)
        self._head = 0
        self._count = 0

    @property
    def capacity(self) -> int:
        return len(self._buf)

    @property
    def storage_len(self) -> int:
        """Length of the backing list (equals ``capacity`` for the ring's lifetime)."""
        return len(self._buf)

    def __len__(self) -> int:
        return self._count

    def append(self, item: T) -> None:
        self._buf[self._head] = item
        self._head = (self._head + 1) % len(self._buf)
        if self._count < len(self._buf):
            self._count += 1

    def items(self) -> list[T]:
        """The stored objects, oldest first (a new list)."""
        if self._count < len(self._buf):
            stored = self._buf[: self._count]
        else:
            stored = self._buf[self._head :] + self._buf[: self._head]
        return cast("list[T]", stored)

    def __iter__(self) -> Iterator[T]:
        return iter(self.items())

    def last(self) -> T | None:
        if self._count == 0:
            return None
        return self._buf[self._head - 1]

    def clear(self) -> None:
        self._buf[:] = [None] * len(self._buf)
        self._head = 0
        self._count = 0
