"""The control loop: runs the user's step over the data, applying the allocation that the
controller chooses, and produces a :class:`~adaptive_nb.report.RunReport`.

Per global batch: apply control requests (pause/stop/policy...) at the step boundary,
zero_grad, forward+backward on the engine (retrying the same batch after a recovered
out-of-memory or a dropped device), ``optimizer.step()`` exactly once, record the
measurement. Every ``control_interval`` seconds (engine clock) the controller re-plans.
"""

from __future__ import annotations

import inspect
import logging
import signal
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from importlib import import_module
from typing import Any, Protocol

import torch
from torch import nn

from .control import RunControl
from .engine.base import DeviceFailure, Engine, OutOfMemory, StepFn, StepOutcome, move_to
from .engine.cpu import CpuEngine
from .errors import LossError, UsageError
from .events import Event, EventKind, Observer, Progress, RunInfo, TickRecord
from .monitor.snapshot import Snapshot
from .plan.base import Controller, NullController
from .plan.threads import ThreadController
from .progress_text import TextProgress
from .report import RunReport
from .validate import DeviceSpec, check_counts, check_inputs, check_policy, parse_devices

__all__ = ["Run", "active_run", "start", "train"]

log = logging.getLogger("adaptive_nb")

MAX_RETRIES = 8
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


class SnapshotSource(Protocol):
    def latest(self) -> Snapshot | None: ...


_active_lock = threading.Lock()
_active: Run | None = None


def active_run() -> Run | None:
    """The run in progress in this process (foreground or background), if any."""
    return _active


def _busy_message(run: Run) -> str:
    return (
        f"another adaptive_nb run ({run.run_id}, step {run.step}) is still running in this "
        "kernel: stop it with `%adaptive stop` (or run.control.stop()) and wait for it to "
        "finish."
    )


def _claim(run: Run) -> None:
    """Make ``run`` the active run, atomically; UsageError if another one holds the slot."""
    global _active
    with _active_lock:
        if _active is not None and _active is not run:
            raise UsageError(_busy_message(_active))
        _active = run


def _release(run: Run) -> None:
    global _active
    with _active_lock:
        if _active is run:
            _active = None


def _check_loss(loss: Any, loss_name: str) -> torch.Tensor:
    if loss is None:
        raise LossError(
            f"the step never assigned `{loss_name}`: end the cell with e.g. "
            f"`{loss_name} = F.cross_entropy(model(x), y)` (the step was not applied)."
        )
    if not isinstance(loss, torch.Tensor):
        raise LossError(
            f"`{loss_name}` is a {type(loss).__name__}, not a tensor: assign the loss tensor "
            "itself, not `.item()` (the step was not applied)."
        )
    if loss.numel() != 1:
        raise LossError(
            f"`{loss_name}` has shape {tuple(loss.shape)}; it must be a scalar: reduce it, "
            f"e.g. `{loss_name} = {loss_name}.mean()` (the step was not applied)."
        )
    if not loss.requires_grad:
        raise LossError(
            f"`{loss_name}` does not require grad: it was computed under torch.no_grad() or "
            "from detached tensors, so nothing can be trained (the step was not applied)."
        )
    return loss if loss.dim() == 0 else loss.reshape(())


def _checked(step: StepFn, loss_name: str) -> StepFn:
    def checked_step(model: nn.Module, batch: Any) -> torch.Tensor:
        return _check_loss(step(model, batch), loss_name)

    return checked_step


def _build_backend(
    spec: DeviceSpec, *, policy: str, headroom: float, control_interval: float
) -> tuple[Engine, Controller, SnapshotSource | None]:
    """Engine, controller and snapshot source for a device spec."""
    if spec.kind == "sim":
        sim = import_module("adaptive_nb.sim")
        engine, controller, source = sim.build_sim_run(
            str(spec.sim_path), policy=policy, headroom=headroom, control_interval=control_interval
        )
        return engine, controller, source
    monitor = _default_monitor()
    if spec.kind == "gpu":
        _tell_monitor_cuda_uuids(monitor)
        allocation = import_module("adaptive_nb.plan.allocation")
        engine, controller = allocation.build_gpu_run(
            list(spec.gpu_ids),
            policy=policy,
            headroom=headroom,
            control_interval=control_interval,
            snapshots=monitor,
        )
        return engine, controller, monitor
    cpu_controller: Controller = (
        NullController() if policy == "static" else ThreadController(policy=policy)
    )
    return CpuEngine(), cpu_controller, monitor


def _tell_monitor_cuda_uuids(monitor: object) -> None:
    """Map NVML devices to torch indices by UUID (exact under any CUDA_DEVICE_ORDER)."""
    setter = getattr(monitor, "set_cuda_uuids", None)
    if setter is None:
        return
    try:
        uuids = [
            str(torch.cuda.get_device_properties(i).uuid) for i in range(torch.cuda.device_count())
        ]
    except Exception as exc:  # an old driver without UUIDs: keep the CUDA_VISIBLE_DEVICES map
        log.debug("torch device UUIDs unavailable: %s", exc)
        return
    setter(uuids)


def _default_monitor() -> SnapshotSource | None:
    try:
        from .monitor import default_monitor

        mon: SnapshotSource = default_monitor()
        return mon
    except Exception as exc:  # monitoring is optional for training
        log.warning("adaptive_nb: monitoring unavailable (%s); training continues.", exc)
        return None


def _align_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """Move optimizer state (e.g. Adam moments from an earlier CPU run) to the device its
    parameter now lives on; scalar entries such as Adam's ``step`` stay where they are."""
    for param, state in optimizer.state.items():
        if not isinstance(param, torch.Tensor):
            continue
        for key, value in state.items():
            if isinstance(value, torch.Tensor) and value.dim() > 0 and value.device != param.device:
                state[key] = value.to(param.device)


class _SafeObservers:
    """Calls observers; one that raises is logged once and detached."""

    def __init__(self, observers: Sequence[Observer], on_fail: Callable[[str], None]) -> None:
        self._observers = list(observers)
        self._on_fail = on_fail

    def call(self, method: str, arg: Any) -> None:
        for obs in list(self._observers):
            try:
                getattr(obs, method)(arg)
            except Exception as exc:
                self._observers.remove(obs)
                name = type(obs).__name__
                log.warning("adaptive_nb: %s failed in %s (%s); detached.", name, method, exc)
                self._on_fail(f"{name} detached after an error: {exc}")

    def __bool__(self) -> bool:
        return bool(self._observers)


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
    ) -> None:
        self.run_id = uuid.uuid4().hex[:12]
        self.step_fn = _checked(step, loss_name)
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
        self.events: list[Event] = []
        self.timeline: list[TickRecord] = []
        self._observers = _SafeObservers(observers, self._observer_failed)
        self.step = 0
        self.epoch = 0
        self.samples = 0
        self.ended: str = "not started"
        self.report: RunReport | None = None
        self.oom_recovered = 0
        self.device_failures = 0
        self.reallocations = 0
        self._t0 = 0.0
        self._last_loss: torch.Tensor | None = None
        self._rate = 0.0  # samples/s, smoothed
        self._step_s = 0.0  # seconds per step, smoothed
        self._own_s = 0.0  # time spent in adaptive_nb's bookkeeping (real seconds)
        self._wall_real0 = 0.0
        self._paused_s = 0.0  # engine-clock seconds spent paused (not training)
        self._paused_real_s = 0.0
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
        return None if self.epochs is None else n * self.epochs

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

    def _batches(self) -> Iterator[Any]:
        epoch = 0
        while self.epochs is None or epoch < self.epochs:
            got = False
            for batch in self.data:
                if not got:
                    got = True
                    self.epoch = epoch
                    self._epochs_started = epoch + 1
                yield batch
            if not got:
                if self.step == 0:
                    raise UsageError(
                        f"`{self.data_name}` produced no batches: is the dataset empty, or an "
                        "iterator that was already used up? Re-create it and run again."
                    )
                self._event(
                    EventKind.NOTICE,
                    f"`{self.data_name}` ran out after {self.step} steps (a one-shot iterator?)",
                )
                return
            epoch += 1

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

    def _progress(self, paused: bool = False) -> Progress:
        total = self.info.total_steps
        eta = None
        if total is not None and self._step_s > 0:
            eta = max(0, total - self.step) * self._step_s
        loss = float(self._last_loss) if self._last_loss is not None else None
        return Progress(
            step=self.step,
            total_steps=total,
            epoch=self.epoch,
            samples=self.samples,
            elapsed_s=self._now(),
            samples_per_s=self._rate,
            eta_s=eta,
            loss=loss,
            paused=paused,
        )

    def _forward_backward(self, batch: Any) -> StepOutcome:
        """Forward + backward of one batch, retried (same batch, gradients cleared) after
        each out-of-memory or dropped device the controller re-planned around. An
        out-of-memory counts as recovered only once the batch went through."""
        retries = 0
        ooms = 0
        while True:
            self.optimizer.zero_grad(set_to_none=True)
            try:
                outcome = self.engine.forward_backward(self.step_fn, batch)
            except OutOfMemory as err:
                retries += 1
                if retries > MAX_RETRIES:
                    raise
                self.optimizer.zero_grad(set_to_none=True)
                self._decision(self.controller.on_oom(err, self._now(), self.step))
                ooms += 1
                continue
            except DeviceFailure as err:
                retries += 1
                self.optimizer.zero_grad(set_to_none=True)
                self.device_failures += 1
                self._decision(self.controller.on_device_failure(err, self._now(), self.step))
                if retries > MAX_RETRIES:
                    raise
                continue
            self.oom_recovered += ooms
            return outcome

    def _tick(self) -> None:
        now = self._now()
        snap = self.snapshots.latest() if self.snapshots is not None else None
        self._decision(self.controller.tick(now, self.step, snap))
        names = self.engine.device_names()
        shares = self.controller.shares()
        in_use = [n for n in names if shares.get(n, 0.0) > 0] or names
        util: dict[str, float] = {}
        used: dict[str, float] = {}
        other: dict[str, float] = {}
        total: dict[str, float] = {}
        if snap is not None:
            gpus = {g.index: g for g in snap.gpus if g.index is not None}
            for name, key in zip(names, self.engine.monitor_keys(), strict=False):
                if key is None:
                    h = snap.host
                    util[name] = h.cpu_pct
                    used[name] = h.proc_rss_mb
                    other[name] = max(0.0, h.ram_used_mb - h.proc_rss_mb)
                    total[name] = h.ram_total_mb
                elif key in gpus:
                    g = gpus[key]
                    util[name] = g.util_pct
                    used[name] = g.self_mem_mb
                    other[name] = g.external_mem_mb
                    total[name] = g.mem_total_mb
        for name, u in util.items():
            self._util.setdefault(name, []).append(u)
            self._peak_mem[name] = max(self._peak_mem.get(name, 0.0), used.get(name, 0.0))
        rec = TickRecord(
            t=round(now, 3),
            step=self.step,
            samples_per_s=self._rate,
            loss=float(self._last_loss) if self._last_loss is not None else None,
            devices=in_use,
            shares=shares,
            util_pct=util,
            mem_used_mb=used,
            mem_other_mb=other,
            mem_total_mb=total,
            threads=self.controller.threads(),
            predicted_step_s=self.controller.predicted_step_s(),
            measured_step_s=self._step_s or None,
        )
        self.timeline.append(rec)
        self._observers.call("on_tick", rec)

    def _on_sigint(self, signum: int, frame: Any) -> None:
        self._interrupts += 1
        if self._interrupts >= 2 and not (self._in_optimizer_step or self._finishing):
            raise KeyboardInterrupt
        self.control.stop()

    def execute(self) -> RunReport:
        """Run to the end in the calling thread and return the report."""
        try:
            _claim(self)
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
                _release(self)
                self._done.set()

    def _abandon(self) -> None:
        """The run will never execute: release what it holds and mark it done."""
        self.ended = "not started"
        try:
            self.engine.close()
        finally:
            self._done.set()

    def _execute(self) -> RunReport:
        model = self.engine.prepare(self.model)
        _align_optimizer_state(self.optimizer)
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
        primary = self.engine.primary_device()
        interval = self.control_interval
        next_tick = 0.0
        next_progress = 0.0
        last_t = self._now()
        clock = time.perf_counter
        batches = self._batches()
        try:
            self._apply_requests()
            while True:
                own0 = clock()
                if self.control.paused and not self.control.stopped:
                    self._observers.call("on_progress", self._progress(paused=True))
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
                try:
                    batch = next(batches)
                except StopIteration:
                    break
                batch = move_to(batch, primary)
                outcome = self._forward_backward(batch)
                self._in_optimizer_step = True  # a second Ctrl-C waits until it is counted
                self.optimizer.step()
                self.step += 1
                self.samples += outcome.samples
                self._in_optimizer_step = False
                own0 = clock()
                self._last_loss = outcome.loss
                self.controller.observe(outcome)
                now = self._now()
                dt = max(now - last_t, 1e-9)
                last_t = now
                a = 0.2 if self.step > 3 else 1.0
                self._step_s = (1 - a) * self._step_s + a * dt
                self._rate = (1 - a) * self._rate + a * (outcome.samples / dt)
                if now >= next_tick:
                    next_tick = now + interval
                    self._tick()
                if self._observers:
                    real = time.monotonic()
                    if real >= next_progress:
                        next_progress = real + 1.0 / PROGRESS_HZ
                        self._observers.call("on_progress", self._progress())
                self._apply_requests()
                self._own_s += clock() - own0
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

    def _finish(self, error: BaseException | None = None) -> RunReport:
        self._finishing = True
        if error is not None and not isinstance(error, UsageError):
            self._event(
                EventKind.ERROR, f"{type(error).__name__}: {error} (after step {self.step})"
            )
        try:
            self._tick()
        except Exception as exc:  # a final tick must not hide the real outcome
            log.debug("final tick failed: %s", exc)
        self._event(EventKind.END, f"{self.ended} after {self.step} steps")
        wall = self._now()
        training_s = wall - self._paused_s
        real_wall = time.perf_counter() - self._wall_real0 - self._paused_real_s
        names_end = [n for n, s in self.controller.shares().items() if s > 0] or list(
            self.engine.device_names()
        )
        summary: dict[str, Any] = {
            "ended": self.ended,
            "steps": self.step,
            "epochs_started": self._epochs_started,
            "samples": self.samples,
            "wall_s": round(wall, 4),
            "paused_s": round(self._paused_s, 4),
            "samples_per_s": round(self.samples / training_s, 3) if training_s > 0 else 0.0,
            "final_loss": float(self._last_loss) if self._last_loss is not None else None,
            "devices": names_end,
            "policy": self.controller.policy,
            "simulated": self.engine.simulated,
            "reallocations": self.reallocations,
            "oom_recovered": self.oom_recovered,
            "device_failures": self.device_failures,
            "controller_overhead_pct": round(100 * self._own_s / real_wall, 3)
            if real_wall > 0
            else None,
            "utilisation": {
                name: {
                    "mean_pct": round(sum(v) / len(v), 2),
                    "peak_pct": round(max(v), 2),
                    "peak_mem_mb": round(self._peak_mem.get(name, 0.0), 1),
                }
                for name, v in self._util.items()
                if v
            },
        }
        summary.update(self.controller.summary())
        summary["events"] = [e.to_dict() for e in self.events]
        self.report = RunReport(
            info=self.info, summary=summary, timeline=list(self.timeline), events=list(self.events)
        )
        self._observers.call("on_progress", self._progress())
        self._observers.call("on_end", self.report)
        return self.report


def _prepare(
    step: StepFn,
    *,
    model: Any,
    optimizer: Any,
    data: Any,
    epochs: int | None,
    steps: int | None,
    devices: str | Sequence[int] | None,
    policy: str,
    headroom: float,
    widget: bool,
    observers: Sequence[Observer],
    control: RunControl | None,
    control_interval: float,
    names: Mapping[str, str] | None,
    loss_name: str,
    handle_interrupt: bool,
) -> Run:
    if not callable(step):
        raise UsageError(f"step must be a function step(model, batch) -> loss, got {step!r}.")
    check_inputs(model=model, optimizer=optimizer, data=data, names=names)
    check_counts(epochs, steps)
    check_policy(policy, headroom)
    if not control_interval > 0:
        raise UsageError(f"control_interval must be positive, got {control_interval}.")
    spec = parse_devices(devices)
    busy = _active
    if busy is not None:  # early, friendly check; the slot is claimed atomically later
        raise UsageError(_busy_message(busy))
    engine, controller, snapshots = _build_backend(
        spec, policy=policy, headroom=float(headroom), control_interval=control_interval
    )
    control = control or RunControl()
    all_observers = list(observers)
    if widget:
        jupyter = import_module("adaptive_nb.jupyter")
        all_observers.append(
            jupyter.show_dashboard(control, engine.device_names(), engine.simulated)
        )
    return Run(
        step,
        model=model,
        optimizer=optimizer,
        data=data,
        epochs=epochs,
        steps=steps,
        engine=engine,
        controller=controller,
        snapshots=snapshots,
        policy=policy,
        headroom=float(headroom),
        control=control,
        observers=all_observers,
        control_interval=control_interval,
        loss_name=loss_name,
        data_name=(names or {}).get("data", "data"),
        handle_interrupt=handle_interrupt,
    )


def train(
    step: StepFn,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    data: Iterable[Any],
    epochs: int | None = None,
    steps: int | None = None,
    devices: str | Sequence[int] | None = "auto",
    policy: str = "adaptive",
    headroom: float = 0.1,
    widget: bool = False,
    observers: Sequence[Observer] = (),
    control: RunControl | None = None,
    control_interval: float = 2.0,
    names: Mapping[str, str] | None = None,
    loss_name: str = "loss",
    progress: bool = False,
) -> RunReport:
    """Train ``model`` with ``step(model, batch) -> loss`` over ``data`` and return a report.

    adaptive_nb owns ``zero_grad``/``backward``/``optimizer.step``; the global batch never
    changes, only where and how it is computed. ``epochs`` or ``steps`` (default: one
    epoch). ``devices``: ``"auto"`` (all visible GPUs, else CPU), ``"cpu"``, ``"0,2"``,
    or ``"sim:SCENARIO.json"`` (simulated fleet). ``policy``: ``"adaptive"`` (device set and
    shares; CPU threads), ``"weights"`` (all devices, shares adapt) or ``"static"`` (equal
    split, nothing adapts). ``headroom``: fraction of each GPU's memory kept free.

    The loss must be the *mean* over the batch's samples (PyTorch's default
    ``reduction="mean"``). When a batch does not fit the devices' memory it is run as
    micro-batches with gradient accumulation, each micro-batch's loss weighted by its share
    of the samples, which gives exactly the full-batch gradient for a mean loss. A summed
    loss (``reduction="sum"``) would have its gradient scaled down by the number of
    micro-batches then; a batch-level loss that is not a per-sample average (e.g.
    contrastive losses over the whole batch) is only approximated. Across GPUs the loss is
    computed on the gathered output, so the split alone never changes the gradient.

    Raises :class:`~adaptive_nb.errors.UsageError` for bad input before anything runs.
    ``progress=True`` prints a one-line text progress (step, samples/s, ETA, loss) and
    each decision; ``widget=True`` shows the live dashboard in a notebook instead.

    A Ctrl-C / kernel interrupt stops at the next step boundary and raises
    ``KeyboardInterrupt``; the partial report is on the exception's run
    (``adaptive_nb.last_run().report``).
    """
    if progress:
        observers = [*observers, TextProgress()]
    run = _prepare(
        step,
        model=model,
        optimizer=optimizer,
        data=data,
        epochs=epochs,
        steps=steps,
        devices=devices,
        policy=policy,
        headroom=headroom,
        widget=widget,
        observers=observers,
        control=control,
        control_interval=control_interval,
        names=names,
        loss_name=loss_name,
        handle_interrupt=True,
    )
    global _last
    _last = run
    return run.execute()


def start(step: StepFn, **kwargs: Any) -> Run:
    """Like :func:`train` but runs on a background thread and returns the :class:`Run` at
    once; ``run.wait()`` returns the report, ``run.control`` pauses/stops it."""
    opts = _with_defaults(kwargs)
    if opts.pop("progress"):
        opts["observers"] = [*opts["observers"], TextProgress()]
    run = _prepare(step, handle_interrupt=False, **opts)
    try:
        _claim(run)  # before the thread starts, so that no second run can slip in
    except UsageError:
        run._abandon()
        raise
    global _last
    _last = run

    def target() -> None:
        try:
            run.execute()
        except BaseException as exc:
            run._error = exc

    run._thread = threading.Thread(target=target, name=f"adaptive_nb-{run.run_id}", daemon=True)
    try:
        run._thread.start()
    except BaseException:
        _release(run)
        run._abandon()
        raise
    return run


def _with_defaults(kwargs: dict[str, Any]) -> dict[str, Any]:
    """``kwargs`` completed with :func:`train`'s defaults (one signature for both)."""
    params = inspect.signature(train).parameters
    defaults = {
        name: p.default for name, p in params.items() if p.default is not inspect.Parameter.empty
    }
    required = {name for name, p in params.items() if p.kind is inspect.Parameter.KEYWORD_ONLY}
    required -= set(defaults)
    unknown = set(kwargs) - set(defaults) - required
    if unknown:
        raise UsageError(f"unknown argument(s) to start(): {', '.join(sorted(unknown))}")
    missing = required - set(kwargs)
    if missing:
        raise UsageError(f"start() needs {', '.join(sorted(missing))}.")
    return {**defaults, **kwargs}


_last: Run | None = None


def last_run() -> Run | None:
    """The most recent run started in this process (finished or not)."""
    return _last
