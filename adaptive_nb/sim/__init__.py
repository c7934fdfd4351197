"""Simulated GPU fleets: run the real controller (and, optionally, the real model on the
CPU) against a scenario on a virtual clock. Everything it reports is labelled simulated.

The truth need not be the planner's model (schema v2, :mod:`.schema`): per-batch timing
``curve``s, co-tenants whose true ``slowdown`` differs from the utilisation NVML reports,
a ``forward_fraction`` that the engine's measurement method may get wrong, and a monitor
that reports ``monitor_lag_s`` late (:mod:`.fleet`, :mod:`.nvml`).

>>> engine, controller, snapshots = build_sim_run("benchmarks/scenarios/mixed_generations.json",
...     policy="adaptive", headroom=0.1, control_interval=2.0)  # doctest: +SKIP
"""

from __future__ import annotations

from pathlib import Path

from ..plan.allocation import AllocationController
from .clock import VirtualClock
from .engine import SimulatedEngine
from .fleet import DeviceState, Fleet, FleetStep
from .nvml import SimSnapshots
from .scenario import Scenario, load_scenario, parse_scenario

__all__ = [
    "DeviceState",
    "Fleet",
    "FleetStep",
    "Scenario",
    "SimSnapshots",
    "SimulatedEngine",
    "VirtualClock",
    "build_sim_run",
    "load_scenario",
    "parse_scenario",
]


def build_sim_run(
    path: str | Path,
    *,
    policy: str,
    headroom: float,
    control_interval: float,
    compute: bool = True,
) -> tuple[SimulatedEngine, AllocationController, SimSnapshots]:
    """Engine, controller and snapshot source for a scenario file (validated first:
    :class:`~adaptive_nb.errors.UsageError` naming the path and the bad field)."""
    scenario = load_scenario(path)
    engine = SimulatedEngine(scenario, compute=compute)
    snapshots = SimSnapshots(engine.fleet, real_host=compute)
    controller = AllocationController(
        engine,
        policy=policy,
        headroom=headroom,
        control_interval=control_interval,
        snapshots=snapshots,
    )
    return engine, controller, snapshots
