"""What plain ``nn.DataParallel`` (the equal split) would take, predicted with the same
models at every re-plan as the plan in force: the report's "speed-up vs static" figure."""

from __future__ import annotations

import math
from collections.abc import Sequence

from ..layout import Plan
from .planner import DeviceModel, Overhead, evaluate, static_plan

__all__ = ["StaticComparison"]


class StaticComparison:
    def __init__(self) -> None:
        self.static_t: list[float] = []  # predicted step time of the equal split
        self.chosen_t: list[float] = []  # predicted step time of the plan in force
        self.static_oom = 0  # re-plans at which the equal split would not fit in memory

    def record(
        self, plan: Plan, ordered: Sequence[DeviceModel], n: int, batch: int, overhead: Overhead
    ) -> None:
        """Predict what the equal split over every working device would take now."""
        positions = [m.position for m in ordered]
        equal = static_plan(positions, n, batch)  # no caps: plain DataParallel has none
        if equal is None or equal.micro_batches != 1:
            return
        t_static = evaluate(equal, ordered, overhead, batch)
        t_chosen = evaluate(plan, ordered, overhead, batch)
        if math.isinf(t_static):
            self.static_oom += 1
        elif not math.isinf(t_chosen):
            self.static_t.append(t_static)
            self.chosen_t.append(t_chosen)

    def summary(self, batch: int) -> dict[str, object]:
        out: dict[str, object] = {"static_split_would_oom_ticks": self.static_oom}
        if self.static_t and batch:
            static_s = sum(self.static_t) / len(self.static_t)
            chosen_s = sum(self.chosen_t) / len(self.chosen_t)
            out["static_samples_per_s_predicted"] = round(batch / static_s, 2)
            out["speedup_vs_static_predicted"] = round(static_s / chosen_s, 3)
        return out
