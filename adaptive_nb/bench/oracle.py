"""The benchmark's oracle: knows the fleet's true state at every step and picks the best
device subset, primary, split and micro-batch count for it."""

from __future__ import annotations

import math

from ..layout import Plan
from ..plan.planner import DeviceModel, Overhead, best_plan
from ..sim.fleet import DeviceState, Fleet

__all__ = ["oracle_plan"]


def oracle_plan(fleet: Fleet, states: tuple[DeviceState, ...], batch: int) -> Plan | None:
    """Best plan for the true state (exact device speeds and memory, no headroom)."""
    sc = fleet.scenario
    overhead = Overhead(sc.comm.alpha_ms / 1000.0, sc.comm.per_device_ms / 1000.0)
    healthy = [i for i, st in enumerate(states) if not st.failed]
    best: Plan | None = None
    for p in healthy:
        models = []
        for i in healthy:
            d, st = sc.devices[i], states[i]
            slow = 1.0 / max(1e-6, 1.0 - st.util)
            alpha = d.alpha_ms * slow / 1000.0 + (sc.primary_extra_ms / 1000.0 if i == p else 0.0)
            beta = slow / d.samples_per_s
            room = fleet.available_gb(i, st) - fleet.need_gb(0, i == p)
            per = sc.job.mem_per_sample_gb
            cap: int | None
            if room < 0:
                cap = 0
            elif per > 0:
                cap = math.floor(room / per + 1e-9)
            else:
                cap = None
            if cap == 0:
                if i == p:
                    break
                continue
            models.append(DeviceModel(i, alpha, beta, cap))
        else:
            plan = best_plan(models, fleet.n, batch, overhead, primary=p)
            if plan is not None and (
                best is None or (plan.predicted_step_s or 0) < (best.predicted_step_s or 0)
            ):
                best = plan
    return best
