"""The DataParallel engine: one step over :class:`~.weighted.WeightedDataParallel` on
CUDA devices, its per-device times measured from device events, and device faults turned
into :class:`OutOfMemory` / :class:`DeviceFailure` for the loop to re-plan around.

What is measured (see :mod:`.timing` for the method): per device position, the forward
and the backward of its replica, from events on that device; the primary is also charged
with the loss (gather end → its backward start) and with ``optimizer.step()`` when the
loop runs it through :meth:`DataParallelEngine.timed_update`. Nothing is estimated from
the forward time.

The primary is the plan's (``Plan.primary``, a device position; positions never change in
the plan's arrays). When a plan names another primary, :meth:`DataParallelEngine.apply_plan`
moves it between steps: the module (parameters, gradients, buffers, in place) goes to the
new device, the old one's cache is released, and the move's seconds are measured
(``last_move_s``) for the controller's cost model; the optimizer state follows in
:func:`~adaptive_nb.run.attempt.apply_optimizer_step`, outside the timed update.
"""

from __future__ import annotations

import re
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..batches import batch_size_of
from ..errors import DeviceFailure, OutOfMemory, UsageError, is_oom
from ..layout import Plan
from ..step import StepFn, StepOutcome
from .base import Engine
from .microbatch import run_micro_batches
from .timing import CudaEventClock, EventClock, Interval, seconds_by_position
from .weighted import WeightedDataParallel, default_min_chunk, scatter_weighted

__all__ = [
    "DataParallelEngine",
    "WeightedDataParallel",
    "default_min_chunk",
    "device_of_error",
    "scatter_weighted",
]

_DEVICE_ERROR = re.compile(r"CUDA error|CUDA driver error|AcceleratorError")
# Raised by the user's own code (bad labels, out-of-range indices), not by a broken device:
# the user's exception must reach them unchanged.
_USER_CUDA_ERROR = re.compile(r"device-side assert")


def device_of_error(message: str) -> int | None:
    """The CUDA device index an OOM/CUDA error message names, if any."""
    for pattern in (r"on device (\d+)", r"GPU (\d+)", r"cuda:(\d+)", r"device (\d+)"):
        m = re.search(pattern, message)
        if m:
            return int(m.group(1))
    return None


@dataclass
class _Pending:
    """Events of one step, read when they have all completed (never synchronised)."""

    chunks: dict[int, int]
    peak_mb: dict[int, float]
    peak_alloc_mb: dict[int, float]
    micro_batches: int
    start: Any  # event on the primary
    end: Any
    intervals: list[Interval] = field(default_factory=list)


_PAIRS = {"forward_end": "forward", "backward_end": "backward"}
_OPENS = {"forward_start": "forward", "backward_start": "backward", "gathered": "loss"}


class DataParallelEngine(Engine):
    """Forward/backward over :class:`WeightedDataParallel` on CUDA ``device_ids``.

    Measurements are read from device events a step or more late, only once they have
    completed, so there is no extra synchronisation: each :class:`StepOutcome` carries the
    *last completed* step's per-device times (forward + backward measured, plus loss and
    optimizer on the primary; ``device_phase_s`` has them apart), chunk sizes, peak memory
    and GPU wall time. The first step (warm-up) is not measured.

    ``clock`` and ``names`` replace the CUDA events and device checks (tests on the CPU,
    emulations); ``device_ids`` may repeat one CUDA index (replicas emulated on one GPU).
    """

    movable_primary = True  # apply_plan moves the module when the plan's primary changes

    def __init__(
        self,
        device_ids: Sequence[int],
        min_chunk: int | None = None,
        *,
        clock: EventClock | None = None,
        names: Sequence[str] | None = None,
    ) -> None:
        if not device_ids:
            raise UsageError("no GPU given: name at least one, e.g. devices='0'.")
        if names is None:
            if not torch.cuda.is_available():
                raise UsageError("no CUDA device is available: use devices='cpu' or 'sim:PATH'.")
            count = torch.cuda.device_count()
            bad = [d for d in device_ids if not 0 <= d < count]
            if bad:
                raise UsageError(f"GPU {bad[0]} does not exist (this process sees {count}).")
            names = [f"GPU {d} ({torch.cuda.get_device_name(d)})" for d in device_ids]
        self.device_ids = list(device_ids)
        self._names = list(names)
        self.clock_events: EventClock = clock if clock is not None else CudaEventClock()
        n = len(self.device_ids)
        self.plan = Plan(tuple(range(n)), tuple(1.0 / n for _ in range(n)), 1, 0)
        self.primary = 0  # position of the device that holds the module
        self.primary_moves = 0
        self.last_move_s: float | None = None  # seconds the latest primary move took
        self.last_move_bytes = 0  # bytes it copied (parameters, gradients, buffers)
        self.wrapper: WeightedDataParallel | None = None
        self._pending: deque[_Pending] = deque()
        self._intervals: list[Interval] = []
        self._open: dict[tuple[int, str], Interval] = {}
        self._lock = threading.Lock()
        self._current: _Pending | None = None  # the step whose optimizer update is next
        self._steps = 0
        self.last_batch = 0
        self.min_chunk = min_chunk  # None: decided from the model (default_min_chunk)
        self.effective_min_chunk = min_chunk or 1

    # -- Engine ---------------------------------------------------------------------------
    def device_names(self) -> list[str]:
        return list(self._names)

    def monitor_keys(self) -> list[int | None]:
        return list(self.device_ids)

    def primary_device(self) -> torch.device:
        return self.torch_device(self.primary)

    def torch_device(self, position: int) -> torch.device:
        """The torch device of a position (CPU stubs of this engine override it)."""
        return torch.device("cuda", self.device_ids[position])

    def prepare(self, model: nn.Module) -> nn.Module:
        model.to(self.primary_device())
        return self.wrap(model)

    def wrap(self, model: nn.Module) -> WeightedDataParallel:
        """Wrap ``model`` (already on the primary) and time it."""
        self.wrapper = WeightedDataParallel(model, self.device_ids, self.min_chunk)
        if self.primary != 0:  # nn.DataParallel took the first device as the primary
            self.wrapper.set_primary(self.primary, self.primary_device())
        self.wrapper.on_mark = self._on_mark
        self.effective_min_chunk = self.wrapper.min_chunk  # for planners: 2 with batch norm
        self.apply_plan(self.plan)
        return self.wrapper

    def apply_plan(self, plan: Plan) -> None:
        if plan.primary != self.primary:
            self._move_primary(plan.primary)
        self.plan = plan
        if self.wrapper is not None:
            self.wrapper.set_plan(plan.shares, plan.caps or None)

    def _move_primary(self, position: int) -> None:
        """Move the module to ``position``'s device (before :meth:`prepare`: only note it,
        the model goes straight there). Between steps only: the controller never moves the
        primary while a step is being retried."""
        if not 0 <= position < len(self.device_ids):
            raise ValueError(f"no device at position {position}")
        old = self.primary
        if self.wrapper is None:
            self.primary = position
            return
        module = self.wrapper.module
        tensors = [*module.parameters(), *module.buffers()]
        tensors += [p.grad for p in module.parameters() if p.grad is not None]
        self.last_move_bytes = sum(t.numel() * t.element_size() for t in tensors)
        t0 = time.perf_counter()
        self.wrapper.set_primary(position, self.torch_device(position))
        self._synchronize(position)
        self.last_move_s = time.perf_counter() - t0
        self.primary = position
        self.primary_moves += 1
        self._pending.clear()  # events of steps before the move: not comparable
        self._current = None
        if self.device_ids[old] != self.device_ids[position]:
            self.release_device(old)

    def speed_hints(self) -> list[float | None] | None:
        """Static speed hints for choosing the primary before anything is measured: the
        SM counts, when every device has the same compute capability (one generation);
        None otherwise (SMs of different generations do not compare)."""
        if not torch.cuda.is_available():
            return None
        try:
            props = [torch.cuda.get_device_properties(d) for d in self.device_ids]
        except Exception:  # a device that cannot be queried: no hints
            return None
        if len({(p.major, p.minor) for p in props}) != 1:
            return None
        return [float(p.multi_processor_count) for p in props]

    def move_bytes(self) -> int:
        """Bytes a primary move copies: parameters, gradients and buffers of the module, and
        an optimizer state of twice the parameters (Adam's moments; the engine does not see
        the optimizer, so this errs on the large side for SGD)."""
        if self.wrapper is None:
            return 0
        module = self.wrapper.module
        params = sum(p.numel() * p.element_size() for p in module.parameters())
        buffers = sum(b.numel() * b.element_size() for b in module.buffers())
        return int(4 * params + buffers)

    def _synchronize(self, position: int) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize(self.device_ids[position])

    def position_of(self, cuda_index: int | None) -> int | None:
        if cuda_index is None or cuda_index not in self.device_ids:
            return None
        return self.device_ids.index(cuda_index)

    def _on_mark(self, position: int, what: str) -> None:
        """Record an event for the wrapper's mark (called from replica threads and
        autograd's device threads, hence the lock)."""
        event = self.clock_events.mark(self.device_ids[position])
        with self._lock:
            kind = _OPENS.get(what)
            if kind is not None:
                if (position, kind) not in self._open:
                    iv = Interval(position, kind, event)
                    self._open[(position, kind)] = iv
                    self._intervals.append(iv)
                if what == "backward_start":
                    loss = self._open.pop((position, "loss"), None)
                    if loss is not None:
                        loss.end = event
                return
            closing = self._open.pop((position, _PAIRS[what]), None)
            if closing is not None:
                closing.end = event

    def timed_update(self, update: Callable[[], object]) -> Callable[[], object]:
        """``update`` (the optimizer step) with its device time charged to the primary of
        the step it applies (for the loop to pass to ``apply_optimizer_step``)."""

        def run() -> object:
            pending = self._current
            if pending is None:
                return update()
            primary = self.primary
            start = self.clock_events.mark(self.device_ids[primary])
            result = update()
            end = self.clock_events.mark(self.device_ids[primary])
            pending.intervals.append(Interval(primary, "optimizer", start, end))
            self._current = None
            return result

        return run

    def forward_backward(self, step: StepFn, batch: Any) -> StepOutcome:
        if self.wrapper is None:
            raise RuntimeError("DataParallelEngine.prepare() must be called first")
        wrapper = self.wrapper
        total = batch_size_of(batch)
        self.last_batch = total
        layout = self.plan.layout(total)
        m = len(layout)
        wrapper.step_chunks = [0] * len(self.device_ids)
        self._intervals, self._open, self._current = [], {}, None
        primary = self.device_ids[self.primary]
        start = self.clock_events.mark(primary)
        t0 = time.perf_counter()
        for d in set(self.device_ids):
            torch.cuda.reset_peak_memory_stats(d)
        try:
            # each micro-batch's hooks go before the next one (they would fire again)
            loss, _ = run_micro_batches(
                step, wrapper, batch, m, before_each=lambda _i, _n: wrapper.remove_hooks()
            )
        except Exception as exc:
            translated = self._translate(exc)
            if translated is exc:
                raise
            # the failed attempt's frames hold its tensors: let them go, then free the cache
            exc.__traceback__ = None
            del exc
            if isinstance(translated, (OutOfMemory, DeviceFailure)):
                self._free()
            raise translated from None
        finally:
            wrapper.remove_hooks()
        end = self.clock_events.mark(primary)
        host_wall = time.perf_counter() - t0
        chunks = {p: c for p, c in enumerate(wrapper.step_chunks) if c > 0}
        self._steps += 1
        if self._steps > 1:  # the first step warms up kernels and the allocator
            ids = self.device_ids  # peaks read only for positions that ran a chunk
            self._current = _Pending(
                chunks,
                {p: torch.cuda.max_memory_reserved(ids[p]) / 2**20 for p in chunks},
                {p: torch.cuda.max_memory_allocated(ids[p]) / 2**20 for p in chunks},
                m,
                start,
                end,
                [iv for iv in self._intervals if iv.end is not None],
            )
            self._pending.append(self._current)
            while len(self._pending) > 8:
                self._pending.popleft()
        done = self._collect()
        if done is None:
            return StepOutcome(loss=loss, samples=total, wall_s=host_wall, micro_batches=m)
        phases = seconds_by_position(done.intervals, self.clock_events)
        return StepOutcome(
            loss=loss,
            samples=total,
            wall_s=self.clock_events.seconds(done.start, done.end),
            device_time_s={p: sum(k.values()) for p, k in phases.items()},
            device_batch=done.chunks,
            peak_mem_mb=done.peak_mb,
            micro_batches=done.micro_batches,
            peak_alloc_mb=done.peak_alloc_mb,
            device_phase_s=phases,
        )

    def _collect(self) -> _Pending | None:
        """The newest step whose events have all completed (older ones are dropped); a
        step whose optimizer update may still be timed waits for it."""
        done = self.clock_events.done
        newest: _Pending | None = None
        while self._pending:
            p = self._pending[0]
            if p is self._current or not done(p.end):
                break
            if not all(done(iv.end) for iv in p.intervals):
                break
            newest = self._pending.popleft()
        return newest

    def _translate(self, exc: BaseException) -> BaseException:
        """An out-of-memory becomes :class:`OutOfMemory`; a CUDA error that names one of
        our devices becomes :class:`DeviceFailure`; anything else (the user's own errors,
        even those that mention ``cuda:0``) is returned unchanged, to be re-raised."""
        msg = str(exc)
        self._pending.clear()
        self._current = None
        if not isinstance(exc, RuntimeError):
            return exc
        if is_oom(exc):
            return OutOfMemory(
                msg.splitlines()[0] if msg else "CUDA out of memory",
                device=self.position_of(device_of_error(msg)),
            )
        accelerator_error = getattr(torch, "AcceleratorError", None)
        broken = (accelerator_error is not None and isinstance(exc, accelerator_error)) or bool(
            _DEVICE_ERROR.search(msg)
        )
        if broken and not _USER_CUDA_ERROR.search(msg):
            pos = self.position_of(device_of_error(msg))
            if pos is not None:
                return DeviceFailure(msg.splitlines()[0], device=pos)
        return exc

    def _free(self) -> None:
        for pos in range(len(self.device_ids)):
            self.release_device(pos)

    def release_device(self, position: int) -> None:
        """Give the allocator's cached blocks on the device at ``position`` back to the
        driver (the controller calls this when it drops a device: memory another process
        may want). Tensors still in use stay; a broken device is left alone."""
        if not 0 <= position < len(self.device_ids):
            return
        try:
            with torch.cuda.device(self.device_ids[position]):
                torch.cuda.empty_cache()
        except Exception:  # a broken device cannot release anything
            return

    def close(self) -> None:
        self._pending.clear()
