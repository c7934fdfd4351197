"""What the loop does once per committed optimizer step and once per epoch besides
training: the user's callbacks, and evaluation (timed apart from training, recorded in the
history, announced as an event, then the plateau scheduler and ``on_eval``)."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from ..events import EventKind

if TYPE_CHECKING:
    from .loop import Run

__all__ = ["after_epoch", "after_step", "evaluate"]


def after_step(run: Run) -> None:
    """Once per committed step: the callbacks, then an evaluation when one is due."""
    training = run.training
    if training.callbacks.items:
        loss = float(run._last_loss) if run._last_loss is not None else None
        training.callbacks.step_end(run.step, loss, training.history)
    if training.evaluator.due_after_step(run.step):
        evaluate(run)


def after_epoch(run: Run, epoch: int) -> None:
    """Once per epoch that went through: evaluation (unless every N steps), the
    per-epoch scheduler step, ``on_epoch_end``."""
    training = run.training
    if training.evaluator.due_after_epoch():
        evaluate(run)
    training.schedule.after_epoch()
    training.callbacks.epoch_end(epoch, training.history)


def evaluate(run: Run) -> None:
    """The user's evaluation (eval mode, no grad; training mode again after)."""
    training = run.training
    t0, real0 = run._now(), time.perf_counter()
    metrics = training.evaluator.run(run.model)
    run._eval_s += run._now() - t0
    run._eval_real_s += time.perf_counter() - real0
    training.history.eval_s = run._eval_s
    training.history.record_eval(run.step, run.epoch, metrics)
    shown = ", ".join(f"{k} {v:.4g}" for k, v in metrics.items())
    run._event(EventKind.EVAL, f"{training.evaluator.name} after step {run.step}: {shown}")
    training.schedule.after_eval(metrics, training.evaluator.name)
    training.callbacks.eval(metrics)
