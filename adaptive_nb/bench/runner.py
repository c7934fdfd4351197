"""Run a scenario under the adaptive controller and the static baseline *through the real
training loop* (:class:`adaptive_nb.run.loop.Run`: the same retries, device drops, ticks
and report users get), on the model-free simulated engine in virtual time; and under the
oracle, which is an evaluation, not a policy users run."""

from __future__ import annotations

import itertools
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from ..errors import DeviceFailure, OutOfMemory
from ..events import Event
from ..plan.allocation import AllocationController
from ..run.loop import Run
from ..sim.engine import SimulatedEngine
from ..sim.fleet import DeviceState, Fleet
from ..sim.nvml import SimSnapshots
from ..sim.scenario import Scenario
from ..step import StepFn, StepOutcome
from .oracle import METHOD, OraclePlan, oracle_plan

__all__ = ["BaselineFault", "PolicyResult", "compare", "run_oracle", "run_policy"]


class BaselineFault(RuntimeError):
    """The static baseline (plain DataParallel) hit an out-of-memory or a lost device: it
    has no recovery, so its run ends there."""


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
    ended: str = ""
    method: str = ""
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
        if not self.method:
            d.pop("method")
        if events:
            d["events"] = [e.to_dict() for e in self.events]
        return d


class _BenchEngine(SimulatedEngine):
    """The model-free simulated engine, counting every fault it raises and recording
    (virtual s, samples done) after each good step. With ``fatal_faults`` a fault ends
    the run (:class:`BaselineFault`), as it ends a plain DataParallel run."""

    def __init__(self, scenario: Scenario, *, fatal_faults: bool) -> None:
        super().__init__(scenario, compute=False)
        self.fatal_faults = fatal_faults
        self.oom = 0
        self.device_failures = 0
        self.samples = 0
        self.trace: list[tuple[float, int]] = []

    def forward_backward(self, step: StepFn, batch: Any) -> StepOutcome:
        try:
            out = super().forward_backward(step, batch)
        except (OutOfMemory, DeviceFailure) as err:
            if isinstance(err, OutOfMemory):
                self.oom += 1
            else:
                self.device_failures += 1
            if self.fatal_faults:
                raise BaselineFault(str(err)) from err
            raise
        self.samples += out.samples
        self.trace.append((self.clock(), self.samples))
        return out


def _never_called(model: nn.Module, batch: Any) -> torch.Tensor:  # pragma: no cover
    raise AssertionError("the model-free engine never calls the step")


def run_policy(
    scenario: Scenario,
    policy: str,
    *,
    control_interval: float = 2.0,
    headroom: float = 0.1,
    fail_on_fault: bool | None = None,
    backward_estimate: float | None = None,
) -> PolicyResult:
    """``scenario`` under ``policy`` through :class:`~adaptive_nb.run.loop.Run`. The
    static baseline (plain DataParallel) fails at its first fault unless
    ``fail_on_fault=False``. ``backward_estimate``: simulate an engine that times forward
    and estimates backward as that factor × forward (None: the real engine's method)."""
    if fail_on_fault is None:
        fail_on_fault = policy == "static"
    engine = _BenchEngine(scenario, fatal_faults=fail_on_fault)
    if backward_estimate is not None:
        engine.fleet.backward_factor = backward_estimate
    snaps = SimSnapshots(engine.fleet, real_host=False)
    ctl = AllocationController(
        engine,
        policy=policy,
        headroom=headroom,
        control_interval=control_interval,
        snapshots=snaps,
    )
    model = nn.Linear(1, 1, bias=False)  # a placeholder: the model-free engine never runs it
    run = Run(
        _never_called,
        model=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.0),
        data=itertools.repeat(torch.empty(scenario.global_batch, 0), scenario.steps),
        epochs=None,
        steps=scenario.steps,
        engine=engine,
        controller=ctl,
        snapshots=snaps,
        policy=policy,
        headroom=headroom,
        control_interval=control_interval,
        handle_interrupt=False,
    )
    reason = ""
    try:
        run.execute()
    except (BaselineFault, OutOfMemory) as exc:
        reason = str(exc)
    report = run.report
    assert report is not None
    s = report.summary
    virtual_s = engine.clock()
    failed = run.ended != "completed"
    if failed and not reason:
        reason = run.ended
    mape = s.get("prediction_mape_pct")
    return PolicyResult(
        samples_per_s=run.samples / virtual_s if virtual_s > 0 else 0.0,
        failed=failed,
        oom=engine.oom,
        oom_recovered=int(s.get("oom_recovered", 0)),
        device_failures=engine.device_failures,
        steps=run.step,
        virtual_s=virtual_s,
        prediction_mape_pct=float(mape) if isinstance(mape, (int, float)) else None,
        replans=ctl.replans,
        reason=reason,
        ended=run.ended,
        events=list(report.events),
        trace=list(engine.trace),
    )


def run_oracle(scenario: Scenario) -> PolicyResult:
    """The oracle: the best plan for the true state, re-chosen whenever the state changes
    (evaluated on the same fleet, noise included)."""
    fleet = Fleet(scenario)
    names = [f"sim GPU {i} ({d.name})" for i, d in enumerate(scenario.devices)]
    cache: dict[tuple[DeviceState, ...], OraclePlan | None] = {}
    batch = scenario.global_batch
    res = PolicyResult(samples_per_s=0.0, failed=False, oom=0, method=METHOD)
    samples = 0
    for _ in range(scenario.steps):
        states = tuple(fleet.state(i) for i in range(fleet.n))
        if states not in cache:
            cache[states] = oracle_plan(fleet, states, batch)
        plan = cache[states]
        if plan is None:
            res.failed, res.reason = True, "nothing fits"
            break
        sim = fleet.run(plan.layout, plan.primary, names)
        fleet.clock.advance(sim.wall_s)
        if sim.fault is not None:
            res.failed, res.reason = True, str(sim.fault)
            break
        samples += batch
        res.steps += 1
        res.trace.append((fleet.clock.now(), samples))
    res.virtual_s = fleet.clock.now()
    res.samples_per_s = samples / res.virtual_s if res.virtual_s > 0 else 0.0
    res.ended = "failed" if res.failed else "completed"
    return res


def _backward_method(estimate: float | None) -> str:
    return "measured" if estimate is None else f"estimated as {estimate:g} x forward"


def compare(
    scenario: Scenario,
    *,
    control_interval: float = 2.0,
    headroom: float = 0.1,
    backward_estimate: float | None = None,
) -> dict[str, Any]:
    """Adaptive vs static vs oracle: the benchmark's JSON record for one scenario."""
    t = time.perf_counter()
    opts: dict[str, Any] = {
        "control_interval": control_interval,
        "headroom": headroom,
        "backward_estimate": backward_estimate,
    }
    adaptive = run_policy(scenario, "adaptive", **opts)
    static = run_policy(scenario, "static", **opts)
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
        "engine_backward": _backward_method(backward_estimate),
        "bench_wall_s": round(time.perf_counter() - t, 3),
        "_events": adaptive.events,
    }
