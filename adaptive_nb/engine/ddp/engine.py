"""The kernel side of DistributedDataParallel: :class:`DDPEngine` drives ``W`` rank
processes (:mod:`.launcher`) one step at a time; the kernel never loads the data nor
computes a gradient, it hands out :class:`~.data.BatchToken` s and plans and reads back
measurements.

Loop integration (what ``run/loop.py`` must do differently when
``engine.owns_optimizer_step`` is true):

1. iterate ``engine.iter_batches(data, epochs)`` instead of the data (tokens, not
   tensors: no ``move_to``; ``batch_size_of`` → ``token.batch``);
2. call ``engine.forward_backward(step, token)`` as usual (``step`` is ignored: the ranks
   run the user's step shipped at start; retries after ``OutOfMemory`` work unchanged);
3. instead of ``optimizer.step()`` call ``engine.optimizer_step()`` (the kernel
   optimizer's hyper-parameters, e.g. a scheduler's learning rate, travel with it);
   ``zero_grad`` on the kernel model is harmless; gradient clipping is the engine's
   ``clip_grad_norm`` option (the kernel holds no gradients);
4. on :class:`~.errors.WorkerLost` stop cleanly (no re-plan: a rank cannot be dropped
   without restarting the group); ``close()`` then loads the last completed step into
   the notebook's model and optimizer;
5. pause/stop need nothing: the ranks run only the commands the loop sends, so the loop's
   step boundary is every rank's. Not covered yet (refuse with this engine):
   ``accumulate`` > 1 and ``precision`` (they act on gradients the kernel does not hold).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from ...errors import OutOfMemory, UsageError
from ...layout import Plan
from ...step import StepFn, StepOutcome
from ..base import Engine
from . import channel as ch
from .data import BatchToken, describe_data, iter_tokens
from .errors import DDPStartError, WorkerLost, remote_error
from .launcher import WorkerGroup
from .payload import dumps_job
from .validate import check_job

__all__ = ["DDPEngine"]


class DDPEngine(Engine):
    """Weighted DistributedDataParallel over ``world_size`` rank processes.

    ``step``, ``model``, ``optimizer`` and ``data`` are the user's objects: copies go to
    every rank at :meth:`start`; at :meth:`close` the model and optimizer get the state of
    the last completed step. ``group``: an already started :class:`WorkerGroup` to reuse
    (it is left running at close); otherwise the engine starts and stops its own. A
    failed step ends the group even when shared (a rank may be stuck in a collective);
    the next engine on it starts fresh processes.
    ``device_ids``: one CUDA device per rank (nccl); default the CPU (gloo)."""

    owns_optimizer_step = True

    def __init__(
        self,
        step: StepFn,
        *,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        data: Any,
        world_size: int = 2,
        sync_bn: bool = False,
        clip_grad_norm: float | None = None,
        device_ids: list[int] | None = None,
        group: WorkerGroup | None = None,
        threads: int | None = None,
        master_port: int | None = None,
        data_name: str = "data",
    ) -> None:
        if group is not None:
            world_size = group.world_size
        check_job(step, model, optimizer, world_size)
        if device_ids is not None and len(device_ids) != world_size:
            raise UsageError(
                f"device_ids has {len(device_ids)} entries for {world_size} ranks: give one "
                "GPU per rank."
            )
        if sync_bn and not device_ids:
            raise UsageError(
                "sync_bn=True needs one GPU per rank (device_ids=[...]): torch's "
                "SyncBatchNorm runs only on GPUs. On CPU ranks leave sync_bn off: each rank's "
                "BatchNorm then normalises its own slice and rank 0's running statistics are "
                "kept (as with DataParallel)."
            )
        self.source = describe_data(data, data_name)
        self.data_name = data_name
        self.model = model
        self.optimizer = optimizer
        self.world_size = world_size
        self.device_ids = device_ids
        self._job = {
            "step": step,
            "model": model,
            "optimizer": optimizer,
            "data": self.source,
            "sync_bn": sync_bn,
            "clip_grad_norm": clip_grad_norm,
            "device_ids": device_ids,
        }
        self._own_group = group is None
        self.group = group or WorkerGroup(
            world_size,
            backend="nccl" if device_ids else "gloo",
            threads=threads,
            master_port=master_port,
            device_ids=device_ids,
        )
        self.plan = Plan(
            tuple(range(world_size)), tuple(1.0 / world_size for _ in range(world_size)), 1, 0
        )
        self.last_batch = 0
        self.applied = 0  # optimizer steps the ranks have been told to apply
        self._next_step = 0  # the step index of the next forward_backward
        self._pending: BatchToken | None = None  # forward/backward done, not yet applied
        self._apply_hyper: list[dict[str, Any]] | None = None  # an update not yet sent
        self._running = False
        self._closed = False
        self._busy = False  # a step command whose replies have not all been read
        self.last_replies: dict[int, dict[str, Any]] = {}
        self.recovered_from: int | None = None  # the rank whose state came home after a failure

    # -- Engine -----------------------------------------------------------------------------
    def device_names(self) -> list[str]:
        if self.device_ids:
            return [f"rank {r} (GPU {d})" for r, d in enumerate(self.device_ids)]
        return [f"rank {r} (cpu)" for r in range(self.world_size)]

    def monitor_keys(self) -> list[int | None]:
        if self.device_ids:
            return list(self.device_ids)
        return [None] * self.world_size

    def prepare(self, model: nn.Module) -> nn.Module:
        """Start the ranks (the kernel's model itself is not trained in place)."""
        self.start()
        return model

    def start(self) -> DDPEngine:
        """Ship the job (pickled first: nothing starts if it cannot be), start the ranks
        if needed, and wait until each has built its model, DDP wrapper and optimizer."""
        if self._running:
            return self
        payload = dumps_job(self._job)
        self.group.start()
        try:
            self.group.send_all((ch.JOB, payload))
            # no collective while loading: every rank answers, even after another failed
            replies = self.group.gather(what="loading the job", stop_on=frozenset())
            failed = [r for r in replies.values() if r[0] == ch.FAILED]
            if failed:
                _, rank, kind, message, _, _ = failed[0]
                raise DDPStartError(
                    f"rank {rank} could not load the job ({kind}: {message}). What the step "
                    "uses must be defined in the notebook or importable by the ranks (they "
                    "get the kernel's sys.path)."
                )
            self._expect_ok(replies, "loading the job")
            self._send_plan(self.plan, 0)
        except BaseException:
            self._shutdown()
            raise
        self._running = True
        return self

    def apply_plan(self, plan: Plan, from_step: int | None = None) -> None:
        """Use ``plan`` (shares per rank) from step ``from_step`` on (default: the next
        forward/backward, a retry included). Every rank switches at that same step."""
        self.plan = plan
        if self._running:
            self._send_plan(plan, self._next_step if from_step is None else from_step)

    def _send_plan(self, plan: Plan, from_step: int) -> None:
        caps = tuple(plan.caps) if plan.caps else None
        try:
            self._flush_apply()
            self.group.send_all((ch.PLAN, from_step, tuple(plan.shares), plan.micro_batches, caps))
        except WorkerLost:
            self._bring_home_after_failure()
            raise

    def iter_batches(self, data: Any, epochs: int | None = 1) -> Iterator[BatchToken]:
        """Tokens for the loop to hand to :meth:`forward_backward` (no sample is loaded)."""
        return iter_tokens(data, epochs, self.data_name)

    def forward_backward(self, step: StepFn | None, batch: Any) -> StepOutcome:
        """One step on every rank. ``step`` is ignored (the ranks run the shipped step);
        ``batch`` is a :class:`BatchToken`. The gradients stay on the ranks until
        :meth:`optimizer_step`. On an out-of-memory every rank has dropped the step's
        gradients before :class:`OutOfMemory` is raised; retry with the same token."""
        if not isinstance(batch, BatchToken):
            raise TypeError("DDPEngine.forward_backward takes a BatchToken (see iter_batches)")
        if not self._running:
            raise RuntimeError("DDPEngine.start() (or prepare()) must be called first")
        token = batch
        self._next_step = token.step
        self.last_batch = token.batch
        t0 = time.perf_counter()
        self._busy = True  # stays set if the wait is interrupted (Ctrl-C): see close()
        replies = self._command((ch.STEP, token), f"step {token.step}")
        self._busy = False
        wall = time.perf_counter() - t0
        ooms = [r for r in replies.values() if r[0] == ch.OOM]
        if ooms:
            self._expect_ok(self._command((ch.DISCARD,), "discarding"), "discarding the step")
            rank, message = ooms[0][1], ooms[0][2]
            raise OutOfMemory(f"rank {rank}: {message}", device=rank)
        stats = {int(r[1]["rank"]): r[1] for r in replies.values()}
        self.last_replies = stats
        self._pending = token
        self._next_step = token.step + 1
        total = token.batch
        loss = sum(s["loss_sum"] for s in stats.values()) / total if total else 0.0
        return StepOutcome(
            loss=torch.tensor(loss),
            samples=total,
            wall_s=wall,
            device_time_s={r: s["forward_s"] + s["backward_s"] for r, s in stats.items()},
            device_batch={r: s["batch"] for r, s in stats.items() if s["batch"] > 0},
            peak_mem_mb={r: s["peak_mb"] for r, s in stats.items()},
            micro_batches=max(s["pieces"] for s in stats.values()),
            device_phase_s={
                r: {"forward": s["forward_s"], "backward": s["backward_s"]}
                for r, s in stats.items()
            },
        )

    def optimizer_step(self) -> None:
        """Apply the step on every rank, with the kernel optimizer's hyper-parameters as
        they are now. Sent with the next command (the next step's, usually) and not waited
        for: that command's reply tells of any failure."""
        if self._pending is None:
            raise RuntimeError("optimizer_step() without a completed forward_backward()")
        hyper = [
            {k: v for k, v in g.items() if k != "params" and isinstance(v, (int, float, bool))}
            for g in self.optimizer.param_groups
        ]
        self._apply_hyper = hyper  # sent with the next command (one message, one wake-up)
        # the step *was* taken (on the ranks): a scheduler on the kernel optimizer must not
        # warn that it steps before the optimizer (torch reads this flag)
        setattr(self.optimizer, "_opt_called", True)  # noqa: B010
        self.applied += 1
        self._pending = None

    def _flush_apply(self) -> None:
        """Send the optimizer step the loop asked for, before any other command."""
        hyper, self._apply_hyper = self._apply_hyper, None
        if hyper is not None:
            self.group.send_all((ch.APPLY, hyper))

    def rank_log(self) -> dict[int, list[tuple[int, int]]]:
        """Per rank, the ``(step, samples)`` of every forward/backward it ran."""
        return {r: list(m[2]) for r, m in self._command((ch.LOG,), "reading the logs").items()}

    def gradients(self) -> dict[int, dict[str, torch.Tensor | None]]:
        """Per rank, the gradients of the last forward/backward (by parameter name)."""
        return {r: m[2] for r, m in self._command((ch.GRADS,), "reading gradients").items()}

    # -- replies and failures -----------------------------------------------------------------
    def _command(self, message: tuple[Any, ...], what: str) -> dict[int, tuple[Any, ...]]:
        """Send ``message`` to every rank and gather their replies (failures handled)."""
        try:
            if message[0] == ch.STEP and self._apply_hyper is not None:
                hyper, self._apply_hyper = self._apply_hyper, None
                message = (ch.STEP, message[1], hyper)
            self._flush_apply()
            self.group.send_all(message)
        except WorkerLost:
            self._bring_home_after_failure()
            raise
        return self._gather(what)

    def _gather(self, what: str) -> dict[int, tuple[Any, ...]]:
        try:
            replies = self.group.gather(what=what)
        except WorkerLost:
            self._bring_home_after_failure()
            raise
        for reply in replies.values():
            if reply[0] == ch.LOST:
                self._bring_home_after_failure(prefer=int(reply[1]))
                raise WorkerLost(reply[2], device=int(reply[1]))
            if reply[0] == ch.FAILED:
                rank = int(reply[1])
                dead = self.group.dead_rank(reply[3])
                self._bring_home_after_failure(prefer=rank)
                if dead is not None:  # the rank only saw its peer go
                    raise WorkerLost(
                        f"rank {dead} died (exit code {self.group.procs[dead].poll()}) during "
                        f"{what}; rank {rank} saw: {reply[3].splitlines()[0][:200]}",
                        device=dead,
                    )
                raise remote_error(reply)
        return replies

    def _expect_ok(self, replies: dict[int, tuple[Any, ...]], what: str) -> None:
        for reply in replies.values():
            if reply[0] == ch.FAILED:
                raise remote_error(reply)
            if reply[0] != ch.OK:
                raise RuntimeError(f"unexpected reply while {what}: {reply[0]!r}")

    def _bring_home_after_failure(self, prefer: int | None = None) -> None:
        """After a failed step: load the last completed step from a rank that still answers
        (``prefer`` first: it replied, so it is listening), then end the group."""
        order = ([prefer] if prefer is not None else []) + self.group.alive()
        for rank in dict.fromkeys(order):
            try:
                self.group.send(rank, (ch.STATE,))
                reply = self.group.receive_until(rank, ch.STATE, timeout=10.0)
            except WorkerLost:
                continue
            self._load(reply[2])
            self.recovered_from = rank
            break
        self._running = False
        self._closed = True
        self.group.kill()  # the others may wait in a collective that never completes

    def _load(self, state: dict[str, Any]) -> None:
        """The ranks' model and optimizer state into the kernel's objects. The kernel's
        hyper-parameters stay as they are: a scheduler stepped them after the last update
        the ranks applied (the ranks only ever see them with the next update)."""
        hyper = [{k: v for k, v in g.items() if k != "params"} for g in self.optimizer.param_groups]
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        for group, kept in zip(self.optimizer.param_groups, hyper, strict=True):
            group.update(kept)

    # -- end --------------------------------------------------------------------------------
    def close(self) -> None:
        """Bring the last completed step home (rank 0's model and optimizer state into the
        notebook's objects) and stop the ranks (or end the job on a shared group)."""
        if self._closed:
            return
        self._closed = True
        if not self._running:
            self._shutdown()
            return
        if self._busy:  # a step's replies were never read: skip them, then end the group
            try:
                self._flush_apply()
                self.group.send(0, (ch.STATE,))
                self._load(self.group.receive_until(0, ch.STATE, timeout=600.0)[2])
            finally:
                self._running = False
                self.group.kill()
            return
        try:
            self._flush_apply()
            self.group.send(0, (ch.STATE,))
            reply = self._gather_one(0, "reading the state")
            self._load(reply[2])
        finally:
            self._shutdown()

    def _gather_one(self, rank: int, what: str) -> tuple[Any, ...]:
        reply = self.group.gather([rank], what=what)[rank]
        if reply[0] == ch.FAILED:
            raise remote_error(reply)
        return reply

    def _shutdown(self) -> None:
        self._running = False
        self._closed = True
        if self._own_group:
            self.group.stop()
            return
        if self.group.started and len(self.group.alive()) == self.world_size:
            try:
                self.group.send_all((ch.END,))
                self.group.gather(timeout=30.0, what="ending the job")
            except WorkerLost:
                self.group.kill()
        else:
            self.group.kill()
