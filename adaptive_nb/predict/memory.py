"""Per-run device memory model ``m(b) = m0 + m1·b (+ extra on the primary)``."""

from __future__ import annotations

import statistics
from collections import deque

from .rls import RegularizedRLS

__all__ = ["MemoryModel", "ReserveSlack"]


class MemoryModel:
    """Peak memory (MB) a device needs for a chunk of ``b`` samples, pooled over devices
    (replicas hold the same model), with a separate term for the DataParallel primary.

    Until different chunk sizes have been seen, the prior assumes memory grows in
    proportion to the batch (over-estimates growth, which is the safe side)."""

    def __init__(self, forgetting: float = 0.995, noise: float = 0.02) -> None:
        self.forgetting = forgetting
        self._prior = [noise**2 / 0.5**2, noise**2 / 1.0**2, noise**2 / 0.5**2]
        self._rls: RegularizedRLS | None = None
        self._m_ref = 1.0
        self._b_ref = 1.0

    @property
    def ready(self) -> bool:
        return self._rls is not None

    def update(self, b: float, mem_mb: float, primary: bool) -> None:
        if b <= 0 or mem_mb <= 0:
            return
        if self._rls is None:
            self._m_ref, self._b_ref = mem_mb, b
            self._rls = RegularizedRLS([0.1, 0.9, 0.0], self._prior, self.forgetting)
            if primary:  # the first sample is the primary's: keep its extra unknown
                return
            return
        self._rls.update([1.0, b / self._b_ref, 1.0 if primary else 0.0], mem_mb / self._m_ref)

    def predict(self, b: float, primary: bool) -> float:
        if self._rls is None:
            return 0.0
        th = self._rls.theta
        m0 = th[0] + (th[2] if primary else 0.0)
        return max(0.0, m0 * self._m_ref) + max(th[1], 1e-6) * self._m_ref * b / self._b_ref

    def per_sample_mb(self) -> float:
        if self._rls is None:
            return 0.0
        return max(self._rls.theta[1], 1e-6) * self._m_ref / self._b_ref

    def max_samples(self, available_mb: float, primary: bool) -> int:
        """Largest chunk that fits in ``available_mb`` (0 if even the fixed part does not)."""
        if self._rls is None:
            return 1 << 30
        fixed = self.predict(0.0, primary)
        per = self.per_sample_mb()
        if available_mb <= fixed:
            return 0
        return int((available_mb - fixed) / per)


class ReserveSlack:
    """The CUDA caching allocator's slack beyond what a step allocates: rounding and
    fragmentation, kept as a margin next to the memory model's demand (peak *allocated*).

    Slack is reserved minus the *highest* allocation the cache has served on that device:
    after a chunk shrinks the cache keeps the larger chunk's blocks, which the next larger
    chunk reuses, so that part is not slack. A reserved figure below the high-water mark
    means the cache was emptied: the high-water mark starts again. The margin is the
    median over recent steps (0 before any)."""

    def __init__(self, window: int = 64) -> None:
        self._slack: deque[float] = deque(maxlen=window)
        self._high: dict[int, float] = {}  # position -> highest peak allocated since

    def update(self, pos: int, alloc_mb: float, reserved_mb: float) -> None:
        high = self._high.get(pos, 0.0)
        high = alloc_mb if reserved_mb < high else max(high, alloc_mb)
        self._high[pos] = high
        self._slack.append(max(0.0, reserved_mb - high))

    def margin_mb(self) -> float:
        return statistics.median(self._slack) if self._slack else 0.0
