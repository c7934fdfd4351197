"""What the loop does once per committed optimizer step and once per epoch besides
training: the user's callbacks, and evaluation (timed apart from training, recorded in the
history, announced as an event, then the plateau scheduler and ``on_eval``)."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from ..events import Event, EventKind

if TYPE_CHECKING:
    from .loop import Run

__all__ = ["after_epoch", "after_step", "evaluate", "resume", "save_checkpoint"]


def after_step(run: Run) -> None:
    """Once per committed step: the callbacks, then an evaluation when one is due."""
    training = run.training
    if training.callbacks.items:
        loss = float(run._last_loss) if run._last_loss is not None else None
        training.callbacks.step_end(run.step, loss, training.history)
    if training.evaluator.due_after_step(run.step):
        evaluate(run)
    if training.checkpoints.due_after_step(run.step):
        save_checkpoint(run)


def after_epoch(run: Run, epoch: int) -> None:
    """Once per epoch that went through: evaluation (unless every N steps), the
    per-epoch scheduler step, ``on_epoch_end``."""
    training = run.training
    if training.evaluator.due_after_epoch():
        evaluate(run)
    training.schedule.after_epoch()
    training.callbacks.epoch_end(epoch, training.history)
    training.checkpoints.end_epoch(epoch)
    if training.checkpoints.due_after_epoch():
        save_checkpoint(run)


def save_checkpoint(run: Run) -> None:
    """Write a checkpoint now (if checkpointing and not written at this point already)."""
    path = run.training.checkpoints.save(run)
    if path is not None:
        run._event(EventKind.NOTICE, f"checkpoint written: {path}")


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
    detail = f"{training.evaluator.name} after step {run.step}: {shown}"
    numbers = {str(k): float(v) for k, v in metrics.items()}
    run._events([Event(round(run._now(), 3), EventKind.EVAL, detail, run.step, numbers)])
    training.schedule.after_eval(metrics, training.evaluator.name)
    training.callbacks.eval(metrics)


def resume(run: Run) -> None:
    """Before the first step: load the checkpoint being resumed, and say so."""
    ckpt = run.training.checkpoints
    if ckpt.options.resume_missing:
        run._event(
            EventKind.NOTICE,
            f"no checkpoint in {ckpt.options.directory} yet: training from step 0",
        )
    if ckpt.resume is None:
        return
    ckpt.apply(run)
    epoch, position = ckpt.skip_to()
    run._event(
        EventKind.NOTICE,
        f"resumed from {ckpt.options.resume_path} at step {run.step} (epoch {epoch}, "
        f"{position} batches of it done)",
    )
