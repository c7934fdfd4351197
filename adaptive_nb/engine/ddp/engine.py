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
   with ``accumulate`` > 1 hand it the whole group of tokens in one call
   (``takes_groups``): the ranks keep gradients between the batches of a group, the kernel
   holds none to accumulate (:meth:`DDPEngine.configure_steps`: accumulation, and bf16
   autocast on the ranks);
3. instead of ``optimizer.step()`` call ``engine.optimizer_step()`` (the kernel
   optimizer's hyper-parameters, e.g. a scheduler's learning rate, travel with it);
   ``zero_grad`` on the kernel model is harmless; gradient clipping is the engine's
   ``clip_grad_norm`` option (the kernel holds no gradients);
4. on :class:`~.errors.WorkerLost` the group is gone (a rank cannot be dropped from a
   running process group): stop cleanly — ``close()`` then loads the last completed step
   into the notebook's model and optimizer — or :meth:`DDPEngine.restart` the group on
   the remaining positions and resume from a checkpoint (``run/ddp_backend.py``);
5. pause/stop need nothing: the ranks run only the commands the loop sends, so the loop's
   step boundary is every rank's; :meth:`DDPEngine.fetch_state` brings the ranks' state of
   the last completed step into the kernel's model and optimizer (for a checkpoint).

**Positions and ranks.** The engine shows the controller ``positions`` devices (one per
rank it started with, named ``rank i``); after a restart on fewer ranks, ``slots[r]`` is
the position rank ``r`` of the new group serves, and plans, measurements and errors stay
in positions (a lost position gets share 0), so the controller, the dashboard and the
report keep one device list for the whole run.

**Running ahead** (``run_ahead=True``, as the run loop uses it). Plain DDP loops never
wait between steps; a kernel that drives the ranks in lockstep costs a round trip per step.
So :meth:`forward_backward` sends, right after step ``n``, step ``n+1`` (the token the
stream announced with :meth:`expect_next`) together with step ``n``'s update, flagged to
run only if step ``n`` completes on every rank: after each step the ranks all-reduce one
number saying whether they all completed it (a rank that ran out of memory did not). The
ranks then go from one step to the next without waiting for the kernel, which reads step
``n``'s replies, does its bookkeeping and sends step ``n+2`` when the loop asks for
``n+1``. The update travels with the hyper-parameters the kernel optimizer has when step
``n`` is sent (a scheduler steps them after the update, so they are the update's); an
out-of-memory anywhere makes every rank skip step ``n+1`` and keep step ``n`` unapplied
for the retry. Anything that would make the step sent ahead differ — a new plan for it,
another token, a command in between — first reads its replies and has every rank drop its
work (gradients and buffer updates) and run it again; a state read while it is on its way
(:meth:`fetch_state`) has the buffers from before it. The loop says when no step follows
(``expect_next(None)``: the last step, a stop or a pause requested); one requested while a
step runs costs that step sent ahead, dropped.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ...errors import OutOfMemory, UsageError
from ...layout import Plan
from ...step import StepFn, StepOutcome
from ..base import Engine
from . import channel as ch
from .data import AUTOCAST, BatchToken, StepToken, describe_data, iter_tokens, token_parts
from .errors import DDPStartError, WorkerLost, remote_error
from .launcher import WorkerGroup
from .payload import dumps_job
from .replies import step_outcome
from .validate import check_job

__all__ = ["DDPEngine"]


@dataclass
class _Ahead:
    """A step command sent before the loop asked for it (see the module doc)."""

    token: BatchToken
    sent: float  # perf_counter when it left
    stale: bool = False  # a plan for its step arrived after it: it must run again
    replies: dict[int, tuple[Any, ...]] | None = None  # read early (see fetch_state)
    hyper: list[dict[str, Any]] | None = None  # the previous step's update, sent with it


class DDPEngine(Engine):
    """Weighted DistributedDataParallel over ``world_size`` rank processes.

    ``step``, ``model``, ``optimizer`` and ``data`` are the user's objects: copies go to
    every rank at :meth:`start`; at :meth:`close` the model and optimizer get the state of
    the last completed step. ``group``: an already started :class:`WorkerGroup` to reuse
    (it is left running at close); otherwise the engine starts and stops its own. A
    failed step ends the group even when shared (a rank may be stuck in a collective);
    the next engine on it starts fresh processes.
    ``device_ids``: one CUDA device per rank (nccl); default the CPU (gloo).
    ``run_ahead``: send the next step with the update (see the module doc; the run loop
    turns it on, a subclass that reads replies between steps leaves it off)."""

    owns_optimizer_step = True
    takes_groups = True  # an accumulation group is one step (see :meth:`configure_steps`)

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
        run_ahead: bool = False,
        accumulate: int = 1,
        precision: str = "fp32",
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
        self.world_size = world_size  # ranks in the group now
        self.positions = world_size  # devices shown to the controller (the first group's)
        self.slots = list(range(world_size))  # the position each rank serves
        self.position_device_ids = list(device_ids) if device_ids else None
        self.device_ids = device_ids
        self.restarts = 0
        self.run_ahead = run_ahead
        self.accumulate = 1
        self._autocast: str | None = None
        self.configure_steps(accumulate=accumulate, precision=precision)
        self._threads = threads
        self._master_port = master_port
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
        self.group = group or self._new_group()
        self.plan = Plan(
            tuple(range(world_size)), tuple(1.0 / world_size for _ in range(world_size)), 1, 0
        )
        self._reset_counters()
        self.last_replies: dict[int, dict[str, Any]] = {}
        self.recovered_from: int | None = None  # the rank whose state came home after a failure

    def _new_group(self) -> WorkerGroup:
        """The process group for the ranks of ``self.slots`` (a subclass may start its
        ranks elsewhere: the engine uses only ``WorkerGroup``'s public methods)."""
        return WorkerGroup(
            self.world_size,
            backend="nccl" if self.device_ids else "gloo",
            threads=self._threads,
            master_port=self._master_port,
            device_ids=self.device_ids,
        )

    def _reset_counters(self) -> None:
        self.last_batch = 0
        self.applied = 0  # optimizer steps the ranks have been told to apply
        self._next_step = 0  # the step index of the next forward_backward
        self._pending: BatchToken | None = None  # forward/backward done, not yet applied
        self._apply_hyper: list[dict[str, Any]] | None = None  # an update not yet sent
        self._ahead: _Ahead | None = None  # a step sent before the loop asked for it
        self._update_sent: list[dict[str, Any]] | None = None  # the last update, sent ahead
        self._next_token: BatchToken | None = None  # what the loop will most likely ask next
        self._running = False
        self._closed = False
        self._busy = False  # a step command whose replies have not all been read

    # -- Engine -----------------------------------------------------------------------------
    def device_names(self) -> list[str]:
        ids = self.position_device_ids
        if ids:
            return [f"rank {p} (GPU {d})" for p, d in enumerate(ids)]
        return [f"rank {p} (cpu)" for p in range(self.positions)]

    def monitor_keys(self) -> list[int | None]:
        if self.position_device_ids:
            return list(self.position_device_ids)
        return [None] * self.positions

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
        self._closed = False
        return self

    def restart(self, positions: list[int]) -> None:
        """Make a new group of ``len(positions)`` ranks serving these positions (the old
        one is ended first); :meth:`start` then ships the job as the kernel's model and
        optimizer hold it now (load the checkpoint to resume from before)."""
        if not positions or any(not 0 <= p < self.positions for p in positions):
            raise ValueError(f"positions must be a non-empty subset of 0..{self.positions - 1}")
        if not self._closed:
            self._shutdown()
        else:
            self.group.kill()
        self.slots = sorted(positions)
        self.world_size = len(self.slots)
        if self.position_device_ids:
            self.device_ids = [self.position_device_ids[p] for p in self.slots]
            self._job["device_ids"] = self.device_ids
        self._own_group = True
        self.group = self._new_group()
        self.restarts += 1
        self._reset_counters()

    def apply_plan(self, plan: Plan, from_step: int | None = None) -> None:
        """Use ``plan`` (shares per position) from step ``from_step`` on (default: the next
        forward/backward, a retry included). Every rank switches at that same step."""
        self.plan = plan
        if not self._running:
            return
        first = self._next_step if from_step is None else from_step
        if self._ahead is not None and first <= self._ahead.token.step:
            self._ahead.stale = True  # sent with the old plan: it runs again
        self._send_plan(plan, first)

    def _send_plan(self, plan: Plan, from_step: int) -> None:
        try:
            self._flush_apply()
            self.group.send_all(self._plan_message(plan, from_step))
        except WorkerLost as exc:
            self._bring_home_after_failure()
            raise self._lost(exc) from None

    def _plan_message(self, plan: Plan, from_step: int) -> tuple[Any, ...]:
        """The plan in rank terms: the shares (and caps) of the positions the ranks serve."""
        shares = [plan.shares[p] if p < len(plan.shares) else 0.0 for p in self.slots]
        if sum(shares) <= 0:
            shares = [1.0] * len(self.slots)
        total = sum(shares)
        caps = None
        if plan.caps:
            caps = tuple(plan.caps[p] if p < len(plan.caps) else None for p in self.slots)
        return (ch.PLAN, from_step, tuple(s / total for s in shares), plan.micro_batches, caps)

    def configure_steps(self, *, accumulate: int, precision: str) -> None:
        """The run's accumulation and precision (the run loop tells the engine before its
        steps: ``run.stepping.GroupEngine``). ``accumulate``: the global batches of one
        optimizer step, which :meth:`forward_backward` takes together (the token stream
        reads this to announce whole groups with :meth:`expect_next`). ``precision``:
        ``"fp32"`` or ``"bf16"`` (the ranks run the step under autocast); fp16 is refused,
        its GradScaler would have to decide on the ranks whether a step is skipped."""
        if precision != "fp32" and precision not in AUTOCAST:
            raise UsageError(
                f"precision={precision!r} (--precision {precision}) is not supported by "
                "engine='ddp': its loss scaler would have to decide on the ranks whether a step "
                "is skipped. Use --precision bf16 (no loss scaling), or the DataParallel "
                "engine (leave out --engine ddp) for fp16."
            )
        if isinstance(accumulate, bool) or not isinstance(accumulate, int) or accumulate < 1:
            raise UsageError(
                f"accumulate={accumulate!r} (--accumulate) must be a whole number ≥ 1."
            )
        self.accumulate = accumulate
        self._autocast = None if precision == "fp32" else precision

    def _as_step(self, batch: Any) -> BatchToken:
        """What the ranks run for ``batch`` (a :class:`BatchToken`, or a sequence of them:
        an accumulation group), under the run's autocast: a plain token when it is one
        batch in fp32 (the message every plain step has always been)."""
        if isinstance(batch, BatchToken):
            tokens, _ = token_parts(batch)
        elif isinstance(batch, (list, tuple)) and batch:
            if not all(isinstance(t, BatchToken) for t in batch):
                raise TypeError("DDPEngine.forward_backward takes BatchTokens (see iter_batches)")
            tokens = tuple(p for t in batch for p in token_parts(t)[0])
        else:
            raise TypeError("DDPEngine.forward_backward takes a BatchToken (see iter_batches)")
        return StepToken.of(tuple(tokens), self._autocast)

    def iter_batches(self, data: Any, epochs: int | None = 1) -> Iterator[BatchToken]:
        """Tokens for the loop to hand to :meth:`forward_backward` (no sample is loaded)."""
        return iter_tokens(data, epochs, self.data_name)

    def expect_next(self, token: BatchToken | None) -> None:
        """The token the loop will most likely hand over after the current one (None: no
        more, or unknown): what :meth:`forward_backward` may send ahead. With
        ``accumulate`` > 1, the next *group* (a :class:`~.data.StepToken` of its tokens)."""
        self._next_token = None if token is None else self._as_step(token)

    def forward_backward(self, step: StepFn | None, batch: Any) -> StepOutcome:
        """One step on every rank. ``step`` is ignored (the ranks run the shipped step);
        ``batch`` is a :class:`BatchToken`, or a sequence of them: an accumulation group,
        run as one step (each batch's loss weighted by its share of the group's samples,
        see :meth:`.rank.RankJob.forward_backward`), whose outcome is the group's (its
        samples, its mean loss). The gradients stay on the ranks until
        :meth:`optimizer_step`. On an out-of-memory every rank has dropped the step's
        gradients (the whole group's) before :class:`OutOfMemory` is raised; retry with
        the same token(s)."""
        token = self._as_step(batch)
        if not self._running:
            raise RuntimeError("DDPEngine.start() (or prepare()) must be called first")
        current = self._ahead
        if current is not None and (current.token != token or current.stale):
            self._settle_ahead()
            current = None
        self._ahead = None
        self._next_step = token.step
        if current is None and not self.run_ahead:  # lockstep: one command, its replies
            t0 = time.perf_counter()
            self._busy = True  # stays set if the wait is interrupted (Ctrl-C): see close()
            replies = self._command(self._step_message(token), f"step {token.step}")
            self._busy = False
            return self._completed(token, replies, None, t0)
        if current is None:
            current = _Ahead(token, time.perf_counter())
            try:
                self.group.send_all(self._step_message(token))
            except WorkerLost as exc:
                self._bring_home_after_failure()
                raise self._lost(exc) from None
        follower = self._send_follower(token)  # runs once this step completed everywhere
        replies = self._ahead_replies(current)
        return self._completed(token, replies, follower, current.sent)

    def _completed(
        self,
        token: BatchToken,
        replies: dict[int, tuple[Any, ...]],
        follower: _Ahead | None,
        t0: float,
    ) -> StepOutcome:
        """The step's outcome from its replies; an out-of-memory has every rank drop it
        (and the step sent after it, skipped everywhere) before it is raised."""
        self._next_step = token.step
        self.last_batch = token.batch
        ooms = [r for r in replies.values() if r[0] == ch.OOM]
        if ooms:
            if follower is not None:
                self._ahead_replies(follower)  # SKIPPED on every rank: nothing applied
            self._expect_ok(self._command((ch.DISCARD,), "discarding"), "discarding the step")
            rank, message = ooms[0][1], ooms[0][2]
            position = self.slots[rank]
            raise OutOfMemory(f"rank {position}: {message}", device=position)
        odd = [r for r in replies.values() if r[0] != ch.DONE]
        if odd:  # (a step skipped although the one before it completed: never expected)
            self._bring_home_after_failure()
            raise RuntimeError(f"unexpected reply to step {token.step}: {odd[0][:3]!r}")
        self._ahead = follower
        self._update_sent = follower.hyper if follower is not None else None
        return self._outcome(token, replies, time.perf_counter() - t0)

    def _step_message(self, token: BatchToken) -> tuple[Any, ...]:
        """The step command, with the update the loop asked for (one message, one wake-up)."""
        hyper, self._apply_hyper = self._apply_hyper, None
        return (ch.STEP, token) if hyper is None else (ch.STEP, token, hyper)

    def _hyper(self) -> list[dict[str, Any]]:
        """The kernel optimizer's hyper-parameters now (what an update is applied with)."""
        return [
            {k: v for k, v in g.items() if k != "params" and isinstance(v, (int, float, bool))}
            for g in self.optimizer.param_groups
        ]

    def _send_follower(self, token: BatchToken) -> _Ahead | None:
        """Send the step after ``token`` now, with ``token``'s update (the hyper-parameters
        as they are: nothing changes them between a step and its update), to run only if
        ``token``'s step completes on every rank (see the module doc)."""
        nxt = self._next_token  # (kept: a retry of ``token`` sends it again)
        if not self.run_ahead or nxt is None or nxt.step != token.last_step + 1:
            return None
        follower = _Ahead(nxt, time.perf_counter(), hyper=self._hyper())
        with contextlib.suppress(WorkerLost):  # reading the replies tells who is gone
            self.group.send_all((ch.STEP, nxt, follower.hyper, ch.IF_OK))
        return follower

    def _outcome(
        self, token: BatchToken, replies: dict[int, tuple[Any, ...]], wall: float
    ) -> StepOutcome:
        slot = self.slots
        stats = {slot[int(r[1]["rank"])]: r[1] for r in replies.values()}
        self.last_replies = stats
        self._pending = token
        self._next_step = token.last_step + 1
        return step_outcome(stats, token.batch, wall)

    def optimizer_step(self) -> None:
        """Apply the step on every rank, with the kernel optimizer's hyper-parameters as
        they are now. Sent with the next command and not waited for: that command's reply
        tells of any failure."""
        if self._pending is None:
            raise RuntimeError("optimizer_step() without a completed forward_backward()")
        hyper = self._hyper()
        sent, self._update_sent = self._update_sent, None
        if sent is None:
            self._apply_hyper = hyper  # sent with the next command (one message, one wake-up)
        elif sent != hyper:  # the ranks applied it with ``sent`` already
            raise RuntimeError(
                "the optimizer's hyper-parameters changed between forward_backward() and "
                "optimizer_step() of a run-ahead DDPEngine (the update left with the next "
                "step): change them after optimizer_step(), as schedulers do."
            )
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

    def _settle_ahead(self) -> None:
        """A step sent ahead that will not be used as it is: read its replies and have every
        rank drop what it computed (gradients, buffer updates)."""
        ahead = self._ahead
        if ahead is None:
            return
        self._ahead_replies(ahead)  # (an out-of-memory there is dropped too)
        self._ahead = None
        self._expect_ok(self._command((ch.DISCARD,), "discarding"), "discarding the step")

    def _ahead_replies(self, ahead: _Ahead) -> dict[int, tuple[Any, ...]]:
        """The replies to the step sent ahead (read once, kept until it is used)."""
        if ahead.replies is None:
            self._busy = True  # stays set if the wait is interrupted (Ctrl-C): see close()
            ahead.replies = self._gather(f"step {ahead.token.step}")
            self._busy = False
        return ahead.replies

    def fetch_state(self) -> None:
        """Load the ranks' state of the last completed step (rank 0's model and optimizer)
        into the kernel's model and optimizer, e.g. to write a checkpoint; the ranks go on.
        A step sent ahead is kept (its replies are read first; the rank reports the
        buffers as they were before it)."""
        if not self._running:
            return
        if self._ahead is not None:
            self._ahead_replies(self._ahead)
        self._load(self._ask_rank0((ch.STATE,), "reading the state")[2])

    def rank_log(self) -> dict[int, list[tuple[int, int]]]:
        """Per rank, the ``(step, samples)`` of every forward/backward it ran."""
        self._settle_ahead()
        return {r: list(m[2]) for r, m in self._command((ch.LOG,), "reading the logs").items()}

    def gradients(self) -> dict[int, dict[str, torch.Tensor | None]]:
        """Per rank, the gradients of the last forward/backward (by parameter name)."""
        self._settle_ahead()
        return {r: m[2] for r, m in self._command((ch.GRADS,), "reading gradients").items()}

    # -- replies and failures -----------------------------------------------------------------
    def _lost(self, exc: WorkerLost) -> WorkerLost:
        """``exc`` (which names a rank) with the position that rank served."""
        rank = exc.device
        position = self.slots[rank] if 0 <= rank < len(self.slots) else rank
        if position == rank:
            return exc
        return WorkerLost(f"{exc} (rank {rank} served position {position})", device=position)

    def _command(self, message: tuple[Any, ...], what: str) -> dict[int, tuple[Any, ...]]:
        """Send ``message`` to every rank and gather their replies (failures handled)."""
        try:
            self._flush_apply()
            self.group.send_all(message)
        except WorkerLost as exc:
            self._bring_home_after_failure()
            raise self._lost(exc) from None
        return self._gather(what)

    def _ask_rank0(self, message: tuple[Any, ...], what: str) -> tuple[Any, ...]:
        """Send ``message`` to rank 0 alone and read its reply (failures handled)."""
        try:
            self._flush_apply()
            self.group.send(0, message)
        except WorkerLost as exc:
            self._bring_home_after_failure()
            raise self._lost(exc) from None
        return self._gather(what, [0])[0]

    def _gather(self, what: str, ranks: list[int] | None = None) -> dict[int, tuple[Any, ...]]:
        try:
            replies = self.group.gather(ranks, what=what)
        except WorkerLost as exc:
            self._bring_home_after_failure()
            raise self._lost(exc) from None
        for reply in replies.values():
            if reply[0] == ch.LOST:
                self._bring_home_after_failure(prefer=int(reply[1]))
                raise self._lost(WorkerLost(reply[2], device=int(reply[1])))
            if reply[0] == ch.FAILED:
                rank = int(reply[1])
                dead = self.group.dead_rank(reply[3])
                self._bring_home_after_failure(prefer=rank)
                if dead is not None:  # the rank only saw its peer go
                    code = self.group.procs[dead].poll()
                    exit_code = f" (exit code {code})" if code is not None else ""
                    raise self._lost(
                        WorkerLost(
                            f"rank {dead} died{exit_code} during {what}; rank {rank} saw: "
                            f"{reply[3].splitlines()[0][:200]}",
                            device=dead,
                        )
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
        (``prefer`` first: it replied, so it is listening), then end the group. A step it
        computed but was not told to apply is dropped first (its buffer updates)."""
        self._ahead = None
        self._update_sent = None
        self._busy = False
        order = ([prefer] if prefer is not None else []) + self.group.alive()
        for rank in dict.fromkeys(order):
            try:
                self.group.send(rank, (ch.DISCARD,))
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
                self.group.send(0, (ch.DISCARD,))
                self.group.send(0, (ch.STATE,))
                self._load(self.group.receive_until(0, ch.STATE, timeout=600.0)[2])
            finally:
                self._running = False
                self.group.kill()
            return
        try:
            self._settle_ahead()
            if self._pending is not None:  # computed, never applied: drop its buffer updates
                self._pending = None
                self._ask_rank0((ch.DISCARD,), "discarding")
            self._load(self._ask_rank0((ch.STATE,), "reading the state")[2])
        except Exception:
            # the failure brought the last completed step home already (a step sent ahead
            # and never asked for may fail here: it was not to be applied)
            return
        finally:
            self._shutdown()

    def _shutdown(self) -> None:
        self._running = False
        self._closed = True
        self._ahead = None
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
