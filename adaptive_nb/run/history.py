"""The training history of one run: the learning rate and gradient norm of every optimizer
step, each evaluation's metrics, and the steps that were skipped (and why).

Kept apart from the per-tick :class:`~adaptive_nb.events.TickRecord`: these are per
*optimizer step* (or per evaluation), whatever the control interval, and they go into the
:class:`~adaptive_nb.run.report.RunReport` (``lr``, ``grad_norm``, ``evaluations``) and its
summary. Callbacks receive the live history (``on_step_end(step, loss, history)``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

__all__ = ["TrainingHistory"]


@dataclass
class TrainingHistory:
    """Per-step records. ``lr[k]`` is the learning rate (of the first parameter group) that
    step ``k + 1`` was applied with; ``grad_norm[k]`` its total gradient norm before clipping
    (only with ``clip_grad_norm``; None where the norm was not finite and the step was
    skipped); ``evaluations``: ``{"step", "epoch", "metrics"}`` per evaluation."""

    lr: list[float] = field(default_factory=list)
    grad_norm: list[float | None] = field(default_factory=list)
    evaluations: list[dict[str, Any]] = field(default_factory=list)
    nonfinite_skipped_steps: int = 0
    amp_skipped_steps: int = 0
    eval_s: float = 0.0

    def record_step(self, lr: float, norm: float | None, clipping: bool) -> None:
        self.lr.append(lr)
        if clipping:
            self.grad_norm.append(norm if norm is not None and math.isfinite(norm) else None)

    def record_eval(self, step: int, epoch: int, metrics: dict[str, float]) -> None:
        self.evaluations.append({"step": step, "epoch": epoch, "metrics": dict(metrics)})

    def summary(self) -> dict[str, Any]:
        """The history's headline figures for ``RunReport.summary``."""
        norms = [n for n in self.grad_norm if n is not None]
        return {
            "lr_first": self.lr[0] if self.lr else None,
            "grad_norm_max": max(norms) if norms else None,
            "grad_norm_last": norms[-1] if norms else None,
            "nonfinite_skipped_steps": self.nonfinite_skipped_steps,
            "amp_skipped_steps": self.amp_skipped_steps,
            "evaluations": len(self.evaluations),
            "last_metrics": dict(self.evaluations[-1]["metrics"]) if self.evaluations else None,
            "eval_s": round(self.eval_s, 4),
        }
