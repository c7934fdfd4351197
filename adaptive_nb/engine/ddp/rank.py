"""One rank's side of a DDP job: the shipped model wrapped in DistributedDataParallel,
the optimizer (the ranks apply the step), the plan table, and one step's forward and
backward on the rank's own slice, measured.

Measurement method (what the kernel reads as the rank's compute time): ``forward_s`` is
from the start of each piece to the step function's return (the loss); ``backward_s``
from ``backward()`` to the moment the *last* gradient bucket is handed to the all-reduce
(a DDP communication hook stamps it: every gradient has been computed then); the rest of
``backward()`` is ``wait_s``, time spent waiting for the all-reduce, which is not
compute. Peak memory: CUDA's peak allocated bytes over the step, or on the CPU the
process's resident set after each forward (where activations are largest).
"""

from __future__ import annotations

import contextlib
import os
import time
from typing import Any

import psutil
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ...batches import move_to
from ...errors import is_oom
from ...step import check_loss
from ..microbatch import split_batch
from .data import BatchToken, DataSource, load_slice
from .scaling import RankLayout, loss_weight, rank_layout, slice_bounds

__all__ = ["RankJob", "StepFailed", "is_oom"]


class StepFailed(Exception):
    """An out-of-memory this rank cannot recover from in step with the others (its
    synchronised backward had begun): the group must be restarted."""


class _HookState:
    def __init__(self, world_size: int, device: torch.device) -> None:
        self.world_size = world_size
        self.last_handoff: float | None = None
        self.agree = False  # all-reduce ``flag`` (MIN) after the step's last bucket
        self.flag = torch.ones((), dtype=torch.int32, device=device)  # 1: this rank completed
        self.work: Any = None  # that all-reduce, launched


def _timed_allreduce(state: _HookState, bucket: Any) -> torch.futures.Future[torch.Tensor]:
    """DDP's default all-reduce (sum, then divide by W), stamping when it is handed over.
    With ``state.agree``, the last bucket's all-reduce is followed at once by the ranks'
    agreement on whether they all completed the step (no separate wait for it)."""
    state.last_handoff = time.perf_counter()
    tensor = bucket.buffer().div_(state.world_size)
    work = dist.all_reduce(tensor, async_op=True)
    assert work is not None
    if state.agree and bucket.is_last():
        state.work = dist.all_reduce(state.flag, op=dist.ReduceOp.MIN, async_op=True)
    fut: torch.futures.Future[list[torch.Tensor]] = work.get_future()
    return fut.then(lambda f: f.value()[0])


# DDP checks a hook's annotations as objects (this module's are strings: __future__).
_timed_allreduce.__annotations__["bucket"] = torch._C._distributed_c10d.GradBucket
_timed_allreduce.__annotations__["return"] = torch.futures.Future[torch.Tensor]


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
        self.ddp = DistributedDataParallel(
            model, device_ids=[self.device.index] if device_ids else None
        )
        self.hook = _HookState(world_size, self.device)
        self.ddp.register_comm_hook(self.hook, _timed_allreduce)
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
        self.all_ok = True  # every rank completed the last step that was agreed on
        self._rss = _resident_set()
        self._layout: tuple[Any, RankLayout] | None = None  # the last one, with its key

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

    def layout(self, token: BatchToken) -> RankLayout:
        chosen = max((p for p in self.plans if p[0] <= token.step), key=lambda p: p[0])
        # steps only move forward: earlier plans are never chosen again
        self.plans = [p for p in self.plans if p[0] >= chosen[0]]
        key = (chosen, token.batch)
        if self._layout is None or self._layout[0] != key:  # the same plan and batch: reused
            _, shares, micro, caps = chosen
            self._layout = (key, rank_layout(shares, token.batch, micro, caps))
        return self._layout[1]

    # -- one step ---------------------------------------------------------------------------
    def forward_backward(self, token: BatchToken, agree: bool = False) -> dict[str, Any]:
        """Forward + backward of this rank's slice; gradients left for :meth:`apply`.
        Raises an out-of-memory only after this rank has joined the step's all-reduce
        (with an empty slice) and cleared its gradients; :class:`StepFailed` when it can
        no longer join. ``agree``: the ranks also learn whether they all completed it
        (``all_ok``; every rank must be given the same ``agree``)."""
        self.hook.agree = agree
        self.hook.flag.fill_(1)
        self.hook.work = None
        lay = self.layout(token)
        self.optimizer.zero_grad(set_to_none=True)
        self._save_buffers()
        self._unapplied = True
        start, stop = slice_bounds(lay.sizes, self.rank)
        mine = lay.sizes[self.rank]
        self.history.append((token.step, mine))
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        stats = {"forward_s": 0.0, "backward_s": 0.0, "wait_s": 0.0, "peak_mb": 0.0}
        t0 = time.perf_counter()
        try:
            batch = move_to(load_slice(self.data, token, start, stop), self.device)
            loss_sum = self._pieces(batch, lay.pieces[self.rank], token.batch, stats)
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
            self.hook.flag.fill_(0)  # the others learn it with the all-reduce it joins
            self._join_empty(token)
            self._agreement()
            self.discard()
            raise torch.OutOfMemoryError(message) from None
        self._agreement()
        if mine == 0:
            self._restore_buffers()  # statistics of an empty batch are not statistics
        if self.device.type == "cuda":
            stats["peak_mb"] = torch.cuda.max_memory_allocated(self.device) / 2**20
        return {
            "step": token.step,
            "rank": self.rank,
            "batch": mine,
            "pieces": len(lay.pieces[self.rank]),
            "loss_sum": loss_sum,
            "wall_s": time.perf_counter() - t0,
            **stats,
        }

    _in_synced = False

    def _pieces(
        self, batch: Any, pieces: tuple[int, ...], total: int, stats: dict[str, float]
    ) -> float:
        parts = [batch] if len(pieces) == 1 else split_batch(batch, pieces)
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        for j, (piece, n) in enumerate(zip(parts, pieces, strict=True)):
            synced = j == len(pieces) - 1
            self._in_synced = synced
            self._ddp_returned = False
            ctx = contextlib.nullcontext() if synced else self.ddp.no_sync()
            with ctx:
                t0 = time.perf_counter()
                loss = check_loss(self.step_fn(self.ddp, piece))
                t1 = time.perf_counter()
                if self.device.type == "cpu":
                    rss = self._rss.mb()
                    stats["peak_mb"] = max(stats["peak_mb"], rss)
                self.hook.last_handoff = None
                (loss * loss_weight(n, total, self.world_size)).backward()  # type: ignore[no-untyped-call]
                t2 = time.perf_counter()
            stats["forward_s"] += t1 - t0
            handoff = self.hook.last_handoff if synced else None
            if handoff is not None and handoff >= t1:
                stats["backward_s"] += handoff - t1
                stats["wait_s"] += t2 - handoff
            else:
                stats["backward_s"] += t2 - t1
            if n > 0:
                loss_sum += loss.detach().double() * n  # on the device: no sync per piece
        self._in_synced = False
        return float(loss_sum)  # the one device-to-host copy of the step

    def _join_empty(self, token: BatchToken) -> None:
        """After an out-of-memory before the synchronised backward: join the step's
        all-reduce with an empty slice (contributing zero gradient) so no rank waits."""
        self.optimizer.zero_grad(set_to_none=True)
        empty = move_to(load_slice(self.data, token, 0, 0), self.device)
        self._in_synced = True
        self._ddp_returned = False
        loss = check_loss(self.step_fn(self.ddp, empty))
        (loss * 0.0).backward()  # type: ignore[no-untyped-call]
        self._in_synced = False

    def _save_buffers(self) -> None:
        """Copy the module's buffers into the saved copies, allocated on first use (again
        only when a buffer was replaced or changed shape or dtype)."""
        bufs = list(self.module.buffers())
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
            for buf, saved in zip(self.module.buffers(), self._buffers, strict=True):
                buf.copy_(saved)

    def _agreement(self) -> None:
        """``all_ok``: whether every rank completed the step just run (when agreed on)."""
        hook = self.hook
        if not hook.agree:
            return
        if hook.work is None:  # no gradient bucket was reduced (on any rank): ask now
            dist.all_reduce(hook.flag, op=dist.ReduceOp.MIN)
        else:
            hook.work.wait()
            hook.work = None
        self.all_ok = bool(hook.flag.item())

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
            for (name, _), saved in zip(self.module.named_buffers(), self._buffers, strict=True):
                if name in model:
                    model[name] = saved
        return {
            "model": cpu(model),
            "optimizer": cpu(self.optimizer.state_dict()),
            "applied": self.applied,
        }
