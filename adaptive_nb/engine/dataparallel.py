"""Weighted ``nn.DataParallel``: each batch is scattered with per-device chunk sizes.

The primary device (the first of ``device_ids``) holds the parameters, gathers the output,
computes the loss and reduces the gradients. Devices with a zero share are left out of the
scatter (never given an empty chunk). Changing the device set or the shares only changes
what the next ``scatter`` does: the wrapped module and the optimizer are untouched.
With the loss computed on the gathered output the gradient is the full-batch gradient
whatever the split (``Gather.backward`` scatters gradients back with the same sizes); a
model that returns its own loss has the replicas' losses weighted by their shares
(:mod:`.replica_loss`).

Batch norm: as in plain ``nn.DataParallel``, each replica normalises its own chunk with its
own statistics, and the running statistics kept are those of the primary's replica. So no
device is given fewer than ``min_chunk`` samples (2 by default for a model with batch norm:
the statistics of one sample are meaningless, and training mode refuses them); a share
that would give fewer gives that device nothing this step (see
:func:`~adaptive_nb.layout.enforce_min_chunk`).
"""

from __future__ import annotations

import re
import time
import warnings
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..batches import batch_size_of, first_batch_size, split_nested
from ..errors import DeviceFailure, OutOfMemory, UsageError
from ..layout import Plan, chunk_sizes
from ..step import StepFn, StepOutcome
from .base import Engine
from .microbatch import run_micro_batches
from .replica_loss import gather_weighted

__all__ = [
    "BACKWARD_FACTOR",
    "DataParallelEngine",
    "WeightedDataParallel",
    "default_min_chunk",
    "device_of_error",
    "scatter_weighted",
]

BACKWARD_FACTOR = 2.0
"""Backward time ≈ this × forward time (per-device backward is not timed separately)."""

ScatterFn = Callable[[Sequence[int], Sequence[int], int, torch.Tensor], Sequence[torch.Tensor]]


def _torch_scatter(
    devices: Sequence[int], sizes: Sequence[int], dim: int, tensor: torch.Tensor
) -> Sequence[torch.Tensor]:
    from torch.nn.parallel._functions import Scatter

    out: Sequence[torch.Tensor] = Scatter.apply(  # type: ignore[no-untyped-call]
        list(devices), list(sizes), dim, tensor
    )
    return out


def scatter_weighted(
    obj: Any,
    devices: Sequence[int],
    sizes: Sequence[int],
    dim: int = 0,
    scatter: ScatterFn | None = None,
) -> list[Any]:
    """Split every tensor of a nested tuple/list/dict/namedtuple into ``sizes`` chunks
    placed on ``devices`` (with ``torch.nn.parallel``'s ``Scatter`` unless ``scatter`` is
    given); non-tensors are repeated. Returns one structure per device.
    A tensor whose size along ``dim`` is not ``sum(sizes)`` is a usage error (it cannot be
    split with the batch)."""
    total = int(sum(sizes))
    if scatter is None:
        scatter = _torch_scatter

    def scatter_tensor(x: torch.Tensor) -> list[torch.Tensor]:
        if x.dim() <= dim or x.shape[dim] != total:
            raise UsageError(
                f"the model was called with a tensor of shape {tuple(x.shape)} next to a "
                f"batch of {total}: under DataParallel every tensor argument is split "
                f"along dim {dim}; pass per-batch constants as module attributes instead."
            )
        return list(scatter(devices, sizes, dim, x))

    return split_nested(obj, len(devices), scatter_tensor)


_DEVICE_ERROR = re.compile(r"CUDA error|CUDA driver error|AcceleratorError")
# Raised by the user's own code (bad labels, out-of-range indices), not by a broken device:
# the user's exception must reach them unchanged.
_USER_CUDA_ERROR = re.compile(r"device-side assert")
_OOM = re.compile(r"out of memory|CUBLAS_STATUS_ALLOC_FAILED")


def device_of_error(message: str) -> int | None:
    """The CUDA device index an OOM/CUDA error message names, if any."""
    for pattern in (r"on device (\d+)", r"GPU (\d+)", r"cuda:(\d+)", r"device (\d+)"):
        m = re.search(pattern, message)
        if m:
            return int(m.group(1))
    return None


def _event() -> Any:
    return torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]


class WeightedDataParallel(nn.DataParallel):  # type: ignore[type-arg]
    """``nn.DataParallel`` whose scatter follows per-device shares (see module doc).

    ``shares[i]`` / ``caps[i]`` refer to ``all_device_ids[i]``; position 0 is the primary
    and always gets at least one sample."""

    def __init__(
        self, module: nn.Module, device_ids: Sequence[int], min_chunk: int | None = None
    ) -> None:
        with warnings.catch_warnings():  # an uneven fleet is the point, not a mistake
            warnings.simplefilter("ignore", UserWarning)
            super().__init__(module, device_ids=list(device_ids), output_device=device_ids[0])
        self.all_device_ids = list(device_ids)
        n = len(self.all_device_ids)
        self.shares: list[float] = [1.0 / n] * n
        self.caps: list[int | None] = [None] * n
        self.step_chunks: list[int] = [0] * n  # samples per position since last reset
        self.min_chunk = default_min_chunk(module) if min_chunk is None else max(1, min_chunk)
        self.replica_weights: list[float] = [1.0]  # each replica's fraction of the last scatter
        # on_forward(ids, "start"|"end") brackets each device's share of the forward pass;
        # the engine records CUDA events there (see DataParallelEngine).
        self.on_forward: Callable[[list[int], str], None] | None = None
        self._timed_alone = False

    def set_plan(self, shares: Sequence[float], caps: Sequence[int | None] | None = None) -> None:
        self.shares = [float(s) for s in shares]
        self.caps = list(caps) if caps else [None] * len(self.shares)

    def chunk_plan(self, size: int) -> tuple[list[int], list[int]]:
        """(positions, chunk sizes) for a batch of ``size``: zero chunks left out."""
        sizes = chunk_sizes(self.shares, size, self.caps, required=0, min_chunk=self.min_chunk)
        positions = [p for p, s in enumerate(sizes) if s > 0]
        return positions, [sizes[p] for p in positions]

    def scatter(  # type: ignore[override]
        self, inputs: tuple[Any, ...], kwargs: dict[str, Any] | None, device_ids: Sequence[int]
    ) -> tuple[tuple[Any, ...], tuple[dict[str, Any], ...]]:
        self._timed_alone = False
        size = first_batch_size((inputs, kwargs or {}), self.dim)
        if size is None:
            self.device_ids = self.all_device_ids[:1]
            return (inputs,), (kwargs or {},)
        positions, sizes = self.chunk_plan(size)
        ids = [self.all_device_ids[p] for p in positions]
        self.device_ids = ids  # forward's replicate / parallel_apply follow this
        self.replica_weights = [s / size for s in sizes]
        for p, s in zip(positions, sizes, strict=True):
            self.step_chunks[p] += s
        if len(ids) == 1 and self.on_forward is not None:
            # one device: DataParallel.forward calls the module directly, no parallel_apply
            self._timed_alone = True
            self.on_forward(ids, "start")
        scattered_in = scatter_weighted(inputs, ids, sizes, self.dim) if inputs else []
        scattered_kw = scatter_weighted(kwargs, ids, sizes, self.dim) if kwargs else []
        if len(scattered_in) < len(scattered_kw):
            scattered_in.extend(() for _ in range(len(scattered_kw) - len(scattered_in)))
        elif len(scattered_kw) < len(scattered_in):
            scattered_kw.extend({} for _ in range(len(scattered_in) - len(scattered_kw)))
        return tuple(scattered_in), tuple(scattered_kw)

    def parallel_apply(
        self, replicas: Sequence[nn.Module], inputs: Sequence[Any], kwargs: Any
    ) -> list[Any]:
        """Each replica's forward, bracketed per device *after* scatter and replicate and
        *before* gather: gather's cross-device copies make every device's stream wait for
        the others (two-way barrier), so an end mark after it would give each device the
        time of the slowest one."""
        ids = list(self.device_ids[: len(replicas)])
        if self.on_forward is not None:
            self.on_forward(ids, "start")
        outputs: list[Any] = super().parallel_apply(replicas, inputs, kwargs)
        if self.on_forward is not None:
            self.on_forward(ids, "end")
        return outputs

    def gather(self, outputs: Any, output_device: Any) -> Any:
        """Gathered as ``nn.DataParallel`` does, except that scalar losses the replicas
        computed themselves are weighted by their share of the batch (:mod:`.replica_loss`)."""

        def gather_tensors(tensors: list[torch.Tensor]) -> torch.Tensor:
            out: torch.Tensor = super(WeightedDataParallel, self).gather(tensors, output_device)
            return out

        return gather_weighted(outputs, self.replica_weights[: len(outputs)], gather_tensors)

    def forward(self, *inputs: Any, **kwargs: Any) -> Any:
        out = super().forward(*inputs, **kwargs)
        if self._timed_alone and self.on_forward is not None:
            self._timed_alone = False
            self.on_forward(list(self.device_ids), "end")
        return out


def default_min_chunk(model: nn.Module) -> int:
    """2 for a model with batch norm (a replica needs two samples for batch statistics),
    else 1."""
    has_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    return 2 if has_bn else 1


@dataclass
class _Pending:
    """CUDA events of one step, read when they have completed (never synchronised)."""

    chunks: dict[int, int]
    peak_mb: dict[int, float]
    micro_batches: int
    start: Any  # torch.cuda.Event on the primary
    end: Any
    forward: list[tuple[int, Any, Any]] = field(default_factory=list)  # (pos, start, end)


class DataParallelEngine(Engine):
    """Forward/backward over :class:`WeightedDataParallel` on CUDA ``device_ids``.

    Measurements are read from CUDA events a step or more late, only once they have
    completed (``Event.query()``), so there is no extra synchronisation: each
    :class:`StepOutcome` carries the *last completed* step's per-device times (forward
    timed, backward estimated as :data:`BACKWARD_FACTOR` × forward), chunk sizes, peak
    reserved memory and GPU wall time. The first step (warm-up) is not measured.
    """

    def __init__(self, device_ids: Sequence[int], min_chunk: int | None = None) -> None:
        if not torch.cuda.is_available():
            raise UsageError("no CUDA device is available: use devices='cpu' or 'sim:PATH'.")
        if not device_ids:
            raise UsageError("no GPU given: name at least one, e.g. devices='0'.")
        count = torch.cuda.device_count()
        bad = [d for d in device_ids if not 0 <= d < count]
        if bad:
            raise UsageError(f"GPU {bad[0]} does not exist (this process sees {count}).")
        self.device_ids = list(device_ids)
        self._names = [f"GPU {d} ({torch.cuda.get_device_name(d)})" for d in self.device_ids]
        n = len(self.device_ids)
        self.plan = Plan(tuple(range(n)), tuple(1.0 / n for _ in range(n)), 1, 0)
        self.wrapper: WeightedDataParallel | None = None
        self._pending: deque[_Pending] = deque()
        self._forward_events: list[tuple[int, Any, Any]] = []
        self._open: dict[int, Any] = {}
        self._steps = 0
        self.last_batch = 0
        self.min_chunk = min_chunk

    # -- Engine ---------------------------------------------------------------------------
    def device_names(self) -> list[str]:
        return list(self._names)

    def monitor_keys(self) -> list[int | None]:
        return list(self.device_ids)

    def primary_device(self) -> torch.device:
        return torch.device("cuda", self.device_ids[0])

    def prepare(self, model: nn.Module) -> nn.Module:
        model.to(self.primary_device())
        self.wrapper = WeightedDataParallel(model, self.device_ids, self.min_chunk)
        self.wrapper.on_forward = self._on_forward
        self.apply_plan(self.plan)
        return self.wrapper

    def apply_plan(self, plan: Plan) -> None:
        self.plan = plan
        if self.wrapper is not None:
            self.wrapper.set_plan(plan.shares, plan.caps or None)

    def position_of(self, cuda_index: int | None) -> int | None:
        if cuda_index is None or cuda_index not in self.device_ids:
            return None
        return self.device_ids.index(cuda_index)

    def _on_forward(self, ids: list[int], phase: str) -> None:
        if phase == "start":
            self._open = {}
            for d in ids:
                ev = _event()
                ev.record(torch.cuda.current_stream(d))
                self._open[d] = ev
        else:
            for d in ids:
                start = self._open.get(d)
                if start is None:
                    continue
                end = _event()
                end.record(torch.cuda.current_stream(d))
                pos = self.device_ids.index(d)
                self._forward_events.append((pos, start, end))
            self._open = {}

    def forward_backward(self, step: StepFn, batch: Any) -> StepOutcome:
        if self.wrapper is None:
            raise RuntimeError("DataParallelEngine.prepare() must be called first")
        wrapper = self.wrapper
        total = batch_size_of(batch)
        self.last_batch = total
        layout = self.plan.layout(total)
        m = len(layout)
        wrapper.step_chunks = [0] * len(self.device_ids)
        self._forward_events = []
        primary_stream = torch.cuda.current_stream(self.device_ids[0])
        start = _event()
        start.record(primary_stream)
        t0 = time.perf_counter()
        for d in self.device_ids:
            torch.cuda.reset_peak_memory_stats(d)
        try:
            loss, _ = run_micro_batches(step, wrapper, batch, m)
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
        end = _event()
        end.record(primary_stream)
        host_wall = time.perf_counter() - t0
        chunks = {p: c for p, c in enumerate(wrapper.step_chunks) if c > 0}
        peaks = {
            p: torch.cuda.max_memory_reserved(d) / 2**20 for p, d in enumerate(self.device_ids)
        }
        self._steps += 1
        if self._steps > 1:  # the first step warms up kernels and the allocator
            self._pending.append(
                _Pending(chunks, {p: peaks[p] for p in chunks}, m, start, end, self._forward_events)
            )
            while len(self._pending) > 8:
                self._pending.popleft()
        done = self._collect()
        if done is None:
            return StepOutcome(loss=loss, samples=total, wall_s=host_wall, micro_batches=m)
        fwd: dict[int, float] = {}
        for pos, s, e in done.forward:
            fwd[pos] = fwd.get(pos, 0.0) + s.elapsed_time(e) / 1000.0
        return StepOutcome(
            loss=loss,
            samples=total,
            wall_s=done.start.elapsed_time(done.end) / 1000.0,
            device_time_s={p: t * (1.0 + BACKWARD_FACTOR) for p, t in fwd.items()},
            device_batch=done.chunks,
            peak_mem_mb=done.peak_mb,
            micro_batches=done.micro_batches,
        )

    def _collect(self) -> _Pending | None:
        """The newest step whose events have all completed (older ones are dropped)."""
        newest: _Pending | None = None
        while self._pending:
            p = self._pending[0]
            if not p.end.query() or not all(e.query() for _, _, e in p.forward):
                break
            newest = self._pending.popleft()
        return newest

    def _translate(self, exc: BaseException) -> BaseException:
        """An out-of-memory becomes :class:`OutOfMemory`; a CUDA error that names one of
        our devices becomes :class:`DeviceFailure`; anything else (the user's own errors,
        even those that mention ``cuda:0``) is returned unchanged, to be re-raised."""
        msg = str(exc)
        self._pending.clear()
        self._forward_events = []
        if not isinstance(exc, RuntimeError):
            return exc
        if isinstance(exc, torch.cuda.OutOfMemoryError) or _OOM.search(msg):
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
