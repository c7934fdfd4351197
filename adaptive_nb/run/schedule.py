"""The learning-rate scheduler: stepped once per *applied* optimizer step (or once per
epoch), never per micro-batch, per accumulated batch or per out-of-memory retry, and not
after a step that was skipped (non-finite gradients, or a GradScaler overflow), exactly
as a hand-written loop that calls ``scheduler.step()`` after ``optimizer.step()`` does.
``ReduceLROnPlateau`` is stepped after each evaluation with the metric it watches."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch.optim.lr_scheduler import LRScheduler, ReduceLROnPlateau

from ..errors import UsageError

__all__ = ["INTERVALS", "Schedule", "check_scheduler"]

INTERVALS = ("step", "epoch")


def check_scheduler(
    scheduler: Any,
    interval: str | None,
    metric: str | None,
    *,
    optimizer: torch.optim.Optimizer,
    has_evaluate: bool,
    name: str = "scheduler",
) -> str:
    """Check the scheduler options (UsageError naming the option); returns the interval."""
    if scheduler is None:
        if interval is not None:
            raise UsageError(
                f"scheduler_interval={interval!r} (--scheduler-interval) was given without a "
                "scheduler: pass scheduler=… (--scheduler NAME) too, or drop it."
            )
        if metric is not None:
            raise UsageError(
                f"scheduler_metric={metric!r} (--scheduler-metric) was given without a "
                "scheduler: pass a ReduceLROnPlateau as scheduler=… (--scheduler NAME)."
            )
        return "step"
    if not isinstance(scheduler, (LRScheduler, ReduceLROnPlateau)):
        raise UsageError(
            f"`{name}` is a {type(scheduler).__name__}, not a learning-rate scheduler: pass "
            "one from torch.optim.lr_scheduler built on the optimizer, e.g. "
            "`sched = torch.optim.lr_scheduler.StepLR(opt, step_size=10)`."
        )
    if getattr(scheduler, "optimizer", None) is not optimizer:
        raise UsageError(
            f"`{name}` schedules a different optimizer than the one being trained: build it "
            "on the optimizer you pass as optimizer=… (--optimizer)."
        )
    if isinstance(scheduler, ReduceLROnPlateau):
        if interval is not None:
            raise UsageError(
                f"`{name}` is a ReduceLROnPlateau, which is stepped after each evaluation "
                "(every epoch, or every eval_every=/--eval-every steps): drop "
                "scheduler_interval (--scheduler-interval)."
            )
        if not metric or not isinstance(metric, str):
            raise UsageError(
                f"`{name}` is a ReduceLROnPlateau: name the evaluation metric it watches with "
                "scheduler_metric='val_loss' (--scheduler-metric val_loss)."
            )
        if not has_evaluate:
            raise UsageError(
                f"`{name}` is a ReduceLROnPlateau, which needs evaluation metrics: pass "
                "evaluate=fn (--eval NAME), a function fn(model) -> {'val_loss': …}."
            )
        return "eval"
    if metric is not None:
        raise UsageError(
            f"scheduler_metric={metric!r} (--scheduler-metric) is only for ReduceLROnPlateau; "
            f"`{name}` is a {type(scheduler).__name__}, which takes no metric: drop it."
        )
    if interval is None:
        return "step"
    if interval not in INTERVALS:
        raise UsageError(
            f"scheduler_interval={interval!r} (--scheduler-interval) is not understood: "
            "use 'step' (after every optimizer step) or 'epoch' (after every epoch)."
        )
    return interval


class Schedule:
    """Steps ``scheduler`` at the points its ``interval`` ("step", "epoch", "eval") names."""

    def __init__(self, scheduler: Any, interval: str, metric: str | None) -> None:
        self.scheduler = scheduler
        self.interval = interval
        self.metric = metric

    def after_step(self) -> None:
        """After an applied optimizer step."""
        if self.scheduler is not None and self.interval == "step":
            self.scheduler.step()

    def after_epoch(self) -> None:
        if self.scheduler is not None and self.interval == "epoch":
            self.scheduler.step()

    def after_eval(self, metrics: Mapping[str, float], evaluate_name: str) -> None:
        if self.scheduler is None or self.interval != "eval":
            return
        assert self.metric is not None
        if self.metric not in metrics:
            raise UsageError(
                f"scheduler_metric={self.metric!r} (--scheduler-metric) is not among the "
                f"metrics `{evaluate_name}` returned ({', '.join(sorted(metrics)) or 'none'}): "
                "return it from the evaluation function or name one of those."
            )
        self.scheduler.step(metrics[self.metric])
