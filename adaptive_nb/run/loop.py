"""The control loop: runs the user's step over the data, applying the allocation that the
controller chooses, and produces a :class:`~adaptive_nb.report.RunReport`.

Per optimizer step: apply control requests (pause/stop/policy...) at the step boundary,
zero_grad, forward+backward on the engine of each batch of the step (one, or
``accumulate`` loader batches; retrying the same batch after a recovered out-of-memory or
a dropped device), then the step applied exactly once (:meth:`.training.Training.commit`:
unscale, clip, ``optimizer.step``, scheduler), record the measurement, call the user's
callbacks, evaluate when due. Every ``control_interval`` seconds (engine clock) the
controller re-plans.

Why ~470 lines: :class:`Run` is the run's state and lifecycle (start, pause, stop, interrupt,
finish) in one place; everything that stands alone is in its own module (``attempt``,
``stepping``, ``batching``, ``step_hooks``, ``records``, ``training``).
"""

from __future__ import annotations

import logging
import math
import signal
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Protocol

import torch
from torch import nn

from ..engine.base import Engine
from ..errors import DeviceFailure, OutOfMemory, UsageError
from ..events import Event, EventKind, RunInfo, TickRecord
from ..monitor.snapshot import SnapshotSource
from ..plan.base import Controller
from ..plan.threads import ThreadController
from ..step import StepFn, StepOutcome
from . import slot
from .attempt import (
    align_optimizer_state,
    apply_optimizer_step,
    checked_step,
    forward_backward,
)
from .batching import batch_stream, next_group
from .callbacks import Callbacks
from .control import RunControl
from .observers import Observer, SafeObservers
from .records import progress_of, record_tick, run_summary
from .report import RunReport
from .rollback import StepRollback
from .step_hooks import after_epoch, after_step, resume, save_checkpoint
from .stepping import train_step
from .training import Training, TrainingOptions

__all__ = ["Run"]

log = logging.getLogger("adaptive_nb")

PROGRESS_HZ = 4.0

# Event kinds by which a controller reports a change of allocation (one decision may emit
# several, e.g. a device left out and the shares moved): each decision is one reallocation.
_ALLOCATION_KINDS = frozenset(
    {
        EventKind.REALLOCATE,
        EventKind.DEVICES,
        EventKind.DEVICE_DROPPED,
        EventKind.DEVICE_READMITTED,
        EventKind.MICROBATCH,
    }
)


def _nothing() -> None:
    pass


class Restarts(Protocol):
    """What brings a run back after a lost device its engine cannot drop (a DDP rank):
    ``begin`` before the first step, ``restart`` after the failure (False: stop)."""

    def begin(self, run: Run) -> None: ...

    def restart(self, run: Run, error: DeviceFailure) -> bool: ...

    def summary(self) -> dict[str, Any]: ...


class Run:
    """One training run: its state, its control mailbox, and (when finished) its report."""

    def __init__(
        self,
        step: StepFn,
        *,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        data: Iterable[Any],
        epochs: int | None,
        steps: int | None,
        engine: Engine,
        controller: Controller,
        snapshots: SnapshotSource | None,
        policy: str,
        headroom: float,
        control: RunControl | None = None,
        observers: Sequence[Observer] = (),
        control_interval: float = 2.0,
        loss_name: str = "loss",
        data_name: str = "data",
        handle_interrupt: bool = True,
        training: Training | None = None,
        restarts: Restarts | None = None,
    ) -> None:
        self.run_id = uuid.uuid4().hex[:12]
        self.training = training or Training(
            TrainingOptions(), optimizer, device_type=engine.primary_device().type
        )
        self.step_fn = self.training.wrap_loss(
            checked_step(self.training.wrap_body(step), loss_name)
        )
        self.model = model
        self.optimizer = optimizer
        self.data = data
        self.epochs = epochs if (epochs is not None or steps is not None) else 1
        self.steps = steps
        self.engine = engine
        self.controller = controller
        self.snapshots = snapshots
        self.policy = policy
        self.headroom = headroom
        self.control = control or RunControl()
        self.control_interval = control_interval
        self.data_name = data_name
        self.handle_interrupt = handle_interrupt
        self.restarts = restarts
        # after a restart, steps and epoch ends up to these ran before (callbacks done)
        self.replay_until = 0
        self.replay_epochs_until = -1
        self.epochs_ended = -1  # the last epoch whose end (hooks) went through
        self.events: list[Event] = []
        self.timeline: list[TickRecord] = []
        self._observers = SafeObservers(observers, self._observer_failed)
        self.step = 0
        self.epoch = 0
        self.samples = 0
        self.ended: str = "not started"
        self.report: RunReport | None = None
        self.oom_recovered = 0
        self.device_failures = 0
        self.reallocations = 0
        self._t0 = 0.0
        self._last_loss: torch.Tensor | float | None = None
        self._rate = 0.0  # samples/s, smoothed
        self._step_s = 0.0  # seconds per step, smoothed
        self._own_s = 0.0  # time spent in adaptive_nb's bookkeeping (real seconds)
        self._wall_real0 = 0.0
        self._paused_s = 0.0  # engine-clock seconds spent paused (not training)
        self._paused_real_s = 0.0
        self._eval_s = 0.0  # engine-clock seconds spent evaluating (not training)
        self._eval_real_s = 0.0
        self._interrupts = 0
        self._in_optimizer_step = False
        self._finishing = False  # a repeated Ctrl-C must not lose the report being built
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._done = threading.Event()
        self._epochs_started = 0
        self._util: dict[str, list[float]] = {}
        self._peak_mem: dict[str, float] = {}
        total = self._total_steps()
        self.info = RunInfo(
            run_id=self.run_id,
            total_steps=total,
            epochs=self.epochs,
            policy=policy,
            devices=engine.device_names(),
            simulated=engine.simulated,
            global_batch=None,
            started_at=time.time(),
        )

    # -- public ---------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        """A small dict describing the run now (safe from any thread)."""
        return {
            "run_id": self.run_id,
            "step": self.step,
            "total_steps": self.info.total_steps,
            "epoch": self.epoch,
            "samples": self.samples,
            "samples_per_s": self._rate,
            "paused": self.control.paused,
            "ended": self.ended,
            "policy": self.controller.policy,
            "devices": self.engine.device_names(),
            "shares": self.controller.shares(),
            "simulated": self.engine.simulated,
            "background": self._thread is not None,
        }

    def wait(self, timeout: float | None = None) -> RunReport:
        """Wait for a background run to finish and return its report (re-raising its error)."""
        if not self._done.wait(timeout):
            raise TimeoutError(f"run {self.run_id} still running after {timeout} s")
        if self._error is not None:
            raise self._error
        assert self.report is not None
        return self.report

    @property
    def done(self) -> bool:
        return self._done.is_set()

    # -- internals ------------------------------------------------------------------------
    def _total_steps(self) -> int | None:
        if self.steps is not None:
            return self.steps
        try:
            n = len(self.data)  # type: ignore[arg-type]
        except TypeError:
            return None
        per_epoch = math.ceil(n / self.training.accumulate)  # groups never span epochs
        return None if self.epochs is None else per_epoch * self.epochs

    def _now(self) -> float:
        return self.engine.clock() - self._t0

    def _event(self, kind: str, detail: str) -> None:
        ev = Event(round(self._now(), 3), kind, detail, self.step)
        self.events.append(ev)
        self._observers.call("on_event", ev)

    def _events(self, events: Iterable[Event]) -> None:
        for ev in events:
            self.events.append(ev)
            self._observers.call("on_event", ev)

    def _decision(self, events: Sequence[Event]) -> None:
        """Log the events of one controller decision and count the reallocation it made
        (each thread-count change counts; a re-plan counts once however many lines)."""
        self._events(events)
        self.reallocations += sum(1 for e in events if e.kind == EventKind.THREADS)
        if any(e.kind in _ALLOCATION_KINDS for e in events):
            self.reallocations += 1

    def _observer_failed(self, detail: str) -> None:
        self.events.append(Event(round(self._now(), 3), EventKind.NOTICE, detail, self.step))

    def _apply_requests(self) -> None:
        req = self.control.take()
        if req.empty():
            return
        now, step = self._now(), self.step
        if req.pause is True:
            self._event(EventKind.PAUSE, f"paused at step {step} (requested)")
        elif req.pause is False:
            self._event(EventKind.RESUME, f"resumed at step {step}")
        if req.policy is not None and req.policy != self.controller.policy:
            old = self.controller.policy
            self._decision(self.controller.set_policy(req.policy, now, step))
            self._event(EventKind.POLICY, f"policy {old} → {req.policy} (requested)")
        if req.headroom is not None and req.headroom != self.controller.headroom:
            old_h = self.controller.headroom
            self._decision(self.controller.set_headroom(req.headroom, now, step))
            self._event(EventKind.HEADROOM, f"memory headroom {old_h:.2f} → {req.headroom:.2f}")
        for pos, enabled in (req.device_enabled or {}).items():
            names = self.engine.device_names()
            name = names[pos] if 0 <= pos < len(names) else f"device {pos}"
            self._decision(self.controller.set_device_enabled(pos, enabled, now, step))
            self._event(
                EventKind.DEVICES, f"{name} {'included' if enabled else 'excluded'} (requested)"
            )
        if req.stop:
            self._event(EventKind.STOP, f"stop requested: stopping after step {step}")

    def _forward_backward(self, batch: Any) -> StepOutcome:
        """Forward + backward of one batch (retried by :func:`.attempt.forward_backward`).
        An out-of-memory counts as recovered only once the batch went through."""
        outcome, ooms = forward_backward(
            lambda: self.engine.forward_backward(self.step_fn, batch),
            self._zero_grad,
            on_oom=self._on_oom,
            on_device_failure=self._on_device_failure,
            rollback=self._rollback,
        )
        self.oom_recovered += ooms
        return outcome

    def _apply_optimizer_step(self, update: Callable[[], object]) -> None:
        """Run the optimizer update (``optimizer.step`` or ``scaler.step``) exactly once
        (:func:`.attempt.apply_optimizer_step` recovers an out-of-memory where exact)."""
        if getattr(self.engine, "owns_optimizer_step", False):
            self.engine.optimizer_step()  # type: ignore[attr-defined]  # the ranks apply it
            return
        timed = self.engine.timed_update(update)  # the engine charges it to the primary
        self.oom_recovered += apply_optimizer_step(self.optimizer, on_oom=self._on_oom, step=timed)

    def _on_oom(self, err: OutOfMemory) -> Sequence[Event]:
        events = self.controller.on_oom(err, self._now(), self.step)
        self._decision(events)
        return events

    def _on_device_failure(self, err: DeviceFailure) -> Sequence[Event]:
        self.device_failures += 1
        if getattr(self.engine, "owns_optimizer_step", False):
            raise err  # a lost rank cannot be dropped without restarting the group: stop
        events = self.controller.on_device_failure(err, self._now(), self.step)
        self._decision(events)
        return events

    def _last_step_now(self) -> bool:
        """No step follows the one about to run (as far as the loop knows now)."""
        stop = self.control.stopped or self.control.paused
        return stop or (self.steps is not None and self.step + 1 >= self.steps)

    def _no_step_follows(self) -> None:
        """Tell an engine that runs the next step ahead (DDP ranks) not to, this time."""
        expect_next = getattr(self.engine, "expect_next", None)
        if expect_next is not None:
            expect_next(None)

    def state_home(self) -> None:
        """Bring the training state into the notebook's model and optimizer where the
        engine holds it elsewhere (DDP ranks): the state of the last completed step."""
        fetch = getattr(self.engine, "fetch_state", None)
        if fetch is not None:
            fetch()

    @contextmanager
    def _callbacks_quiet(self, quiet: bool) -> Iterator[None]:
        """Steps run again after a restart: the user's callbacks already saw them."""
        if not quiet:
            yield
            return
        training = self.training
        kept, training.callbacks = training.callbacks, Callbacks(())
        try:
            yield
        finally:
            training.callbacks = kept

    def _on_sigint(self, signum: int, frame: Any) -> None:
        self._interrupts += 1
        if self._interrupts >= 2 and not (self._in_optimizer_step or self._finishing):
            raise KeyboardInterrupt
        self.control.stop()

    def execute(self) -> RunReport:
        """Run to the end in the calling thread and return the report."""
        try:
            slot.claim(self)
        except UsageError:
            self._abandon()
            raise
        old_handler: Any = None
        install = self.handle_interrupt and threading.current_thread() is threading.main_thread()
        try:
            if install:
                old_handler = signal.signal(signal.SIGINT, self._on_sigint)
            return self._execute()
        finally:
            if install:
                signal.signal(signal.SIGINT, old_handler)
            if isinstance(self.controller, ThreadController):
                self.controller.restore()
            try:
                self.engine.close()
            finally:
                slot.release(self)
                self._done.set()

    def _abandon(self) -> None:
        """The run will never execute: release what it holds and mark it done."""
        self.ended = "not started"
        try:
            self.engine.close()
        finally:
            self._done.set()

    def _execute(self) -> RunReport:
        self.model.train()  # a model left in eval mode would train with BatchNorm frozen
        if getattr(self.engine, "owns_optimizer_step", False):
            # the ranks get the model as it is when they start: the resumed state first
            self.training.checkpoints.apply(self)
        model = self.engine.prepare(self.model)
        align_optimizer_state(self.optimizer)
        if getattr(self.engine, "owns_optimizer_step", False):
            # the ranks hold the training state (engine="ddp"): nothing here to roll back
            self._rollback: StepRollback | None = None
            self._zero_grad: Callable[[], None] = _nothing
        else:  # built once: its buffer copies are reused every step
            self._rollback = StepRollback(self.model, self.optimizer)
            self._zero_grad = lambda: self.optimizer.zero_grad(set_to_none=True)
        wrapped_step = self.step_fn
        self.step_fn = lambda _m, b: wrapped_step(model, b)
        self._t0 = self.engine.clock()
        self._wall_real0 = time.perf_counter()
        self.ended = "running"
        self._observers.call("on_start", self.info)
        self._event(
            EventKind.START,
            f"training on {', '.join(self.info.devices)}"
            f"{' (simulated)' if self.engine.simulated else ''}, policy {self.policy}",
        )
        notice = getattr(self.snapshots, "notice", None)
        if isinstance(notice, str) and notice:
            self._event(EventKind.NOTICE, notice)
        resume(self)  # a checkpoint being resumed is loaded here, before the first step
        if self.restarts is not None:
            self.restarts.begin(self)
        batches = batch_stream(self)
        try:
            self._apply_requests()
            while True:
                try:
                    self._train(batches)
                    save_checkpoint(self)  # completed, stopped or interrupted between steps
                    break
                except DeviceFailure as exc:
                    if self.restarts is None or not self.restarts.restart(self, exc):
                        raise
                    batches = batch_stream(self)  # from the checkpoint gone back to
            if self.ended == "running":
                self.ended = "completed"
        except DeviceFailure as exc:
            # the controller could not re-plan without the failed device(s): stop cleanly
            self.ended = "stopped: no usable device"
            self._event(
                EventKind.DEVICE_DROPPED,
                f"{exc}; no device left to continue on: stopped after step {self.step}",
            )
            return self._finish()
        except KeyboardInterrupt:
            self.ended = "interrupted"
            self._in_optimizer_step = False
            self._finish()
            raise
        except BaseException as exc:
            self.ended = f"error: {type(exc).__name__}"
            self._finish(error=exc)
            raise
        if self.ended == "interrupted":
            self._event(EventKind.INTERRUPT, f"interrupted: stopped cleanly after step {self.step}")
            self._finish()
            raise KeyboardInterrupt(f"adaptive_nb run stopped after step {self.step}")
        return self._finish()

    def _train(self, batches: Iterator[Any]) -> None:
        """Steps until the data, the step count or a stop request ends the run."""
        interval = self.control_interval
        next_tick = 0.0
        next_progress = 0.0
        last_t = self._now()
        clock = time.perf_counter
        while True:
            own0 = clock()
            if self.control.paused and not self.control.stopped:
                self._observers.call("on_progress", progress_of(self, paused=True))
                pause0, pause0_real = self._now(), clock()
                while self.control.paused and not self.control.stopped:
                    self.control.wait_while_paused(0.1)
                    self._apply_requests()
                last_t = self._now()
                self._paused_s += last_t - pause0
                self._paused_real_s += clock() - pause0_real
                own0 = clock()  # waiting while paused is neither training nor overhead
            if self.control.stopped:
                self.ended = "interrupted" if self._interrupts else "stopped"
                break
            if self.steps is not None and self.step >= self.steps:
                break
            self._own_s += clock() - own0  # data loading below is not our overhead
            group, epoch_end, exhausted = next_group(batches, self.training.accumulate)
            if group and self._last_step_now():
                self._no_step_follows()
            if group:
                # read per step: a plan may move the primary between steps
                outcomes, commit = train_step(self, group, self.engine.primary_device())
                own0 = clock()
                samples = sum(o.samples for o in outcomes)
                self._last_loss = self.training.report_loss([o.loss for o in outcomes])
                for outcome in outcomes:
                    self.controller.observe(outcome)
                if not commit.applied:
                    self._event(commit.event_kind, commit.detail)
                now = self._now()
                dt = max(now - last_t, 1e-9)
                last_t = now
                a = 0.2 if self.step > 3 else 1.0
                self._step_s = (1 - a) * self._step_s + a * dt
                self._rate = (1 - a) * self._rate + a * (samples / dt)
                if now >= next_tick:
                    next_tick = now + interval
                    record_tick(self)
                if self._observers:
                    real = time.monotonic()
                    if real >= next_progress:
                        next_progress = real + 1.0 / PROGRESS_HZ
                        self._observers.call("on_progress", progress_of(self))
                self._own_s += clock() - own0
            hooks0 = self._now()  # callbacks, evaluation, checkpoints: not step time
            evaluator = self.training.evaluator
            if group:
                if evaluator.due_after_step(self.step):
                    self.state_home()  # the evaluation sees the state of this step
                with self._callbacks_quiet(self.step <= self.replay_until):
                    after_step(self)
            if epoch_end is not None:
                if evaluator.due_after_epoch():
                    self.state_home()
                with self._callbacks_quiet(epoch_end.epoch <= self.replay_epochs_until):
                    after_epoch(self, epoch_end.epoch)
                self.epochs_ended = epoch_end.epoch
            last_t += self._now() - hooks0
            own0 = clock()
            self._apply_requests()  # also those made by the callbacks just now
            self._own_s += clock() - own0
            if exhausted:
                break

    def _finish(self, error: BaseException | None = None) -> RunReport:
        self._finishing = True
        if error is not None and not isinstance(error, UsageError):
            self._event(
                EventKind.ERROR, f"{type(error).__name__}: {error} (after step {self.step})"
            )
        try:
            record_tick(self)
        except Exception as exc:  # a final tick must not hide the real outcome
            log.debug("final tick failed: %s", exc)
        self._event(EventKind.END, f"{self.ended} after {self.step} steps")
        summary = run_summary(
            self,
            wall_s=self._now(),
            real_wall_s=time.perf_counter() - self._wall_real0 - self._paused_real_s,
        )
        summary.update(self.controller.summary())
        summary.update(self.training.summary())
        if self.restarts is not None:
            summary.update(self.restarts.summary())
        summary["events"] = [e.to_dict() for e in self.events]
        history = self.training.history
        self.report = RunReport(
            info=self.info,
            summary=summary,
            timeline=list(self.timeline),
            events=list(self.events),
            lr=list(history.lr),
            grad_norm=list(history.grad_norm),
            evaluations=[dict(e) for e in history.evaluations],
        )
        self._observers.call("on_progress", progress_of(self))
        self._observers.call("on_end", self.report)
        return self.report
