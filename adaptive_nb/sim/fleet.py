"""The simulated fleet's ground truth: what each device does at a given virtual time.

Semantics (one micro-step, ``k`` devices, chunk ``b_i`` on device ``i``):
``t_i = idle_ms(b_i) · Π slowdown · noise`` ms, plus ``primary_extra_ms`` on the primary,
where ``idle_ms`` comes from the device's ``curve`` or ``alpha_ms + 1000·b/samples_per_s``
and each active event multiplies by its ``slowdown`` (default ``1/(1 − external_util)``:
independent co-tenants, so without ``slowdown`` fields this is ``1/(1 − combined util)``
with combined util ``1 − Π(1 − u)``). The micro-step takes ``max t_i`` plus
``comm.alpha_ms + comm.per_device_ms·(k−1)``; micro-batches each cost a full micro-step.
A device needs ``mem_base_gb + mem_per_sample_gb·b_i`` (+ ``primary_extra_gb`` on the
primary) and runs out of memory when that exceeds ``memory_gb − external_mem_gb`` (the
external memory of all active events adds up). A failed device errors on every use. The
state at the start of a step holds for the whole step.

What the engine *reports* is what the real DataParallel engine measures, by the same
method: forward and backward per device (the true time, split by ``forward_fraction``),
plus ``primary_extra_ms`` on the primary as the loss. ``Fleet.backward_factor`` set to a
number simulates an engine that *estimates* backward as that factor × forward instead
(``python -m adaptive_nb.bench --backward-estimate F``): the reported device time is then
``forward_fraction · t · (1 + F)``, and with another forward fraction than ``1/(1 + F)``
the planner is fed that estimate's error.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field

from ..errors import DeviceFailure, OutOfMemory
from .clock import VirtualClock
from .scenario import Scenario

__all__ = ["DeviceState", "Fleet", "FleetStep"]


@dataclass(frozen=True)
class DeviceState:
    util: float  # external utilisation 0..1, as NVML reports it
    ext_mem_gb: float
    failed: bool
    slowdown: float = 1.0  # true multiplier of our compute time


@dataclass
class FleetStep:
    """One simulated step: per-device compute seconds as the engine reports them and
    samples, peak memory (MB), wall seconds; ``fault`` is set when the step failed
    (``wall_s`` is then the time wasted). ``true_time_s``: the devices' true seconds."""

    device_time_s: dict[int, float] = field(default_factory=dict)
    device_batch: dict[int, int] = field(default_factory=dict)
    peak_mem_mb: dict[int, float] = field(default_factory=dict)
    wall_s: float = 0.0
    micro_batches: int = 1
    fault: OutOfMemory | DeviceFailure | None = None
    fault_micro: int = -1
    true_time_s: dict[int, float] = field(default_factory=dict)
    phase_s: dict[int, dict[str, float]] = field(default_factory=dict)  # as reported


class Fleet:
    """Ground truth of a scenario on a virtual clock, with seeded noise."""

    def __init__(self, scenario: Scenario, clock: VirtualClock | None = None) -> None:
        self.scenario = scenario
        self.clock = clock or VirtualClock()
        self.rng = random.Random(scenario.seed)
        self.n = len(scenario.devices)
        # how the engine measures backward (see the module docstring); the benchmark may
        # set an estimate factor to simulate an engine that estimates it
        self.backward_factor: float | None = None  # None: backward measured, as for real
        self.busy: dict[int, float] = {}  # position -> busy fraction in the last step
        self.mem_mb: dict[int, float] = {}  # position -> this run's memory in the last step
        # (virtual time, busy, memory) after each step: what a lagging monitor looks back on
        self.history: list[tuple[float, dict[int, float], dict[int, float]]] = [(0.0, {}, {})]

    # -- truth ----------------------------------------------------------------------------
    def state(self, i: int, t: float | None = None) -> DeviceState:
        now = self.clock.now() if t is None else t
        free = 1.0
        mem = 0.0
        slow = 1.0
        for e in self.scenario.loads:
            if e.device == i and e.active(now):
                free *= 1.0 - e.external_util
                mem += e.external_mem_gb
                slow *= e.multiplier()
        failed = any(f.device == i and f.at_s <= now for f in self.scenario.failures)
        return DeviceState(1.0 - free, mem, failed, slow)

    def true_ms(self, i: int, b: float, primary: bool, st: DeviceState) -> float:
        """Noise-free compute milliseconds of ``b`` samples on device ``i`` in state ``st``
        (with ``primary_extra_ms`` on the primary): what the oracle plans with."""
        ms = self.scenario.devices[i].idle_ms(b) * st.slowdown
        return ms + (self.scenario.primary_extra_ms if primary else 0.0)

    def _compute_ms(self, i: int, b: int, st: DeviceState, noisy: bool) -> float:
        ms = self.scenario.devices[i].idle_ms(b) * st.slowdown
        if noisy and self.scenario.noise > 0:
            ms *= max(0.2, 1.0 + self.rng.gauss(0.0, self.scenario.noise))
        return ms

    def reported_phases(self, i: int, compute_ms: float, primary: bool) -> dict[str, float]:
        """Seconds per phase the engine reports for ``compute_ms`` of true compute: forward
        timed; backward measured, or estimated as the factor × forward; on the primary
        ``primary_extra_ms`` as the loss (gather → backward), where the real engine
        charges it. Their sum is the reported device time (module docstring)."""
        forward = self.scenario.devices[i].forward_fraction * compute_ms
        factor = self.backward_factor
        backward = compute_ms - forward if factor is None else factor * forward
        out = {"forward": forward / 1000.0, "backward": backward / 1000.0}
        if primary and self.scenario.primary_extra_ms > 0:
            out["loss"] = self.scenario.primary_extra_ms / 1000.0
        return out

    def comm_s(self, k: int) -> float:
        c = self.scenario.comm
        return 0.0 if k <= 0 else (c.alpha_ms + c.per_device_ms * (k - 1)) / 1000.0

    def need_gb(self, b: int, primary: bool) -> float:
        j = self.scenario.job
        return (
            j.mem_base_gb
            + j.mem_per_sample_gb * b
            + (self.scenario.primary_extra_gb if primary else 0.0)
        )

    def available_gb(self, i: int, st: DeviceState) -> float:
        return self.scenario.devices[i].memory_gb - st.ext_mem_gb

    def own_usage(self, t: float) -> tuple[dict[int, float], dict[int, float]]:
        """This run's (busy, memory MB) as of virtual time ``t``: after the last step that
        ended at or before ``t`` (what a monitor lagging behind the truth shows)."""
        h = self.history
        k = len(h) - 1
        while k > 0 and h[k][0] > t:
            k -= 1
        return h[k][1], h[k][2]

    def _record(self) -> None:
        lag = self.scenario.monitor_lag_s
        now = self.clock.now()
        self.history.append((now, dict(self.busy), dict(self.mem_mb)))
        # keep the newest entry at or before the oldest time a monitor may still ask about
        while len(self.history) > 2 and self.history[1][0] <= now - lag:
            self.history.pop(0)

    # -- a step ---------------------------------------------------------------------------
    def run(self, layout: Sequence[Sequence[int]], primary: int, names: Sequence[str]) -> FleetStep:
        """Simulate micro-steps with per-position chunks ``layout[j][i]``; does not move the
        clock. Stops at the first fault (failure first, then out of memory)."""
        states = [self.state(i) for i in range(self.n)]
        out = FleetStep(micro_batches=len(layout))
        for j, chunks in enumerate(layout):
            used = [i for i in range(self.n) if chunks[i] > 0]
            compute = {i: self._compute_ms(i, chunks[i], states[i], True) for i in used}
            extra = self.scenario.primary_extra_ms
            times = {
                i: (ms + (extra if i == primary else 0.0)) / 1000.0 for i, ms in compute.items()
            }
            micro = max(times.values(), default=0.0) + self.comm_s(len(used))
            failed = [i for i in used if states[i].failed]
            if failed:
                i = failed[0]
                out.fault = DeviceFailure(f"{names[i]}: simulated device failure", device=i)
                out.fault_micro = j
                out.wall_s += micro
                return out
            for i in used:
                need = self.need_gb(chunks[i], i == primary)
                avail = self.available_gb(i, states[i])
                if need > avail:
                    out.fault = OutOfMemory(
                        f"{names[i]}: simulated CUDA out of memory "
                        f"({need:.1f} GB needed, {max(avail, 0.0):.1f} GB free)",
                        device=i,
                    )
                    out.fault_micro = j
                    out.wall_s += 0.5 * micro
                    self.mem_mb = {}  # the engine frees its cached blocks after an OOM
                    return out
            for i in used:
                phases = out.phase_s.setdefault(i, {})
                for name, sec in self.reported_phases(i, compute[i], i == primary).items():
                    phases[name] = phases.get(name, 0.0) + sec
                out.device_time_s[i] = sum(phases.values())
                out.true_time_s[i] = out.true_time_s.get(i, 0.0) + times[i]
                out.device_batch[i] = out.device_batch.get(i, 0) + chunks[i]
                mb = 1024.0 * self.need_gb(chunks[i], i == primary)
                out.peak_mem_mb[i] = max(out.peak_mem_mb.get(i, 0.0), mb)
            out.wall_s += micro
        if out.wall_s > 0:
            self.busy = {i: min(1.0, t / out.wall_s) for i, t in out.true_time_s.items()}
        self.mem_mb = dict(out.peak_mem_mb)
        return out

    def after_step(self) -> None:
        """Called once the clock moved past a step: remember this run's usage for the
        (possibly lagging) monitor."""
        self._record()
