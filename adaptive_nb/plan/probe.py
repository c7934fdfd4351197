"""Readmission by measurement: when to give a left-out GPU a small trial share, and what
the trial measured.

NVML's utilisation is the fraction of time *any* kernel ran. Under time-slicing it reads
~100 % whenever another process is active, even one that leaves most of the GPU free, so
the ``1/(1 − util)`` slowdown it implies never clears and a device left out under load
would never come back. NVML is therefore only a prior: every so often a left-out device
(not failed, not excluded by the user) runs a few samples of each step — a *probe* — and
its measured time, relative to its unloaded speed, replaces the prior.

Cost is bounded: a probe lasts one control interval (plus the step in flight) with a
small chunk (``fraction`` of a micro-batch, at least ``min_samples``), and probes of a
device that keeps losing are spaced by exponential back-off (``first`` seconds after the
device left, doubling up to ``max_backoff``: at the default 2 s control interval a probe
costs at most 2 s of slower steps per 15 minutes once backed off). A device a probe let
back in that is dropped again also doubles its back-off: the small probe chunk can
look better than the device does at a full share (a bandwidth-bound co-tenant), and
that must not turn into a drop/readmit cycle.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field

from ..layout import Plan, micro_batch_sizes

__all__ = ["Readmission", "probe_plan"]


@dataclass
class _State:
    backoff: float
    next_at: float = math.inf
    measured: float | None = None  # slowdown the last finished probe measured
    back_by_probe: bool = False  # in the plan because a probe won
    probes: int = 0
    won: int = 0


@dataclass
class _Running:
    position: int
    started: float
    saved: Plan  # the plan in force before the probe (without the probed device)
    slowdowns: list[float] = field(default_factory=list)


class Readmission:
    """Probe schedule and measurements of the devices of one controller (by position)."""

    def __init__(
        self,
        n: int,
        *,
        first: float = 60.0,
        max_backoff: float = 900.0,
        fraction: float = 0.02,
        min_samples: int = 2,
    ) -> None:
        self.first = float(first)
        self.max_backoff = float(max_backoff)
        self.fraction = float(fraction)
        self.min_samples = int(min_samples)
        self._states = [_State(self.first) for _ in range(n)]
        self.running: _Running | None = None

    @property
    def active(self) -> int | None:
        """Position of the device being probed now."""
        return None if self.running is None else self.running.position

    def dropped(self, pos: int, now: float) -> None:
        """The device left the plan: first probe after the current back-off."""
        st = self._states[pos]
        if st.back_by_probe:  # the probe misled: the device did not hold its share
            st.backoff = min(2.0 * st.backoff, self.max_backoff)
            st.back_by_probe = False
        st.next_at = now + st.backoff
        st.measured = None

    def due(self, pos: int, now: float) -> bool:
        return self.running is None and now >= self._states[pos].next_at

    def samples(self, batch: int, micro_batches: int) -> int:
        size = micro_batch_sizes(batch, micro_batches)[0]
        return max(self.min_samples, math.ceil(self.fraction * size))

    def start(self, pos: int, now: float, saved: Plan) -> None:
        self.running = _Running(pos, now, saved)
        self._states[pos].probes += 1

    def record(self, slowdown: float) -> None:
        """One step of the running probe: its time over the device's unloaded time."""
        if self.running is not None and slowdown > 0 and math.isfinite(slowdown):
            self.running.slowdowns.append(slowdown)

    def ready(self, now: float) -> bool:
        """The probe has measured at least one step and run for a control interval."""
        r = self.running
        return r is not None and bool(r.slowdowns) and now > r.started

    def finish(self) -> tuple[int, float, Plan]:
        """End the running probe: (position, measured slowdown, plan saved at its start).
        The first step is left out when there are more (it pays the cold cache)."""
        r = self.running
        assert r is not None and r.slowdowns
        self.running = None
        s = statistics.median(r.slowdowns[1:] or r.slowdowns)
        self._states[r.position].measured = s
        return r.position, s, r.saved

    def abort(self, now: float) -> Plan | None:
        """Stop the running probe without a verdict (a fault or a request came first); the
        device's next probe is one back-off away. Returns the saved plan (None: none ran)."""
        r = self.running
        if r is None:
            return None
        self.running = None
        st = self._states[r.position]
        st.next_at = now + st.backoff
        return r.saved

    def lost(self, pos: int, now: float) -> float:
        """The probe says the device does not help: back off. Returns seconds to the next."""
        st = self._states[pos]
        st.backoff = min(2.0 * st.backoff, self.max_backoff)
        st.next_at = now + st.backoff
        return st.backoff

    def won(self, pos: int) -> None:
        st = self._states[pos]
        st.won += 1
        st.back_by_probe = True
        st.next_at = math.inf

    def measured(self, pos: int) -> float | None:
        """Slowdown the device's last probe measured since it left (None: none yet)."""
        return self._states[pos].measured

    def summary(self) -> dict[str, int]:
        return {
            "readmission_probes": sum(s.probes for s in self._states),
            "readmission_probes_won": sum(s.won for s in self._states),
        }


def probe_plan(plan: Plan, pos: int, samples: int) -> Plan:
    """``plan`` with device ``pos`` added at ``samples`` per micro-batch (a cap holds it
    there); the other devices keep their relative shares."""
    size = micro_batch_sizes(plan.batch, plan.micro_batches)[0]
    p = min(0.5, samples / max(1, size))
    shares = [s * (1.0 - p) for s in plan.shares]
    shares[pos] = p
    caps: list[int | None] = list(plan.caps) if plan.caps else [None] * len(shares)
    caps[pos] = samples
    primary = plan.devices[0]
    rest = sorted({*plan.devices[1:], pos} - {primary})
    return Plan(
        devices=(primary, *rest),
        shares=tuple(shares),
        micro_batches=plan.micro_batches,
        batch=plan.batch,
        predicted_step_s=None,
        caps=tuple(caps),
    )
