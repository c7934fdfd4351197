"""The training-loop options of a run (scheduler, clipping, precision, evaluation,
callbacks, accumulation): checked together before anything runs, then composed into the
one place where an optimizer step is applied.

Per optimizer step the loop runs forward/backward of each accumulated batch (the step
function wrapped here: autocast around the body; the loss weighted for accumulation and
scaled for fp16), then :meth:`Training.commit`: unscale (fp16), clip, ``optimizer.step``
(skipped for non-finite gradients), ``scaler.update``, ``scheduler.step`` (only after an
applied step) and the history record.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..events import EventKind
from ..step import StepFn
from .accumulate import GradBuffer, check_accumulate
from .callbacks import Callbacks, check_callbacks
from .checkpoint import Checkpointing, CheckpointOptions, check_checkpoint_options
from .clipping import check_clip, clip_gradients
from .evaluation import Evaluator, check_evaluate
from .history import TrainingHistory
from .precision import Precision, Scaler, check_precision
from .schedule import Schedule, check_scheduler

__all__ = ["Commit", "Training", "TrainingOptions", "check_training_options"]


@dataclass(frozen=True)
class TrainingOptions:
    """Checked training-loop options (the defaults are a plain loop)."""

    scheduler: Any = None
    scheduler_interval: str = "step"  # "step" | "epoch" | "eval" (ReduceLROnPlateau)
    scheduler_metric: str | None = None
    clip_grad_norm: float | None = None
    precision: str = "fp32"
    evaluate: Callable[[nn.Module], dict[str, float]] | None = None
    eval_every: int | None = None
    callbacks: tuple[Any, ...] = ()
    accumulate: int = 1
    evaluate_name: str = "evaluate"
    checkpoint: CheckpointOptions = field(default_factory=CheckpointOptions)


def check_training_options(
    *,
    optimizer: torch.optim.Optimizer,
    device_kind: str,
    names: Mapping[str, str] | None = None,
    scheduler: Any = None,
    scheduler_interval: Any = None,
    scheduler_metric: Any = None,
    clip_grad_norm: Any = None,
    precision: Any = "fp32",
    evaluate: Any = None,
    eval_every: Any = None,
    callbacks: Any = None,
    accumulate: Any = 1,
    model: nn.Module | None = None,
    checkpoint_dir: Any = None,
    checkpoint_every: Any = None,
    keep: Any = None,
    resume: Any = None,
) -> TrainingOptions:
    """Every option checked (UsageError naming the option and the fix); changes nothing."""
    names = names or {}
    eval_name = names.get("evaluate", getattr(evaluate, "__name__", "evaluate"))
    every = check_evaluate(evaluate, eval_every, eval_name)
    interval = check_scheduler(
        scheduler,
        scheduler_interval,
        scheduler_metric,
        optimizer=optimizer,
        has_evaluate=evaluate is not None,
        name=names.get("scheduler", "scheduler"),
    )
    checked_precision = check_precision(precision, device_kind)
    checkpoint = check_checkpoint_options(
        directory=checkpoint_dir,
        every=checkpoint_every,
        keep=keep,
        resume=resume,
        model=model if model is not None else nn.Module(),
        optimizer=optimizer,
        scheduler=scheduler,
        fp16=checked_precision == "fp16",
    )
    return TrainingOptions(
        scheduler=scheduler,
        scheduler_interval=interval,
        scheduler_metric=scheduler_metric,
        clip_grad_norm=check_clip(clip_grad_norm),
        precision=checked_precision,
        evaluate=evaluate,
        eval_every=every,
        callbacks=check_callbacks(callbacks, names.get("callbacks", "callbacks")),
        accumulate=check_accumulate(accumulate),
        evaluate_name=eval_name,
        checkpoint=checkpoint,
    )


def _run(update: Callable[[], object]) -> None:
    update()


@dataclass(frozen=True)
class Commit:
    """What :meth:`Training.commit` did: ``applied`` False when the step was skipped."""

    applied: bool
    event_kind: str = ""
    detail: str = ""


class Training:
    """The runtime side of :class:`TrainingOptions` for one run."""

    def __init__(
        self,
        options: TrainingOptions,
        optimizer: torch.optim.Optimizer,
        *,
        device_type: str,
        scaler: Scaler | None = None,
    ) -> None:
        self.options = options
        self.optimizer = optimizer
        self.history = TrainingHistory()
        self.precision = Precision(options.precision, device_type, scaler)
        self.schedule = Schedule(
            options.scheduler, options.scheduler_interval, options.scheduler_metric
        )
        self.evaluator = Evaluator(options.evaluate, options.eval_every, options.evaluate_name)
        self.callbacks = Callbacks(options.callbacks)
        self.accumulate = options.accumulate
        self.buffer = GradBuffer(optimizer) if options.accumulate > 1 else None
        self.checkpoints = Checkpointing(options.checkpoint)
        self._weight = 1.0

    # -- the step function -----------------------------------------------------------------
    def wrap_body(self, step: StepFn) -> StepFn:
        """The user's step under autocast (for bf16/fp16), before the loss is checked."""
        return self.precision.wrap_body(step)

    def wrap_loss(self, step: StepFn) -> StepFn:
        """The checked step whose loss is weighted (accumulation) and scaled (fp16)."""
        scale = self.precision.scale_loss()
        if self.accumulate == 1 and scale is None:
            return step

        def weighted(model: nn.Module, batch: Any) -> torch.Tensor:
            loss = step(model, batch)
            if self._weight != 1.0:
                loss = loss * self._weight
            return loss if scale is None else scale(loss)

        return weighted

    def set_weight(self, weight: float) -> None:
        """The share of the current batch in its accumulation group (``b_i / Σb``)."""
        self._weight = weight

    def after_batch(self) -> None:
        """A batch of an accumulation group finished its backward."""
        if self.buffer is not None:
            self.buffer.stash()

    def report_loss(self, losses: list[torch.Tensor | float]) -> torch.Tensor | float:
        """The group's mean loss, unscaled, from the (weighted, scaled) losses returned
        (by the scale they were computed with, before the commit's ``scaler.update()``)."""
        if len(losses) == 1:
            total = losses[0]
        elif all(isinstance(x, float) for x in losses):
            total = sum(losses)
        else:
            total = torch.stack([torch.as_tensor(x) for x in losses]).sum()
        factor = self.precision.step_scale
        return total if factor == 1.0 else total / factor

    # -- the optimizer step ----------------------------------------------------------------
    def commit(self, apply: Callable[[Callable[[], object]], None] = _run) -> Commit:
        """Apply the optimizer step for the gradients accumulated (see the module doc);
        ``apply(update)`` runs ``optimizer.step`` (or ``scaler.step``) exactly once."""
        opt = self.optimizer
        if self.buffer is not None:
            self.buffer.restore()
        lr = float(opt.param_groups[0]["lr"])
        max_norm = self.options.clip_grad_norm
        norm: float | None = None
        if max_norm is not None:
            self.precision.unscale(opt)
            norm = clip_gradients(opt, max_norm)
        if self.precision.scaler is not None:
            applied, detail = self.precision.step(opt, apply)
            result = Commit(applied, "" if applied else EventKind.NONFINITE, detail)
            if not applied:
                self.history.amp_skipped_steps += 1
        elif norm is not None and not math.isfinite(norm):
            opt.zero_grad(set_to_none=True)
            self.history.nonfinite_skipped_steps += 1
            result = Commit(
                False,
                EventKind.NONFINITE,
                f"gradient norm is {norm}: step skipped (model and optimizer unchanged); "
                "look for a NaN/inf loss or lower the learning rate",
            )
        else:
            self.precision.step(opt, apply)
            result = Commit(True)
        self.history.record_step(lr, norm, clipping=max_norm is not None)
        if result.applied:
            self.schedule.after_step()
        return result

    def summary(self) -> dict[str, Any]:
        groups = [float(g["lr"]) for g in self.optimizer.param_groups]
        out: dict[str, Any] = {
            "lr_final": groups[0] if groups else None,
            "precision": self.options.precision,
            "accumulate": self.accumulate,
        }
        if len(set(groups)) > 1:
            out["lr_final_groups"] = groups
        out.update(self.history.summary())
        ckpt = self.checkpoints
        if ckpt.enabled or ckpt.options.resume_path is not None:
            out["checkpoints_written"] = len(ckpt.written)
            out["last_checkpoint"] = str(ckpt.written[-1]) if ckpt.written else None
            resumed = ckpt.options.resume_path
            out["resumed_from"] = str(resumed) if resumed is not None else None
            out["resumed_from_step"] = int(ckpt.resume["step"]) if ckpt.resume else 0
        return out
