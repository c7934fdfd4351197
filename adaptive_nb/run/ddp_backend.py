"""``engine="ddp"``: the DistributedDataParallel engine (:mod:`adaptive_nb.engine.ddp`)
driven by the same loop and allocation controller as weighted DataParallel.

What differs for the loop: the ranks load the data themselves, so the run iterates
*tokens* (:class:`~adaptive_nb.engine.ddp.BatchToken`, one per global batch, renumbered
over the whole run) instead of batches; the ranks apply the optimizer step
(``engine.owns_optimizer_step``), so the loop calls ``engine.optimizer_step()`` instead of
``optimizer.step()``; a lost rank cannot be dropped without restarting the group, so it
stops the run cleanly (the notebook's model and optimizer keep the last completed step),
or, with checkpoints and ``max_restarts`` > 0, :class:`GroupRestarts` starts a group on the
remaining devices from the newest checkpoint and the steps after it run again.
Options that act on gradients the kernel does not hold are refused before anything runs
(fp16: its loss scaler's skip decision would have to be made on the ranks). Accumulation
runs on the ranks: a group of ``accumulate`` tokens is one rank step
(:class:`~adaptive_nb.run.stepping.GroupEngine`; :class:`TokenEpochs` announces whole groups
for the step sent ahead), and bf16 autocast runs around the step on the ranks.

Restart sequence (:meth:`GroupRestarts.restart`): the failed group is gone (its state of
the last completed step came home with the failure); the controller hears of the lost
position (:meth:`RankController.on_device_failure`: share 0 from now on, a re-plan over
the rest); the engine makes a group of the remaining ranks; the run goes back to the
checkpoint (model, optimizer, scheduler, history, step, position and RNG: the data is
walked again from its epoch's start and the consumed batches skipped, so the same
tokens follow); the ranks start from the checkpoint's state; the steps after it run
again, their callbacks not called a second time (they were, with the same numbers).
"""

from __future__ import annotations

import dataclasses
from collections import deque
from collections.abc import Iterator, Sequence
from typing import Any, Protocol

from ..engine.ddp import BatchToken, DDPEngine, WorkerLost
from ..engine.ddp.data import StepToken
from ..errors import DeviceFailure, UsageError
from ..events import Event, EventKind
from ..monitor.snapshot import SnapshotSource
from ..plan.allocation import AllocationController
from ..step import StepFn
from .backend import _default_monitor as default_monitor
from .checkpoint import Checkpointing
from .validate import DeviceSpec

__all__ = [
    "ENGINES",
    "GroupRestarts",
    "RankController",
    "TokenEpochs",
    "build_ddp_run",
    "check_engine_options",
    "group_restarts",
]

ENGINES = ("dataparallel", "ddp")


def check_engine_options(
    engine: str,
    workers: int | None,
    spec: DeviceSpec,
    *,
    precision: str,
    checkpoint_dir: Any,
    sync_bn: bool = False,
    max_restarts: Any = 0,
) -> int | None:
    """The number of ranks for ``engine="ddp"`` (None for DataParallel); UsageError for an
    engine, a worker count or an option the engine cannot honour."""
    if engine not in ENGINES:
        raise UsageError(f"unknown engine {engine!r}: choose one of {', '.join(ENGINES)}.")
    if isinstance(max_restarts, bool) or not isinstance(max_restarts, int) or max_restarts < 0:
        raise UsageError(
            f"max_restarts (--max-restarts) must be a whole number ≥ 0, got {max_restarts!r}."
        )
    if max_restarts > 0 and engine != "ddp":
        raise UsageError(
            "max_restarts (--max-restarts) restarts the rank processes of engine='ddp' "
            "(--engine ddp); DataParallel drops a failed GPU and goes on without a restart."
        )
    if max_restarts > 0 and checkpoint_dir is None:
        raise UsageError(
            f"max_restarts={max_restarts} (--max-restarts) needs checkpoint_dir (--checkpoint "
            "DIR): a restarted group goes back to the newest checkpoint."
        )
    if engine != "ddp":
        if sync_bn:
            raise UsageError(
                "sync_bn=True (--sync-bn) needs engine='ddp' (--engine ddp): DataParallel "
                "replicas normalise their own chunk of the batch."
            )
        if workers is not None:
            raise UsageError("workers= (--workers) sets the ranks of engine='ddp' (--engine ddp).")
        return None
    if workers is not None and (not isinstance(workers, int) or workers < 1):
        raise UsageError(f"workers must be a whole number ≥ 1, got {workers!r}.")
    if spec.kind == "sim":
        raise UsageError(
            "engine='ddp' starts real rank processes; a simulated fleet (devices='sim:…') "
            "runs on the DataParallel engine: drop --engine ddp."
        )
    if precision == "fp16":
        raise UsageError(
            "precision='fp16' (--precision fp16) is not supported by engine='ddp' (--engine "
            "ddp): fp16 needs loss scaling, and the GradScaler's decision to skip a step whose "
            "gradients overflowed would have to be made on the ranks, which hold the "
            "gradients. Use --precision bf16 (precision='bf16': autocast to bfloat16, no "
            "loss scaling), or the DataParallel engine (leave out --engine ddp) for fp16."
        )
    if spec.kind == "gpu":
        if workers is not None and workers != len(spec.gpu_ids):
            raise UsageError(
                f"--workers {workers} with --devices {','.join(map(str, spec.gpu_ids))}: on "
                "GPUs there is one rank per device; leave --workers out."
            )
        return len(spec.gpu_ids)
    return workers or 2


class TokenSource(Protocol):
    """An engine whose ranks load the data themselves (DDP ranks, Ray Train workers)."""

    def iter_batches(self, data: Any, epochs: int | None = 1) -> Iterator[BatchToken]: ...

    def expect_next(self, token: BatchToken | None) -> None: ...


def _numbered(token: BatchToken, step: int) -> BatchToken:
    """``token`` as the run's step ``step`` (built directly: ``dataclasses.replace`` costs
    several times more, twice a step)."""
    if type(token) is BatchToken:
        return BatchToken(step, token.epoch, token.batch, token.key)
    return dataclasses.replace(token, step=step)


class TokenEpochs:
    """The run's ``data`` under DDP and Ray: each pass yields one epoch of tokens (no sample is
    loaded in the kernel), numbered on from the previous epoch's. Before yielding a token
    it reads the next one of the same epoch and tells the engine (``expect_next``), which
    may send it ahead; a pass never reads into the next epoch (whose start draws from the
    RNG a checkpoint records). A DataLoader's generators show through (``generator``,
    ``sampler``, ``batch_sampler``) for the checkpoints.

    With the engine's ``accumulate`` = k > 1 (fixed when the engine is built) the loop hands
    the engine groups of k tokens counted from the epoch's start
    (:func:`~adaptive_nb.run.batching.next_group`; the last group of an epoch may be
    shorter), so what follows the last token of a group is the next group: the stream reads
    up to k tokens ahead and announces them together (a :class:`StepToken`). A guess that
    turns out wrong (a resumed run whose groups are not aligned, a stop) only costs the
    step sent ahead: the engine drops it and sends the one asked for."""

    def __init__(self, engine: TokenSource, data: Any) -> None:
        self.engine = engine
        self.data = data
        self._next = 0

    def __len__(self) -> int:
        return len(self.data)

    def reset(self) -> None:
        """Number from 0 again (a restarted group counts its steps afresh)."""
        self._next = 0

    @property
    def generator(self) -> Any:
        return getattr(self.data, "generator", None)

    @property
    def sampler(self) -> Any:
        return getattr(self.data, "sampler", None)

    @property
    def batch_sampler(self) -> Any:
        return getattr(self.data, "batch_sampler", None)

    def __iter__(self) -> Iterator[BatchToken]:
        tokens = self.engine.iter_batches(self.data, epochs=1)
        read: deque[BatchToken] = deque()  # read ahead, not yet yielded (nor numbered)
        position = 0  # in this epoch, of the next token yielded
        k = max(1, int(getattr(self.engine, "accumulate", 1) or 1))

        def read_up_to(n: int) -> None:
            while len(read) < n:
                got = next(tokens, None)
                if got is None:
                    return
                read.append(got)

        while True:
            read_up_to(1 + (k if (position + 1) % k == 0 else 1))
            if not read:
                return
            token = _numbered(read.popleft(), self._next)
            self._next += 1
            position += 1
            if k == 1 or position % k == 0 or not read:  # the last of its group: the next follows
                ahead = [_numbered(t, self._next + i) for i, t in enumerate(list(read)[:k])]
                self.engine.expect_next(
                    None if not ahead else ahead[0] if k == 1 else StepToken.of(tuple(ahead))
                )
            yield token


class RankController(AllocationController):
    """The allocation controller over DDP ranks. Every rank holds the whole model, so no
    position is the primary for good: when the position planned first is lost, the next
    live one takes its place and the plan moves to the rest (a GPU under DataParallel
    that holds the model cannot be lost and the run go on)."""

    def on_device_failure(self, error: DeviceFailure, now: float, step: int) -> list[Event]:
        if error.device == self.primary:
            live = [
                d.position
                for d in self.devices
                if d.enabled and not d.failed and d.position != error.device
            ]
            if live:
                self.primary = live[0]
        return super().on_device_failure(error, now, step)


class _RunView(Protocol):
    """What :class:`GroupRestarts` reads and sets on a run (``run.loop.Run``)."""

    engine: Any
    controller: Any
    data: Any
    control: Any
    training: Any
    step: int
    samples: int
    replay_until: int
    replay_epochs_until: int
    epochs_ended: int

    def _now(self) -> float: ...

    def _event(self, kind: str, detail: str) -> None: ...

    def _decision(self, events: Sequence[Event]) -> None: ...


class GroupRestarts:
    """Up to ``max_restarts`` restarts of a DDP run's group after a lost rank (see the
    module doc). Needs checkpoints: before the first step, a run that has none to go back
    to writes one of its starting state."""

    def __init__(self, max_restarts: int) -> None:
        self.max_restarts = max_restarts
        self.used = 0
        self.history: list[dict[str, Any]] = []

    def begin(self, run: _RunView) -> None:
        """Before the first step: with restarts allowed, the starting state is written when
        there is no checkpoint to go back to."""
        ckpt: Checkpointing = run.training.checkpoints
        if self.max_restarts < 1 or not ckpt.enabled or ckpt.written or ckpt.resume is not None:
            return
        path = ckpt.save(run, initial=True)  # type: ignore[arg-type]
        if path is not None:
            run._event(
                EventKind.NOTICE,
                f"checkpoint written: {path} (the starting state, for --max-restarts)",
            )

    def restart(self, run: _RunView, error: DeviceFailure) -> bool:
        """Restart after ``error``; False (the run stops) when it cannot or may not."""
        engine = run.engine
        ckpt: Checkpointing = run.training.checkpoints
        if not isinstance(engine, DDPEngine) or not isinstance(error, WorkerLost):
            return False
        if self.used >= self.max_restarts or run.control.stopped or not ckpt.enabled:
            return False
        survivors = [p for p in engine.slots if p != error.device]
        point = ckpt.restart_point()
        if not survivors or point is None:
            return False
        now, reached = run._now(), run.step
        engine.close()  # ended by the failure already: nothing more to bring home
        try:
            events = run.controller.on_device_failure(error, now, reached)
        except DeviceFailure:
            return False
        self.used += 1
        state, path = point
        back_to = int(state["step"])
        names = engine.device_names()
        lost = names[error.device] if 0 <= error.device < len(names) else str(error.device)
        again = f"step {reached}" if reached == back_to + 1 else f"steps {back_to + 1}–{reached}"
        run._event(
            EventKind.DEVICE_DROPPED,
            f"{lost} lost ({error}); restart {self.used} of {self.max_restarts}: a new group "
            f"on the {len(survivors)} other rank{'s' if len(survivors) != 1 else ''} goes back "
            f"to {path if path is not None else 'the starting state'} (step {back_to})"
            + (f" and runs {again} again" if reached > back_to else ""),
        )
        run._decision(events)
        engine.restart(survivors)
        ckpt.rewind(run, state, path)  # type: ignore[arg-type]
        run.samples = ckpt.samples_at.get(back_to, 0)
        run.replay_until = max(run.replay_until, reached)
        run.replay_epochs_until = max(run.replay_epochs_until, run.epochs_ended)
        run.data.reset()
        engine.start()
        self.history.append(
            {"lost": lost, "at_step": reached, "back_to_step": back_to, "ranks": len(survivors)}
        )
        return True

    def summary(self) -> dict[str, Any]:
        return {"restarts": self.used, "restart_history": list(self.history)}


def group_restarts(engine: str, max_restarts: int) -> GroupRestarts | None:
    """The restarts of a run (None for DataParallel, which never restarts a group)."""
    return GroupRestarts(max_restarts) if engine == "ddp" else None


def build_ddp_run(
    step: StepFn,
    *,
    model: Any,
    optimizer: Any,
    data: Any,
    world_size: int,
    spec: DeviceSpec,
    policy: str,
    headroom: float,
    control_interval: float,
    clip_grad_norm: float | None,
    data_name: str,
    sync_bn: bool = False,
    accumulate: int = 1,
    precision: str = "fp32",
) -> tuple[DDPEngine, RankController, SnapshotSource | None, TokenEpochs]:
    """Engine (not started: ``prepare`` starts the ranks), controller, snapshot source and
    the token stream the loop iterates. The ranks accumulate (an accumulation group is one
    rank step) and run bf16 autocast themselves."""
    device_ids: Sequence[int] | None = list(spec.gpu_ids) if spec.kind == "gpu" else None
    engine = DDPEngine(
        step,
        model=model,
        optimizer=optimizer,
        data=data,
        world_size=world_size,
        clip_grad_norm=clip_grad_norm,
        sync_bn=sync_bn,
        device_ids=list(device_ids) if device_ids is not None else None,
        data_name=data_name,
        run_ahead=True,
        accumulate=accumulate,
        precision=precision,
    )
    monitor = default_monitor()
    controller = RankController(
        engine,
        policy=policy,
        headroom=headroom,
        control_interval=control_interval,
        snapshots=monitor,
    )
    return engine, controller, monitor, TokenEpochs(engine, data)
