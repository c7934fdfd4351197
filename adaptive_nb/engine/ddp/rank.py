"""One rank's side of a DDP job: the shipped model wrapped in DistributedDataParallel,
the optimizer (the ranks apply the step), the plan table, and one step's forward and
backward on the rank's own slice, measured.

Measurement method (what the kernel reads as the rank's compute time): ``forward_s`` is
from the start of each piece to the step function's return (the loss); ``backward_s``
from ``backward()`` to the moment the *last* parameter gradient is computed (a gradient
hook on every parameter stamps the time; DDP hands that gradient's bucket to its
all-reduce right after); the rest of ``backward()`` is ``wait_s``, time spent waiting for
the all-reduce, which is not compute. The all-reduce itself is DDP's own (no Python
communication hook: it costs the rank CPU every bucket). A stamp is one Python call per
parameter and backward (about 0.04 ms a step for six parameters on a 2-core machine,
``benchmarks/grad_hook_cost.py``).
Peak memory: CUDA's peak allocated bytes over the step, or on the CPU the process's
resident set after each forward (where activations are largest).
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from typing import Any

import psutil
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ...batches import move_to
from ...errors import is_oom
from ...step import check_loss
from ..microbatch import split_batch
from .data import AUTOCAST, BatchToken, DataSource, load_slice, token_parts
from .scaling import RankLayout, loss_weight, rank_layout, slice_bounds

__all__ = ["RankJob", "StepFailed", "is_oom"]


class StepFailed(Exception):
    """An out-of-memory this rank cannot recover from in step with the others (its
    synchronised backward had begun): the group must be restarted."""


class _WithCompletion(nn.Module):
    """The user's module and one scalar parameter, ``completed``, for DDP to reduce with
    the gradients (see :class:`_Agreement`). Only DDP's construction sees this module:
    afterwards DDP runs the user's module again (``model.module`` is theirs)."""

    def __init__(self, module: nn.Module, device: torch.device) -> None:
        super().__init__()
        self.inner = module
        self.completed = nn.Parameter(torch.zeros((), device=device))


class _Agreement:
    """Whether every rank completed a step, with no collective of its own: each rank adds
    ``completed × c`` to its synchronised backward (c = 1, or 0 on a rank that ran out of
    memory and joins with an empty slice), so DDP's all-reduce leaves ``completed.grad`` =
    the mean of the ranks' c, which is 1 only if every rank completed the step. (A
    separate all-reduce after backward cost the ranks more CPU than the step's own
    bookkeeping.) The answer is read when asked for (on a GPU that read synchronises)."""

    def __init__(self, completed: nn.Parameter, world_size: int) -> None:
        self.completed = completed
        self.world_size = world_size
        self._answer: torch.Tensor | None = None
        self._ok = True

    def term(self, done: bool) -> torch.Tensor:
        """What a rank adds to the loss of its synchronised backward (its value is 0; its
        gradient with respect to ``completed`` is c: the parameter itself when c = 1)."""
        self.completed.grad = None
        return self.completed if done else self.completed * 0.0

    def collect(self) -> None:
        """After the synchronised backward: keep the reduced answer for :attr:`all_ok`."""
        self._answer, self.completed.grad = self.completed.grad, None

    @property
    def all_ok(self) -> bool:
        if self._answer is not None:
            self._ok = float(self._answer) > 1.0 - 0.5 / self.world_size
            self._answer = None
        return self._ok


class _Clock:
    """Marks in a step: ``perf_counter`` on the CPU; on a GPU, CUDA events on the current
    stream (device time: CPU time stamps would only see kernels being queued), read once
    the step's one synchronisation has passed. A gradient's stamp re-records one event, so
    the last record is the last gradient."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self._grad_event: Any = (
            torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
            if self.cuda
            else None
        )
        self.grad_mark: Any = None  # the last gradient's mark since :meth:`reset_grad`

    def mark(self) -> Any:
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
        event.record()
        return event

    def seconds(self, start: Any, end: Any) -> float:
        if not self.cuda:
            return float(end - start)
        return float(start.elapsed_time(end)) / 1e3

    def reset_grad(self) -> None:
        self.grad_mark = None

    def stamp_grad(self, _: torch.Tensor) -> None:
        """A parameter's gradient hook (see the module doc); leaves the gradient as is."""
        if self.cuda:
            self._grad_event.record()
            self.grad_mark = self._grad_event
        else:
            self.grad_mark = time.perf_counter()


class _ResidentSet:
    """This process's resident set size: read from an open ``/proc/self/statm`` on Linux
    (one ``pread``, no file opened per step), else from psutil."""

    def __init__(self) -> None:
        self._page_mb = os.sysconf("SC_PAGE_SIZE") / 2**20 if hasattr(os, "sysconf") else 0.0
        try:
            self._fd: int | None = os.open("/proc/self/statm", os.O_RDONLY)
        except OSError:
            self._fd = None
        self._process = psutil.Process()

    def mb(self) -> float:
        if self._fd is not None:
            try:
                return int(os.pread(self._fd, 128, 0).split()[1]) * self._page_mb
            except (OSError, IndexError, ValueError):
                self._fd = None
        return float(self._process.memory_info().rss) / 2**20


_RSS: _ResidentSet | None = None


def _resident_set() -> _ResidentSet:
    """One reader per process (a shared group runs several jobs)."""
    global _RSS
    if _RSS is None:
        _RSS = _ResidentSet()
    return _RSS


def _buffers_of(module: nn.Module) -> list[torch.Tensor]:
    """Every buffer of ``module`` and its submodules, each once, in ``module.buffers()``'s
    order: the same walk without building names (it runs every step; ``buffers()`` costs
    several times more on a small model)."""
    out: list[torch.Tensor] = []
    seen_modules: set[int] = set()
    seen: set[int] = set()
    stack = [module]
    while stack:
        m = stack.pop()
        if id(m) in seen_modules:
            continue
        seen_modules.add(id(m))
        for b in m._buffers.values():
            if b is not None and id(b) not in seen:
                seen.add(id(b))
                out.append(b)
        stack.extend(reversed([c for c in m._modules.values() if c is not None]))
    return out


class RankJob:
    """Everything one rank holds for a job, built from the shipped dict."""

    def __init__(self, job: dict[str, Any], rank: int, world_size: int) -> None:
        self.rank = rank
        self.world_size = world_size
        self.step_fn = job["step"]
        model: nn.Module = job["model"]
        self.optimizer: torch.optim.Optimizer = job["optimizer"]
        self.data: DataSource = job["data"]
        self.clip: float | None = job.get("clip_grad_norm")
        device_ids: list[int] = list(job.get("device_ids") or [])
        self.device = torch.device("cuda", device_ids[rank]) if device_ids else torch.device("cpu")
        if job.get("sync_bn"):
            convert = nn.SyncBatchNorm.convert_sync_batchnorm
            model = convert(model)  # type: ignore[no-untyped-call]  # same Parameter objects
        model.to(self.device)
        for state in self.optimizer.state.values():  # moments follow their parameter
            for key, value in state.items():
                if isinstance(value, torch.Tensor) and value.dim() > 0:
                    state[key] = value.to(self.device)
        model.train()
        self.module = model
        holder = _WithCompletion(model, self.device)
        self.ddp = DistributedDataParallel(
            holder, device_ids=[self.device.index] if device_ids else None
        )
        self.ddp.module = model  # DDP reduces ``completed`` too; it runs the user's module
        self.agreement = _Agreement(holder.completed, world_size)
        self.clock = _Clock(self.device)
        for p in model.parameters():
            if p.requires_grad:
                p.register_hook(self.clock.stamp_grad)  # type: ignore[no-untyped-call]
        self._ddp_returned = False
        self.ddp.register_forward_hook(lambda *_: self._returned())
        self.plans: list[tuple[int, tuple[float, ...], int, tuple[int | None, ...] | None]] = [
            (0, tuple(1.0 / world_size for _ in range(world_size)), 1, None)
        ]
        self.history: list[tuple[int, int]] = []  # (step, samples on this rank) per attempt
        self.applied = 0
        self._buffers: list[torch.Tensor] = []  # copies of the buffers, saved each step
        self._buffer_sources: list[torch.Tensor] = []  # the buffers they were copied from
        self._unapplied = False  # a forward/backward ran that no apply or discard followed
        self._rss = _resident_set()
        self._layout: tuple[Any, RankLayout] | None = None  # the last one, with its key

    @property
    def all_ok(self) -> bool:
        """Every rank completed the last step (learned with its gradients' all-reduce)."""
        return self.agreement.all_ok

    def _returned(self) -> None:
        self._ddp_returned = True

    # -- plans ------------------------------------------------------------------------------
    def add_plan(
        self,
        from_step: int,
        shares: tuple[float, ...],
        micro_batches: int,
        caps: tuple[int | None, ...] | None,
    ) -> None:
        """Use this plan from step ``from_step`` on (later plans for the same step win)."""
        self.plans = [p for p in self.plans if p[0] < from_step]
        self.plans.append((from_step, shares, micro_batches, caps))

    def _plan_at(
        self, step: int
    ) -> tuple[int, tuple[float, ...], int, tuple[int | None, ...] | None]:
        chosen = max((p for p in self.plans if p[0] <= step), key=lambda p: p[0])
        # steps only move forward (a retry is the same step): earlier plans never come back
        self.plans = [p for p in self.plans if p[0] >= chosen[0]]
        return chosen

    def _layout_of(
        self,
        chosen: tuple[int, tuple[float, ...], int, tuple[int | None, ...] | None],
        batch: int,
        micro: int | None,
    ) -> RankLayout:
        """``batch`` samples laid out by plan ``chosen`` with ``micro`` micro-batches (None:
        the plan's); the last layout is reused for the same plan, batch and count."""
        _, shares, planned, caps = chosen
        m = planned if micro is None else micro
        key = (chosen, batch, m)
        if self._layout is None or self._layout[0] != key:
            self._layout = (key, rank_layout(shares, batch, m, caps))
        return self._layout[1]

    def _step_layouts(self, tokens: tuple[BatchToken, ...]) -> list[RankLayout]:
        """The layout of each plain global batch of a step.

        A step of several batches (an accumulation group, :class:`.data.StepToken`) uses
        the plan in force at its *first* batch for all of them (a retry then finds the same
        plan), and the controller plans it as one global batch of the group's ``S``
        samples (that is what the step reports): the plan's ``m`` micro-batches of about
        ``S/m`` samples become ``ceil(m·Bⱼ/S)`` pieces of batch ``j`` (``Bⱼ`` samples), so no
        piece is larger than the plan's and caps bound every piece as planned.

        A piece never spans two batches (the step sees samples of one loader batch, as
        under the DataParallel engine, and a list of batches need not concatenate). So
        while the plan's micro-batches hold more than one batch (``m`` < ``k``), the pieces
        here are smaller than planned: an out-of-memory then makes the controller cap a
        rank above what it ran, and finding the fit can take a few more retries (each
        retry exact: the whole group again from zeroed gradients)."""
        chosen = self._plan_at(tokens[0].step)
        if len(tokens) == 1:
            return [self._layout_of(chosen, tokens[0].batch, None)]
        total = max(1, sum(t.batch for t in tokens))
        planned = max(1, int(chosen[2]))
        return [
            self._layout_of(chosen, t.batch, max(1, math.ceil(planned * t.batch / total)))
            for t in tokens
        ]

    # -- one step ---------------------------------------------------------------------------
    def forward_backward(self, token: BatchToken) -> dict[str, Any]:
        """Forward + backward of this rank's slice of every global batch of the step (one,
        or an accumulation group: :class:`.data.StepToken`); gradients left for
        :meth:`apply`. Raises an out-of-memory only after this rank has joined the step's
        all-reduce (with an empty slice) and cleared its gradients; :class:`StepFailed`
        when it can no longer join. Afterwards :attr:`all_ok` tells whether every rank
        completed it.

        An accumulation group is one step of many pieces: each batch's slice, split as its
        layout says, every piece's mean loss weighted by ``n·W/S`` (``S`` the group's
        samples), every backward but the last under ``no_sync``. DDP's one all-reduce
        then leaves every rank the gradient of the mean loss over the whole group, which
        is the sum of each batch's mean-loss gradient weighted by ``Bⱼ/S`` (the
        DataParallel engine's accumulation). The gradients live only here between the
        pieces, so an out-of-memory in any piece drops the whole group's and the kernel
        retries the whole group from zeroed gradients: no batch is lost or counted twice."""
        tokens, autocast = token_parts(token)
        layouts = self._step_layouts(tokens)
        group_total = sum(t.batch for t in tokens)
        self.optimizer.zero_grad(set_to_none=True)
        self._save_buffers()
        self._unapplied = True
        mine = 0
        for t, lay in zip(tokens, layouts, strict=True):
            self.history.append((t.step, lay.sizes[self.rank]))
            mine += lay.sizes[self.rank]
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        stats = {"forward_s": 0.0, "backward_s": 0.0, "wait_s": 0.0, "peak_mb": 0.0}
        cast = None if autocast is None else (self.device.type, AUTOCAST[autocast])
        t0 = time.perf_counter()
        try:
            loss_sum, pieces = self._pieces(tokens, layouts, group_total, cast, stats)
        except Exception as exc:
            if not is_oom(exc):
                raise
            message = (str(exc).splitlines() or ["out of memory"])[0]
            if self._ddp_returned and self._in_synced:
                raise StepFailed(
                    f"rank {self.rank} ran out of memory after its synchronised forward "
                    f"({message}): the ranks cannot retry this step together."
                ) from None
            del exc
            self._join_empty(tokens[0], cast)  # the others learn that this rank did not
            self.discard()
            raise torch.OutOfMemoryError(message) from None
        if mine == 0:
            self._restore_buffers()  # statistics of an empty batch are not statistics
        if self.device.type == "cuda":
            stats["peak_mb"] = torch.cuda.max_memory_allocated(self.device) / 2**20
        return {
            "step": token.step,
            "rank": self.rank,
            "batch": mine,
            "pieces": pieces,
            "loss_sum": loss_sum,
            "wall_s": time.perf_counter() - t0,
            **stats,
        }

    _in_synced = False

    def _run_step(self, piece: Any, cast: tuple[str, torch.dtype] | None) -> torch.Tensor:
        """The user's step on one piece (under autocast for bf16; backward stays outside,
        as PyTorch recommends and as the DataParallel engine does)."""
        if cast is None:
            return check_loss(self.step_fn(self.ddp, piece))
        with torch.autocast(device_type=cast[0], dtype=cast[1]):
            return check_loss(self.step_fn(self.ddp, piece))

    def _piece_plan(
        self, tokens: tuple[BatchToken, ...], layouts: list[RankLayout]
    ) -> list[tuple[int, tuple[int, ...]]]:
        """Per global batch with samples here (index into ``tokens``): this rank's pieces.
        A rank with no sample in the whole step keeps one empty piece of the last batch:
        every rank joins the step's all-reduce exactly once, with its last piece."""
        plan = [
            (j, tuple(n for n in lay.pieces[self.rank] if n > 0))
            for j, lay in enumerate(layouts)
            if lay.sizes[self.rank] > 0
        ]
        return plan or [(len(tokens) - 1, (0,))]

    def _pieces(
        self,
        tokens: tuple[BatchToken, ...],
        layouts: list[RankLayout],
        total: int,
        cast: tuple[str, torch.dtype] | None,
        stats: dict[str, float],
    ) -> tuple[float, int]:
        """Run every piece of the step (see :meth:`forward_backward`); the sum over the
        pieces of mean loss × samples, and the number of pieces run."""
        plan = self._piece_plan(tokens, layouts)
        count = sum(len(p) for _, p in plan)
        clock = self.clock
        # Σ mean loss × samples: on a GPU summed on the device (no sync per piece), on the
        # CPU in Python (reading a CPU tensor costs nothing; three tensor ops would)
        loss_sum: torch.Tensor | float = (
            torch.zeros((), dtype=torch.float64, device=self.device) if clock.cuda else 0.0
        )
        marks: list[tuple[Any, Any, Any, Any]] = []  # per piece: start, loss, last grad, end
        done = 0
        for j, pieces in plan:
            token = tokens[j]
            start, stop = slice_bounds(layouts[j].sizes, self.rank)
            batch = load_slice(self.data, token, start, stop)
            if clock.cuda:  # (the shipped data is on the CPU: nothing to move on a CPU rank)
                batch = move_to(batch, self.device)
            parts = [batch] if len(pieces) == 1 else split_batch(batch, pieces)
            for piece, n in zip(parts, pieces, strict=True):
                done += 1
                synced = done == count
                self._in_synced = synced
                self._ddp_returned = False
                ctx = contextlib.nullcontext() if synced else self.ddp.no_sync()
                with ctx:
                    t0 = clock.mark()
                    loss = self._run_step(piece, cast)
                    t1 = clock.mark()
                    if not clock.cuda:
                        stats["peak_mb"] = max(stats["peak_mb"], self._rss.mb())
                    clock.reset_grad()
                    weight = loss_weight(n, total, self.world_size)
                    weighted = loss if weight == 1.0 else loss * weight  # (equal shares: 1)
                    if synced:
                        weighted = weighted + self.agreement.term(True)
                    weighted.backward()  # type: ignore[no-untyped-call]
                    t2 = clock.mark()
                    if synced:
                        self.agreement.collect()
                marks.append((t0, t1, clock.grad_mark if synced else None, t2))
                if n > 0:
                    if clock.cuda:
                        loss_sum += loss.detach().double() * n
                    else:
                        loss_sum += float(loss.detach()) * n
            del batch, parts
        self._in_synced = False
        total_loss = float(loss_sum)  # the one device-to-host copy (sync) of the step
        for t0, t1, handoff, t2 in marks:
            stats["forward_s"] += clock.seconds(t0, t1)
            backward = clock.seconds(t1, t2)
            # the last gradient's stamp splits backward from the wait for the all-reduce
            to_handoff = clock.seconds(t1, handoff) if handoff is not None else -1.0
            if 0.0 <= to_handoff <= backward:
                stats["backward_s"] += to_handoff
                stats["wait_s"] += backward - to_handoff
            else:
                stats["backward_s"] += backward
        return total_loss, count

    def _join_empty(self, token: BatchToken, cast: tuple[str, torch.dtype] | None) -> None:
        """After an out-of-memory before the synchronised backward: join the step's
        all-reduce with an empty slice (contributing zero gradient) so no rank waits."""
        self.optimizer.zero_grad(set_to_none=True)
        empty = move_to(load_slice(self.data, token, 0, 0), self.device)
        self._in_synced = True
        self._ddp_returned = False
        loss = self._run_step(empty, cast)
        (loss * 0.0 + self.agreement.term(False)).backward()  # type: ignore[no-untyped-call]
        self.agreement.collect()
        self._in_synced = False

    def _save_buffers(self) -> None:
        """Copy the module's buffers into the saved copies, allocated on first use (again
        only when a buffer was replaced or changed shape or dtype)."""
        bufs = _buffers_of(self.module)
        reuse = len(bufs) == len(self._buffer_sources) and all(
            b is src and saved.shape == b.shape and saved.dtype == b.dtype
            for b, src, saved in zip(bufs, self._buffer_sources, self._buffers, strict=True)
        )
        if not reuse:
            self._buffer_sources = bufs
            self._buffers = [b.detach().clone() for b in bufs]
            return
        with torch.no_grad():
            for saved, b in zip(self._buffers, bufs, strict=True):
                saved.copy_(b)

    def _restore_buffers(self) -> None:
        with torch.no_grad():
            for buf, saved in zip(_buffers_of(self.module), self._buffers, strict=True):
                buf.copy_(saved)

    def discard(self) -> None:
        """Forget the step's gradients and buffer updates (the step will be retried, or
        was never to be applied); after an applied step only the gradients go."""
        self.optimizer.zero_grad(set_to_none=True)
        if self._unapplied and self._buffers:
            self._restore_buffers()
        self._unapplied = False

    def apply(self, hyper: list[dict[str, Any]] | None) -> None:
        """The optimizer step, with the kernel optimizer's hyper-parameters (a scheduler
        steps the kernel's optimizer; its learning rate travels here)."""
        if hyper is not None:
            for group, values in zip(self.optimizer.param_groups, hyper, strict=True):
                group.update(values)
        if self.clip is not None:
            torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.clip)
        self.optimizer.step()
        self.applied += 1
        self._unapplied = False

    def gradients(self) -> dict[str, torch.Tensor | None]:
        """The gradients the step left, by parameter name, on the CPU."""
        return {
            name: None if p.grad is None else p.grad.detach().to("cpu").clone()
            for name, p in self.module.named_parameters()
        }

    def state(self) -> dict[str, Any]:
        """The model's and optimizer's state dicts of the last applied step, on the CPU (the
        buffers as they were before a forward/backward not applied yet)."""

        def cpu(obj: Any) -> Any:
            if isinstance(obj, torch.Tensor):
                return obj.detach().to("cpu").clone()
            if isinstance(obj, dict):
                return {k: cpu(v) for k, v in obj.items()}
            if isinstance(obj, list):
                return [cpu(v) for v in obj]
            return obj

        model = self.module.state_dict()
        if self._unapplied and self._buffers:
            saved_for = {id(b): s for b, s in zip(self._buffer_sources, self._buffers, strict=True)}
            for name, buf in self.module.named_buffers():
                if name in model and id(buf) in saved_for:
                    model[name] = saved_for[id(buf)]
        return {
            "model": cpu(model),
            "optimizer": cpu(self.optimizer.state_dict()),
            "applied": self.applied,
        }
