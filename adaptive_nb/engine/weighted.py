"""Weighted ``nn.DataParallel``: each batch is scattered with per-device chunk sizes.

The primary device (position ``primary``: 0 unless moved by
:meth:`WeightedDataParallel.set_primary`) holds the parameters, gathers the output, computes
the loss and reduces the gradients; every scatter lists it first (``replicate`` broadcasts
from the first device). Devices with a zero share are left out of the scatter (never given
an empty chunk). Changing the device set or the shares only changes
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

Timing: given an ``on_mark(position, what)`` callback the wrapper reports, per device
position, ``forward_start`` / ``forward_end`` around each replica's forward (in the thread
that runs it), ``gathered`` on the primary after the gather, and ``backward_start`` /
``backward_end`` from autograd hooks (see :mod:`.timing` for the method).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from ..batches import first_batch_size, split_nested
from ..errors import UsageError
from ..layout import chunk_sizes
from .replica_loss import gather_weighted
from .timing import mark_backward_end, mark_backward_start, mark_replica_backward_end

__all__ = ["WeightedDataParallel", "default_min_chunk", "scatter_weighted"]

ScatterFn = Callable[[Sequence[int], Sequence[int], int, torch.Tensor], Sequence[torch.Tensor]]
MarkFn = Callable[[int, str], None]


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


def default_min_chunk(model: nn.Module) -> int:
    """2 for a model with batch norm (a replica needs two samples for batch statistics),
    else 1."""
    has_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    return 2 if has_bn else 1


class _TimedReplica:
    """Calls one replica, reporting its forward and (through hooks) its backward."""

    def __init__(self, replica: nn.Module, position: int, owner: WeightedDataParallel) -> None:
        self.replica = replica
        self.position = position
        self.owner = owner

    def __call__(self, *inputs: Any, **kwargs: Any) -> Any:
        mark = self.owner.on_mark
        if mark is None:
            return self.run(*inputs, **kwargs)
        position = self.position
        mark(position, "forward_start")
        mark_replica_backward_end(self.replica, lambda: mark(position, "backward_end"))
        out = self.run(*inputs, **kwargs)
        mark(position, "forward_end")
        self.owner.watch_backward_start(out, position)
        return out

    def run(self, *inputs: Any, **kwargs: Any) -> Any:
        """The replica's forward (the part that is timed as this device's forward)."""
        return self.replica(*inputs, **kwargs)


class WeightedDataParallel(nn.DataParallel):  # type: ignore[type-arg]
    """``nn.DataParallel`` whose scatter follows per-device shares (see module doc).

    ``shares[i]`` / ``caps[i]`` refer to ``all_device_ids[i]``; position ``primary`` (0
    until :meth:`set_primary` moves it) holds the module and always gets samples (at least
    ``min_chunk`` when the batch has that many). The same
    CUDA index may appear more than once (replicas emulated on one GPU): those replicas run
    one after another."""

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
        self.primary = 0  # position of the device holding the module (see set_primary)
        self.positions: list[int] = [0]  # positions of the last scatter, replica order
        self.replica_weights: list[float] = [1.0]  # each replica's fraction of that scatter
        self.on_mark: MarkFn | None = None
        self.hook_handles: list[Any] = []  # removed by the engine after each backward
        self._timed_alone = False

    def set_plan(self, shares: Sequence[float], caps: Sequence[int | None] | None = None) -> None:
        self.shares = [float(s) for s in shares]
        self.caps = list(caps) if caps else [None] * len(self.shares)

    def set_primary(self, position: int, device: torch.device) -> None:
        """Make ``position`` the primary: the module (parameters, gradients and buffers, in
        place: the optimizer keeps its references) moves to ``device``, later scatters list
        that position first and outputs are gathered there. Optimizer state is the caller's
        to move (:func:`~adaptive_nb.run.attempt.align_optimizer_state`)."""
        if not 0 <= position < len(self.all_device_ids):
            raise ValueError(f"no device at position {position}")
        self.module.to(device)
        self.primary = position
        self.src_device_obj = device
        self.output_device = self.all_device_ids[position]

    def chunk_plan(self, size: int) -> tuple[list[int], list[int]]:
        """(positions, chunk sizes) for a batch of ``size``: zero chunks left out, the
        primary first (then by position)."""
        primary = self.primary
        sizes = chunk_sizes(
            self.shares, size, self.caps, required=primary, min_chunk=self.min_chunk
        )
        positions = [primary] + [p for p, s in enumerate(sizes) if s > 0 and p != primary]
        return positions, [sizes[p] for p in positions]

    def watch_backward_start(self, output: Any, position: int) -> None:
        """Hooks that report ``position``'s backward start (its output's gradient arrives)."""
        mark = self.on_mark
        if mark is not None:
            self.hook_handles.extend(
                mark_backward_start(output, lambda: mark(position, "backward_start"))
            )

    def remove_hooks(self) -> None:
        for handle in self.hook_handles:
            handle.remove()
        self.hook_handles = []

    def scatter(  # type: ignore[override]
        self, inputs: tuple[Any, ...], kwargs: dict[str, Any] | None, device_ids: Sequence[int]
    ) -> tuple[tuple[Any, ...], tuple[dict[str, Any], ...]]:
        self._timed_alone = False
        size = first_batch_size((inputs, kwargs or {}), self.dim)
        if size is None:
            self.device_ids = [self.all_device_ids[self.primary]]
            self.positions, self.replica_weights = [self.primary], [1.0]
            return (inputs,), (kwargs or {},)
        positions, sizes = self.chunk_plan(size)
        ids = [self.all_device_ids[p] for p in positions]
        self.device_ids = ids  # forward's replicate / parallel_apply follow this
        self.positions = positions
        self.replica_weights = [s / size for s in sizes]
        for p, s in zip(positions, sizes, strict=True):
            self.step_chunks[p] += s
        if len(ids) == 1 and self.on_mark is not None:
            # one device: DataParallel.forward calls the module directly, no parallel_apply
            self._timed_alone = True
            self.on_mark(positions[0], "forward_start")
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
        """Each replica's forward, timed in the thread that runs it: *after* scatter and
        replicate and *before* gather, whose cross-device copies make every device's stream
        wait for the others (an end mark after it would give each device the slowest's
        time). Replicas sharing one CUDA index run one after another, so that each one's
        events bracket its own work on the shared stream."""
        positions = self.positions[: len(replicas)]
        timed: Any = [_TimedReplica(r, p, self) for r, p in zip(replicas, positions, strict=True)]
        ids = list(self.device_ids[: len(replicas)])
        if len(set(ids)) == len(ids):
            outputs: list[Any] = super().parallel_apply(timed, inputs, kwargs)
            return outputs
        serial: list[Any] = []
        kw = kwargs if kwargs else [{} for _ in replicas]
        for replica, d, inp, k in zip(timed, ids, inputs, kw, strict=True):
            with torch.cuda.device(d):
                serial.append(replica(*inp, **k))
        return serial

    def gather(self, outputs: Any, output_device: Any) -> Any:
        """Gathered as ``nn.DataParallel`` does, except that scalar losses the replicas
        computed themselves are weighted by their share of the batch (:mod:`.replica_loss`)."""

        def gather_tensors(tensors: list[torch.Tensor]) -> torch.Tensor:
            out: torch.Tensor = super(WeightedDataParallel, self).gather(tensors, output_device)
            return out

        gathered = gather_weighted(outputs, self.replica_weights[: len(outputs)], gather_tensors)
        if self.on_mark is not None:
            self.on_mark(self.primary, "gathered")
        return gathered

    def forward(self, *inputs: Any, **kwargs: Any) -> Any:
        out = super().forward(*inputs, **kwargs)
        if self._timed_alone and self.on_mark is not None:
            self._timed_alone = False
            position = self.positions[0]
            self.on_mark(position, "forward_end")
            self.on_mark(position, "gathered")
            self.watch_backward_start(out, position)
            mark = self.on_mark
            handle = mark_backward_end(self.module, lambda: mark(position, "backward_end"))
            if handle is not None:
                self.hook_handles.append(handle)
        return out
