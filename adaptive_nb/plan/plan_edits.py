"""Small edits and read-outs of a :class:`~adaptive_nb.layout.Plan` the allocation
controller makes between planner calls (kept apart so the controller stays readable)."""

from __future__ import annotations

import dataclasses
import math

from ..layout import Plan

__all__ = ["add_micro_batch", "gain_text", "same_layout", "with_prediction"]


def with_prediction(plan: Plan, t: float) -> Plan:
    return dataclasses.replace(plan, predicted_step_s=None if math.isinf(t) else t)


def same_layout(a: Plan, b: Plan) -> bool:
    if a.devices != b.devices or a.micro_batches != b.micro_batches or a.batch != b.batch:
        return False
    try:
        return a.chunks() == b.chunks()
    except ValueError:
        return False


def add_micro_batch(plan: Plan, batch: int) -> Plan:
    micro_batches = min(max(batch, 1), plan.micro_batches + 1)
    return dataclasses.replace(
        plan, micro_batches=micro_batches, batch=batch, predicted_step_s=None
    )


def gain_text(old_t: float | None, new: Plan) -> str:
    if old_t is None or math.isinf(old_t) or not new.predicted_step_s:
        return ""
    return f" (predicted step {old_t:.3f} s → {new.predicted_step_s:.3f} s)"
