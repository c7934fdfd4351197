"""Run a scenario under the adaptive controller, the static baseline and the oracle, in
virtual time and without model compute (the model-free path of the simulated engine)."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any

from ..errors import DeviceFailure, OutOfMemory
from ..events import Event
from ..layout import Plan
from ..plan.allocation import AllocationController
from ..sim.engine import SimulatedEngine
from ..sim.fleet import DeviceState, Fleet
from ..sim.nvml import SimSnapshots
from ..sim.scenario import Scenario
from .oracle import oracle_plan

__all__ = ["PolicyResult", "compare", "run_oracle", "run_policy"]

MAX_RETRIES = 8


@dataclass
class PolicyResult:
    """One policy's run of a scenario (samples/s in virtual time)."""

    samples_per_s: float
    failed: bool
    oom: int
    oom_recovered: int = 0
    device_failures: int = 0
    steps: int = 0
    virtual_s: float = 0.0
    prediction_mape_pct: float | None = None
    replans: int = 0
    reason: str = ""
    events: list[Event] = field(default_factory=list)
    trace: list[tuple[float, int]] = field(default_factory=list)  # (virtual s, samples)

    def rate_until(self, t: float) -> float:
        """Samples/s over the first ``t`` virtual seconds."""
        done = [(tt, n) for tt, n in self.trace if tt <= t]
        if not done or done[-1][0] <= 0:
            return 0.0
        return done[-1][1] / done[-1][0]

    def to_dict(self, events: bool = False) -> dict[str, Any]:
        d = asdict(self)
        d["samples_per_s"] = round(self.samples_per_s, 2)
        d["virtual_s"] = round(self.virtual_s, 3)
        d.pop("events")
        d.pop("trace")
        if events:
            d["events"] = [e.to_dict() for e in self.events]
        return d


def run_policy(
    scenario: Scenario,
    policy: str,
    *,
    control_interval: float = 2.0,
    headroom: float = 0.1,
    fail_on_fault: bool | None = None,
) -> PolicyResult:
    """Drive an :class:`AllocationController` as the training loop does. The static
    baseline (plain DataParallel) fails at its first fault unless ``fail_on_fault=False``."""
    if fail_on_fault is None:
        fail_on_fault = policy == "static"
    engine = SimulatedEngine(scenario, compute=False)
    snaps = SimSnapshots(engine.fleet, real_host=False)
    ctl = AllocationController(
        engine,
        policy=policy,
        headroom=headroom,
        control_interval=control_interval,
        snapshots=snaps,
    )
    batch = scenario.global_batch
    t0 = engine.clock()
    next_tick = 0.0
    res = PolicyResult(samples_per_s=0.0, failed=False, oom=0)
    samples = 0
    for step in range(scenario.steps):
        retries = 0
        outcome = None
        while outcome is None and not res.failed:
            now = engine.clock() - t0
            try:
                outcome = engine.simulate_step(batch)
            except OutOfMemory as err:
                res.oom += 1
                retries += 1
                if fail_on_fault or retries > MAX_RETRIES:
                    res.failed, res.reason = True, str(err)
                    break
                res.events += ctl.on_oom(err, engine.clock() - t0, step)
            except DeviceFailure as err:
                res.device_failures += 1
                retries += 1
                if fail_on_fault or retries > MAX_RETRIES:
                    res.failed, res.reason = True, str(err)
                    break
                try:
                    res.events += ctl.on_device_failure(err, engine.clock() - t0, step)
                except DeviceFailure as fatal:
                    res.failed, res.reason = True, str(fatal)
        if res.failed or outcome is None:
            break
        samples += outcome.samples
        res.steps += 1
        ctl.observe(outcome)
        now = engine.clock() - t0
        res.trace.append((now, samples))
        if now >= next_tick:
            next_tick = now + control_interval
            res.events += ctl.tick(now, step, snaps.latest())
    res.virtual_s = engine.clock() - t0
    res.samples_per_s = samples / res.virtual_s if res.virtual_s > 0 else 0.0
    res.oom_recovered = ctl.oom_recovered
    summary = ctl.summary()
    mape = summary.get("prediction_mape_pct")
    res.prediction_mape_pct = float(mape) if isinstance(mape, (int, float)) else None
    res.replans = ctl.replans
    return res


def run_oracle(scenario: Scenario) -> PolicyResult:
    """The oracle: the best plan for the true state, re-chosen at every step."""
    fleet = Fleet(scenario)
    names = [f"sim GPU {i} ({d.name})" for i, d in enumerate(scenario.devices)]
    cache: dict[tuple[DeviceState, ...], Plan | None] = {}
    batch = scenario.global_batch
    res = PolicyResult(samples_per_s=0.0, failed=False, oom=0)
    samples = 0
    for _ in range(scenario.steps):
        states = tuple(fleet.state(i) for i in range(fleet.n))
        if states not in cache:
            cache[states] = oracle_plan(fleet, states, batch)
        plan = cache[states]
        if plan is None:
            res.failed, res.reason = True, "nothing fits"
            break
        sim = fleet.run(plan.layout(batch), plan.primary, names)
        fleet.clock.advance(sim.wall_s)
        if sim.fault is not None:
            res.failed, res.reason = True, str(sim.fault)
            break
        samples += batch
        res.steps += 1
    res.virtual_s = fleet.clock.now()
    res.samples_per_s = samples / res.virtual_s if res.virtual_s > 0 else 0.0
    return res


def compare(
    scenario: Scenario, *, control_interval: float = 2.0, headroom: float = 0.1
) -> dict[str, Any]:
    """Adaptive vs static vs oracle: the benchmark's JSON record for one scenario."""
    t = time.perf_counter()
    adaptive = run_policy(
        scenario, "adaptive", control_interval=control_interval, headroom=headroom
    )
    static = run_policy(scenario, "static", control_interval=control_interval, headroom=headroom)
    oracle = run_oracle(scenario)
    ratio_o = adaptive.samples_per_s / oracle.samples_per_s if oracle.samples_per_s else None
    # A failed static run is compared over the time it ran (the equal split's best case).
    mine = adaptive.rate_until(static.virtual_s) if static.failed else adaptive.samples_per_s
    ratio_s = mine / static.samples_per_s if static.samples_per_s else None
    return {
        "scenario": scenario.name,
        "simulated": True,
        "adaptive": adaptive.to_dict(),
        "static": static.to_dict(),
        "oracle": oracle.to_dict(),
        "ratio_vs_oracle": None if ratio_o is None else round(ratio_o, 4),
        "ratio_vs_static": None if ratio_s is None else round(ratio_s, 4),
        "static_window_s": round(static.virtual_s, 3) if static.failed else None,
        "bench_wall_s": round(time.perf_counter() - t, 3),
        "_events": adaptive.events,
    }
