"""Which device is the primary: the one that holds the master parameters, gathers the
replicas' outputs, computes the loss and runs ``optimizer.step()``.

At the start nothing has been measured, so the choice reads what is known before the first
step: NVML's free memory and load (a snapshot) and the engine's static speed hints (e.g. SM
counts of GPUs of one generation). Position 0 stays the primary unless another device is
clearly better placed: a device with much less memory available than the best one, or
busy with another job while an idle one exists, is never chosen, and among the rest a
device must be at least :data:`START_MARGIN` faster by its hint to beat position 0.

While training, the controller compares the measured plan with the current primary to the
best plan with another one (the primary's extra work, measured as its loss and optimizer
phases, charged to the candidate) and moves only when the gain is clear: at least
``min_gain`` of the step time, and the move's cost (parameters, gradients, buffers and
optimizer state copied between devices: :class:`MoveCost`) paid back within
``payback_s`` seconds of training. Moves are spaced by the controller's interval for
device-set changes, so a primary never flips back and forth on noise.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["START_MARGIN", "MoveCost", "move_pays", "start_primary"]

START_MARGIN = 1.1  # a start hint must be 10 % faster than position 0's to move off it
FULL_FRACTION = 0.5  # less available memory than this fraction of the best: never primary
BUSY_UTIL = 0.5  # NVML load above which a device is primary only if none is idler


def start_primary(
    usable: Sequence[int],
    *,
    available_mb: Sequence[float | None] | None = None,
    util: Sequence[float | None] | None = None,
    speed: Sequence[float | None] | None = None,
) -> int:
    """The primary to start with among ``usable`` positions (see module doc); the
    sequences are indexed by position, None where unknown."""
    if not usable:
        raise ValueError("no usable device to be the primary")

    def at(values: Sequence[float | None] | None, p: int) -> float | None:
        return None if values is None or p >= len(values) else values[p]

    pool = list(usable)
    avail = [a for p in pool if (a := at(available_mb, p)) is not None]
    if avail:
        best = max(avail)
        pool = [p for p in pool if (a := at(available_mb, p)) is None or a >= FULL_FRACTION * best]
    idle = [p for p in pool if (u := at(util, p)) is None or u <= BUSY_UTIL]
    pool = idle or pool
    first = pool[0]
    speeds = {p: s for p in pool if (s := at(speed, p)) is not None and s > 0}
    if len(speeds) == len(pool) and len(pool) > 1:
        fastest = max(pool, key=lambda p: (speeds[p], -p))
        if speeds[fastest] >= START_MARGIN * speeds[first]:
            return fastest
    return first


@dataclass
class MoveCost:
    """Seconds a primary move costs: bytes over a bandwidth, the conservative
    ``assumed_gbps`` until a move has been measured, then the measured one."""

    assumed_gbps: float = 4.0
    measured_gbps: float | None = None

    def seconds(self, nbytes: int) -> float:
        gbps = self.measured_gbps or self.assumed_gbps
        return max(0, nbytes) / (gbps * 1e9)

    def record(self, nbytes: int, seconds: float | None) -> None:
        """A move of ``nbytes`` took ``seconds`` (None or 0: not measured)."""
        if seconds and seconds > 0 and nbytes > 0:
            self.measured_gbps = nbytes / seconds / 1e9


def move_pays(
    step_s_now: float,
    step_s_new: float,
    cost_s: float,
    *,
    min_gain: float,
    payback_s: float,
) -> bool:
    """Whether moving the primary is clearly worth it: the predicted step is at least
    ``min_gain`` shorter, and the time saved over ``payback_s`` seconds of training at the
    new step time covers ``cost_s`` (twice, to leave a margin for prediction error)."""
    if not (step_s_now > 0 and step_s_new > 0) or step_s_new > (1.0 - min_gain) * step_s_now:
        return False
    saved = (step_s_now - step_s_new) * (payback_s / step_s_new)
    return saved >= 2.0 * cost_s
