"""``engine="ray"``: Ray Train workers (:class:`~.group.RayGroup`) driven from the kernel
one step at a time, with the DDP engine's protocol and rank code
(:mod:`adaptive_nb.engine.ddp`: tokens instead of batches, plans from a named step, the
optimizer step travelling with the next command, measurements every step).

What Ray adds:

* **Restarts.** When a worker dies, Ray Train restarts the whole group
  (``FailureConfig(max_failures)``) and calls the training function again; the new
  workers load the latest checkpoint (``ray.train.get_checkpoint()``). The kernel keeps
  the token and hyper-parameters of every step applied since that checkpoint and
  *replays* them on the new group (forward, backward, optimizer step), then retries the
  step that was interrupted: every step is applied exactly once to the state the run
  continues from. The loop sees one slow step. A replayed step's gradient is the
  full-batch gradient whatever the shares, so the replay is exact up to floating-point
  summation order (randomness in the step body, e.g. dropout, is drawn afresh; BatchNorm
  running statistics are those of the split in force at the replay).
* **Checkpoints.** ``ray.train.report(checkpoint=...)`` every ``checkpoint_every_s``
  seconds of training, at a step boundary: it bounds the replay after a failure, at the
  cost of one report barrier and one state write per checkpoint (measured 15–70 ms for
  0.1–1M parameters 5 s after the previous one, but ≈ 1 s right after one: Ray Train
  takes reports in at its 2-second polls of the workers, so a checkpoint every step is
  not an option; ``benchmarks/ray_results.md``). Ray registers a report only at that
  poll, so a restart soon after a report may start from the one before: the kernel keeps
  the steps since the checkpoint before the latest, and Ray keeps two.
* **Elastic worker counts** (``MIN:MAX``): Ray Train's elastic
  ``ScalingConfig(num_workers=(MIN, MAX))`` resizes by restarting the group with the new
  count (the same path as a failure). Device positions are the MAX workers; positions
  beyond the current group get a zero share.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from ...errors import OutOfMemory
from ...layout import Plan
from ...step import StepFn, StepOutcome
from ..base import Engine
from ..ddp import channel as ch
from ..ddp.data import BatchToken, describe_data, iter_tokens
from ..ddp.errors import DDPStartError, WorkerLost, remote_error
from ..ddp.replies import step_outcome
from ..ddp.validate import check_job
from .cluster import RayConnection
from .group import GroupRestarted, RayGroup
from .worker import CKPT

__all__ = ["RayEngine"]

EventSink = Callable[[str, str], None]


class RayEngine(Engine):
    """Weighted DDP over ``min_workers``..``max_workers`` Ray Train workers."""

    owns_optimizer_step = True

    def __init__(
        self,
        step: StepFn,
        *,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        data: Any,
        min_workers: int = 2,
        max_workers: int = 2,
        gpus_per_worker: float = 0.0,
        ray_address: str | None = None,
        clip_grad_norm: float | None = None,
        threads: int | None = None,
        max_failures: int = 3,
        checkpoint_every_s: float = 30.0,
        storage_path: str | None = None,
        num_cpus: int | None = None,
        data_name: str = "data",
    ) -> None:
        check_job(step, model, optimizer, max_workers)
        self.source = describe_data(data, data_name)
        self.data_name = data_name
        self.model = model
        self.optimizer = optimizer
        self.world_size = max_workers  # device positions
        self._job = {
            "step": step,
            "model": model,
            "optimizer": optimizer,
            "data": self.source,
            "sync_bn": False,
            "clip_grad_norm": clip_grad_norm,
            "device_ids": None,
        }
        self.connection = RayConnection(ray_address, num_cpus=num_cpus)
        self.group = RayGroup(
            min_workers,
            max_workers,
            gpus_per_worker=gpus_per_worker,
            threads=threads,
            max_failures=max_failures,
            storage_path=storage_path,
        )
        self.plan = Plan(
            tuple(range(max_workers)), tuple(1.0 / max_workers for _ in range(max_workers)), 1, 0
        )
        self.last_batch = 0
        self.applied = 0  # optimizer steps the workers have been told to apply
        self._next_step = 0
        self._pending: BatchToken | None = None
        self._apply_hyper: list[dict[str, Any]] | None = None
        self._payload = b""
        self._running = False
        self._closed = False
        self.last_replies: dict[int, dict[str, Any]] = {}
        self.checkpoint_every_s = checkpoint_every_s
        self.checkpointed = 0  # steps held by the latest Ray checkpoint
        # the step of the replay list's first entry: the checkpoint before the latest (Ray
        # Train registers a reported checkpoint asynchronously: a restart soon after a
        # report may still start from the one before)
        self._replay_base = 0
        self._last_checkpoint = time.perf_counter()
        self._replay: list[tuple[BatchToken, list[dict[str, Any]]]] = []
        self.restarts: list[dict[str, Any]] = []
        self.checkpoints = 0
        self.checkpoint_s = 0.0
        self.on_event: EventSink | None = None
        # told the number of workers of a new group (an elastic resize): the run's hook
        # gives the positions beyond it a zero share in the planner
        self.on_resize: Callable[[int], None] | None = None
        self._early_events: list[tuple[str, str]] = []
        self._own_storage: str | None = None

    # -- names ------------------------------------------------------------------------------
    def device_names(self) -> list[str]:
        infos = self.group.infos
        names = []
        for r in range(self.world_size):
            info = infos.get(r)
            if info is None:
                names.append(f"ray worker {r}")
            else:
                names.append(f"ray worker {r} ({info['device']} on {info['host']})")
        return names

    def monitor_keys(self) -> list[int | None]:
        return [None] * self.world_size  # the workers may be on other machines

    def set_event_sink(self, sink: EventSink | None) -> None:
        """Where the engine's events go (``kind``, ``detail``); those raised before a
        sink was set are handed to it now."""
        self.on_event = sink
        if sink is not None:
            early, self._early_events = self._early_events, []
            for kind, detail in early:
                sink(kind, detail)

    def _event(self, kind: str, detail: str) -> None:
        if self.on_event is not None:
            self.on_event(kind, detail)
        else:
            self._early_events.append((kind, detail))

    # -- start ------------------------------------------------------------------------------
    def prepare(self, model: nn.Module) -> nn.Module:
        self.start()
        return model

    def start(self) -> RayEngine:
        """Ship the job (pickled first: nothing starts if it cannot be), connect to Ray (or
        start it), start the workers and wait until each has loaded the job."""
        if self._running:
            return self
        from ..ddp.payload import dumps_job

        self._payload = dumps_job(self._job)
        try:
            self.connection.open()
            if self.group.storage_path is None and self.connection.address is None:
                # a local Ray: checkpoints in a directory of this run, removed at close
                self._own_storage = tempfile.mkdtemp(prefix="adaptive_nb_ray_")
                self.group.storage_path = self._own_storage
            self.group.start()
            self._load_job()
        except BaseException:
            self._shutdown()
            raise
        self._running = True
        self._last_checkpoint = time.perf_counter()
        self._event(
            "notice",
            "Ray Train workers: "
            + "; ".join(
                f"{r}: {i['device']} on {i['host']}" for r, i in sorted(self.group.infos.items())
            ),
        )
        return self

    def _load_job(self) -> int:
        """Ship the job to the current group and send the plan; the steps the workers'
        checkpoint holds (0 on the first start)."""
        self.group.send_all((ch.JOB, self._payload))
        replies = self.group.gather(what="loading the job", stop_on=frozenset())
        failed = [r for r in replies.values() if r[0] == ch.FAILED]
        if failed:
            if not self._running:
                _, rank, kind, message, _, _ = failed[0]
                raise DDPStartError(
                    f"worker {rank} could not load the job ({kind}: {message}). What the step "
                    "uses must be defined in the notebook or importable on the Ray workers."
                )
            raise remote_error(failed[0])
        self._send_plan(self.plan, 0)
        return max(int(r[2]) for r in replies.values())

    # -- plans ------------------------------------------------------------------------------
    def apply_plan(self, plan: Plan, from_step: int | None = None) -> None:
        """Use ``plan`` from step ``from_step`` on (default: the next forward/backward);
        every worker switches at that same step."""
        self.plan = plan
        if self._running:
            self._send_plan(plan, self._next_step if from_step is None else from_step)

    def worker_shares(self, plan: Plan) -> tuple[float, ...]:
        """The plan's shares over the workers of the current group: positions beyond it
        (an elastic group below its maximum) get nothing, the others keep their
        proportions."""
        shares = list(plan.shares)
        present = self.group.current_world or len(shares)
        if present >= len(shares):
            return tuple(shares)
        kept = shares[:present]
        total = sum(kept)
        return tuple(s / total for s in kept) if total > 0 else (1.0 / present,) * present

    def _send_plan(self, plan: Plan, from_step: int) -> None:
        present = self.group.current_world or self.world_size
        caps = tuple(plan.caps)[:present] if plan.caps else None
        self._flush_apply()
        self.group.send_all(
            (ch.PLAN, from_step, self.worker_shares(plan), plan.micro_batches, caps)
        )

    # -- steps ------------------------------------------------------------------------------
    def iter_batches(self, data: Any, epochs: int | None = 1) -> Iterator[BatchToken]:
        return iter_tokens(data, epochs, self.data_name)

    def expect_next(self, token: BatchToken | None) -> None:
        """The workers run in lockstep (no step is sent ahead): nothing to do."""

    def forward_backward(self, step: StepFn | None, batch: Any) -> StepOutcome:
        """One step on every worker (``step`` is ignored: the workers run the shipped
        one; ``batch`` is a :class:`BatchToken`). A restart of the group by Ray Train on
        the way is recovered here (see the module doc)."""
        if not isinstance(batch, BatchToken):
            raise TypeError("RayEngine.forward_backward takes a BatchToken (see iter_batches)")
        if not self._running:
            raise RuntimeError("RayEngine.start() (or prepare()) must be called first")
        token = batch
        # a restart by Ray Train (an elastic resize included) shows up in the first hub
        # call after it: the checkpoint's, or the step's (recovered in _command)
        while self._checkpoint_due():
            try:
                self.checkpoint()
            except GroupRestarted as restart:
                self._recover(restart)
        self._next_step = token.step
        self.last_batch = token.batch
        t0 = time.perf_counter()
        replies = self._command((ch.STEP, token), f"step {token.step}")
        wall = time.perf_counter() - t0
        ooms = [r for r in replies.values() if r[0] == ch.OOM]
        if ooms:
            self._expect_ok(self._command((ch.DISCARD,), "discarding"), "discarding the step")
            rank, message = ooms[0][1], ooms[0][2]
            raise OutOfMemory(f"worker {rank}: {message}", device=rank)
        stats = {int(r[1]["rank"]): r[1] for r in replies.values()}
        self.last_replies = stats
        self._pending = token
        self._next_step = token.step + 1
        return step_outcome(stats, token.batch, wall)

    def optimizer_step(self) -> None:
        """Apply the step on every worker with the kernel optimizer's hyper-parameters as
        they are now; sent with the next command."""
        if self._pending is None:
            raise RuntimeError("optimizer_step() without a completed forward_backward()")
        hyper = [
            {k: v for k, v in g.items() if k != "params" and isinstance(v, (int, float, bool))}
            for g in self.optimizer.param_groups
        ]
        self._apply_hyper = hyper
        setattr(self.optimizer, "_opt_called", True)  # noqa: B010  (see DDPEngine)
        self.applied += 1
        self._replay.append((self._pending, hyper))
        self._pending = None

    def _flush_apply(self) -> None:
        hyper, self._apply_hyper = self._apply_hyper, None
        if hyper is not None:
            self.group.send_all((ch.APPLY, hyper))

    def rank_log(self) -> dict[int, list[tuple[int, int]]]:
        """Per worker, the ``(step, samples)`` of every forward/backward it ran (since
        its group started)."""
        return {r: list(m[2]) for r, m in self._command((ch.LOG,), "reading the logs").items()}

    def gradients(self) -> dict[int, dict[str, torch.Tensor | None]]:
        return {r: m[2] for r, m in self._command((ch.GRADS,), "reading gradients").items()}

    # -- replies ----------------------------------------------------------------------------
    def _command(self, message: tuple[Any, ...], what: str) -> dict[int, tuple[Any, ...]]:
        """Send ``message`` to every worker and gather their replies; a restart of the
        group meanwhile is recovered and the message sent again."""
        while True:
            try:
                sent = message
                if message[0] == ch.STEP and self._apply_hyper is not None:
                    hyper, self._apply_hyper = self._apply_hyper, None
                    sent = (ch.STEP, message[1], hyper)
                self._flush_apply()
                self.group.send_all(sent)
                replies = self.group.gather(what=what)
            except GroupRestarted as restart:
                self._recover(restart)
                continue
            except WorkerLost:
                self._give_up()
                raise
            for reply in replies.values():
                if reply[0] == ch.LOST:
                    self._give_up()
                    raise WorkerLost(reply[2], device=int(reply[1]))
                if reply[0] == ch.FAILED:
                    raise remote_error(reply)
            return replies

    def _expect_ok(self, replies: dict[int, tuple[Any, ...]], what: str) -> None:
        for reply in replies.values():
            if reply[0] == ch.FAILED:
                raise remote_error(reply)
            if reply[0] != ch.OK:
                raise RuntimeError(f"unexpected reply while {what}: {reply[0]!r}")

    # -- checkpoints and restarts -----------------------------------------------------------
    def _checkpoint_due(self) -> bool:
        return (
            self.checkpoint_every_s >= 0
            and self.applied > self.checkpointed
            and time.perf_counter() - self._last_checkpoint >= self.checkpoint_every_s
        )

    def checkpoint(self) -> None:
        """``ray.train.report`` on every worker, rank 0 with the state of the last applied
        step (model, optimizer, steps applied) as a Ray Train checkpoint."""
        t0 = time.perf_counter()
        self._flush_apply()
        self.group.send_all((CKPT,))
        try:
            replies = self.group.gather(what="checkpointing")
        except WorkerLost:
            self._give_up()
            raise
        for reply in replies.values():
            if reply[0] == ch.FAILED:
                raise remote_error(reply)
        held = int(replies[0][2])
        self._forget_before(self.checkpointed)
        self.checkpointed = held
        self.checkpoints += 1
        self._last_checkpoint = time.perf_counter()
        self.checkpoint_s += self._last_checkpoint - t0

    def _forget_before(self, step: int) -> None:
        """Drop the replay entries of the steps before ``step`` (applied ones: 0-based)."""
        if step > self._replay_base:
            del self._replay[: step - self._replay_base]
            self._replay_base = step

    def _recover(self, restart: GroupRestarted) -> None:
        """Bring a restarted group to the last applied step: ship the job (the workers
        load Ray's latest checkpoint) and replay the applied steps after it."""
        t0 = time.perf_counter()
        self._apply_hyper = None  # that update is in the replay list
        while True:
            try:
                held = self._load_job()
                if not self._replay_base <= held <= self.applied:
                    raise WorkerLost(
                        f"the restarted workers hold step {held}, the kernel can replay from "
                        f"step {self._replay_base} on: the run cannot continue exactly",
                        device=0,
                    )
                todo = self._replay[held - self._replay_base :]
                for token, hyper in todo:
                    self.group.send_all((ch.STEP, token))
                    replies = self.group.gather(what=f"replaying step {token.step}")
                    bad = [r for r in replies.values() if r[0] != ch.DONE]
                    if bad:
                        raise WorkerLost(
                            f"replaying step {token.step} failed: {bad[0][:4]}", device=0
                        )
                    self.group.send_all((ch.APPLY, hyper))
                break
            except GroupRestarted as again:
                restart = again
        record = {
            "attempt": restart.attempt,
            "workers": restart.world_size,
            "at_step": self.applied,
            "checkpoint_step": held,
            "replayed": len(todo),
            "seconds": round(time.perf_counter() - t0, 3),
            "reason": restart.reason,
        }
        self.restarts.append(record)
        if self.on_resize is not None:
            self.on_resize(restart.world_size)
        self._event(
            "restart",
            f"Ray Train restarted the workers ({restart.reason}): attempt {restart.attempt} "
            f"with {restart.world_size} workers resumed from its checkpoint at step {held} "
            f"and replayed {len(todo)} step(s) to step {self.applied}",
        )

    def _give_up(self) -> None:
        """Ray Train gave up (``fit()`` ended: ``max_failures`` used up) or a worker cannot
        continue in step: end the workers. The notebook's model and optimizer keep the
        state they had before the run (the latest checkpoint is in Ray's storage path)."""
        self._running = False
        self._closed = True
        self.group.kill()
        self.connection.close()

    # -- end --------------------------------------------------------------------------------
    def fetch_state(self) -> None:
        """The workers' state of the last applied step into the notebook's objects (the
        run loop asks before an evaluation)."""
        while True:
            try:
                self._flush_apply()
                self.group.send(0, (ch.STATE,))
                reply = self.group.gather([0], what="reading the state")[0]
                break
            except GroupRestarted as restart:
                self._recover(restart)
        if reply[0] == ch.FAILED:
            raise remote_error(reply)
        self._load(reply[2])

    def _load(self, state: dict[str, Any]) -> None:
        hyper = [{k: v for k, v in g.items() if k != "params"} for g in self.optimizer.param_groups]
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        for group, kept in zip(self.optimizer.param_groups, hyper, strict=True):
            group.update(kept)

    def close(self) -> None:
        """Bring the last applied step home (worker 0's state into the notebook's model
        and optimizer), end the workers (``fit()`` returns) and Ray if started here."""
        if self._closed:
            return
        self._closed = True
        try:
            if self._running:
                self.fetch_state()
        finally:
            self._shutdown()

    @property
    def run_dir(self) -> str | None:
        """Where Ray Train keeps this run's checkpoints (None: Ray's default place)."""
        if self.group.storage_path is None:
            return None
        return os.path.join(self.group.storage_path, self.group.run_name)

    def _shutdown(self) -> None:
        self._running = False
        self._closed = True
        try:
            self.group.stop()
        finally:
            self.connection.close()
            if self._own_storage is not None:
                shutil.rmtree(self._own_storage, ignore_errors=True)
                self._own_storage = None
