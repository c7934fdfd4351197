"""The simulated fleet's ground truth: what each device does at a given virtual time.

Semantics (one micro-step, ``k`` devices, chunk ``b_i`` on device ``i``):
``t_i = (alpha_ms + 1000·b_i/samples_per_s) / (1 − external_util) · noise`` ms, plus
``primary_extra_ms`` on the primary; the micro-step takes ``max t_i`` plus
``comm.alpha_ms + comm.per_device_ms·(k−1)``. A device needs
``mem_base_gb + mem_per_sample_gb·b_i`` (+ ``primary_extra_gb`` on the primary) and runs
out of memory when that exceeds ``memory_gb − external_mem_gb``. A failed device errors on
every use. The state at the start of a step holds for the whole step.
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
    util: float  # external utilisation 0..1
    ext_mem_gb: float
    failed: bool


@dataclass
class FleetStep:
    """One simulated step: per-device compute seconds and samples, peak memory (MB), wall
    seconds; ``fault`` is set when the step failed (``wall_s`` is then the time wasted)."""

    device_time_s: dict[int, float] = field(default_factory=dict)
    device_batch: dict[int, int] = field(default_factory=dict)
    peak_mem_mb: dict[int, float] = field(default_factory=dict)
    wall_s: float = 0.0
    micro_batches: int = 1
    fault: OutOfMemory | DeviceFailure | None = None
    fault_micro: int = -1


class Fleet:
    """Ground truth of a scenario on a virtual clock, with seeded noise."""

    def __init__(self, scenario: Scenario, clock: VirtualClock | None = None) -> None:
        self.scenario = scenario
        self.clock = clock or VirtualClock()
        self.rng = random.Random(scenario.seed)
        self.n = len(scenario.devices)
        self.busy: dict[int, float] = {}  # position -> busy fraction in the last step
        self.mem_mb: dict[int, float] = {}  # position -> this run's memory in the last step

    # -- truth ----------------------------------------------------------------------------
    def state(self, i: int, t: float | None = None) -> DeviceState:
        now = self.clock.now() if t is None else t
        free = 1.0
        mem = 0.0
        for e in self.scenario.loads:
            if e.device == i and e.active(now):
                free *= 1.0 - e.external_util
                mem += e.external_mem_gb
        failed = any(f.device == i and f.at_s <= now for f in self.scenario.failures)
        return DeviceState(1.0 - free, mem, failed)

    def compute_s(self, i: int, b: int, primary: bool, st: DeviceState, noisy: bool) -> float:
        d = self.scenario.devices[i]
        ms = (d.alpha_ms + 1000.0 * b / d.samples_per_s) / max(1e-6, 1.0 - st.util)
        if noisy and self.scenario.noise > 0:
            ms *= max(0.2, 1.0 + self.rng.gauss(0.0, self.scenario.noise))
        if primary:
            ms += self.scenario.primary_extra_ms
        return ms / 1000.0

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

    # -- a step ---------------------------------------------------------------------------
    def run(self, layout: Sequence[Sequence[int]], primary: int, names: Sequence[str]) -> FleetStep:
        """Simulate micro-steps with per-position chunks ``layout[j][i]``; does not move the
        clock. Stops at the first fault (failure first, then out of memory)."""
        states = [self.state(i) for i in range(self.n)]
        out = FleetStep(micro_batches=len(layout))
        for j, chunks in enumerate(layout):
            used = [i for i in range(self.n) if chunks[i] > 0]
            times = {i: self.compute_s(i, chunks[i], i == primary, states[i], True) for i in used}
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
                out.device_time_s[i] = out.device_time_s.get(i, 0.0) + times[i]
                out.device_batch[i] = out.device_batch.get(i, 0) + chunks[i]
                mb = 1024.0 * self.need_gb(chunks[i], i == primary)
                out.peak_mem_mb[i] = max(out.peak_mem_mb.get(i, 0.0), mb)
            out.wall_s += micro
        if out.wall_s > 0:
            self.busy = {i: min(1.0, t / out.wall_s) for i, t in out.device_time_s.items()}
        self.mem_mb = dict(out.peak_mem_mb)
        return out
