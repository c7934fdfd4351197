"""Test doubles and a builder for runs of the real loop with a chosen engine and
controller: an engine that fails with out-of-memory a set number of times per step, a
controller that recovers every OOM, and :func:`static_run`, a ``loop.Run`` with the
static policy and the given training options."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from adaptive_nb.engine.cpu import CpuEngine
from adaptive_nb.errors import OutOfMemory
from adaptive_nb.events import Event, EventKind
from adaptive_nb.monitor.snapshot import Snapshot
from adaptive_nb.plan.base import Controller
from adaptive_nb.run import loop
from adaptive_nb.run.training import Training, TrainingOptions
from adaptive_nb.step import StepFn, StepOutcome

__all__ = ["OomEngine", "Planner", "static_run"]


class OomEngine(CpuEngine):
    """Raises out-of-memory on the first ``fail`` attempts of every step."""

    def __init__(self, fail: int) -> None:
        super().__init__()
        self.fail = fail
        self._left = fail
        self.attempts = 0

    def forward_backward(self, step: StepFn, batch: Any) -> StepOutcome:
        self.attempts += 1
        if self._left > 0:
            self._left -= 1
            raise OutOfMemory("simulated out of memory", device=0)
        self._left = self.fail
        return super().forward_backward(step, batch)


class Planner(Controller):
    """Emits the given events at the first tick; recovers every OOM with one event."""

    def __init__(self, first_tick: list[str] | None = None) -> None:
        self._first = first_tick or []

    def observe(self, outcome: StepOutcome) -> None:
        pass

    def tick(self, now: float, step: int, snapshot: Snapshot | None) -> list[Event]:
        out = [Event(now, kind, f"{kind} decision", step) for kind in self._first]
        self._first = []
        return out

    def on_oom(self, error: OutOfMemory, now: float, step: int) -> list[Event]:
        return [Event(now, EventKind.OOM, "one more micro-batch", step)]

    def set_device_enabled(
        self, position: int, enabled: bool, now: float, step: int
    ) -> list[Event]:
        return [Event(now, EventKind.REALLOCATE, "shares moved off the excluded device", step)]


def static_run(
    step: StepFn,
    model: nn.Module,
    opt: torch.optim.Optimizer,
    data: Any,
    engine: Any,
    options: TrainingOptions,
    *,
    epochs: int = 1,
    controller: Controller | None = None,
    scaler: Any = None,
) -> loop.Run:
    """The real loop on ``engine`` over ``epochs`` passes of ``data``, static policy,
    with the training options checked by ``check_training_options``."""
    return loop.Run(
        step,
        model=model,
        optimizer=opt,
        data=data,
        epochs=epochs,
        steps=None,
        engine=engine,
        controller=controller if controller is not None else Planner(),
        snapshots=None,
        policy="static",
        headroom=0.1,
        training=Training(options, opt, device_type="cpu", scaler=scaler),
    )
