"""``engine="ddp"``: the DistributedDataParallel engine (:mod:`adaptive_nb.engine.ddp`)
driven by the same loop and allocation controller as weighted DataParallel.

What differs for the loop: the ranks load the data themselves, so the run iterates
*tokens* (:class:`~adaptive_nb.engine.ddp.BatchToken`, one per global batch, renumbered
over the whole run) instead of batches; the ranks apply the optimizer step
(``engine.owns_optimizer_step``), so the loop calls ``engine.optimizer_step()`` instead of
``optimizer.step()``; a lost rank cannot be dropped without restarting the group, so it
stops the run cleanly (the notebook's model and optimizer keep the last completed step).
Options that act on gradients the kernel does not hold are refused before anything runs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from typing import Any

from ..engine.ddp import BatchToken, DDPEngine
from ..errors import UsageError
from ..monitor.snapshot import SnapshotSource
from ..plan.allocation import AllocationController
from ..step import StepFn
from .backend import _default_monitor as default_monitor
from .validate import DeviceSpec

__all__ = ["ENGINES", "TokenEpochs", "build_ddp_run", "check_engine_options"]

ENGINES = ("dataparallel", "ddp")


def check_engine_options(
    engine: str,
    workers: int | None,
    spec: DeviceSpec,
    *,
    accumulate: int,
    precision: str,
    evaluate: Any,
    checkpoint_dir: Any,
    resume: Any,
    sync_bn: bool = False,
) -> int | None:
    """The number of ranks for ``engine="ddp"`` (None for DataParallel); UsageError for an
    engine, a worker count or an option the engine cannot honour."""
    if engine not in ENGINES:
        raise UsageError(f"unknown engine {engine!r}: choose one of {', '.join(ENGINES)}.")
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
    refused = {
        "accumulate > 1 (--accumulate)": accumulate > 1,
        "precision other than fp32 (--precision)": precision != "fp32",
        "evaluate= (--eval), which would see the kernel's copy of the model": evaluate is not None,
        "checkpoints (--checkpoint / --resume)": checkpoint_dir is not None or bool(resume),
    }
    bad = [name for name, hit in refused.items() if hit]
    if bad:
        raise UsageError(
            f"engine='ddp' does not support {', '.join(bad)} yet: use the DataParallel "
            "engine (the default) for those, or leave them out."
        )
    if spec.kind == "gpu":
        if workers is not None and workers != len(spec.gpu_ids):
            raise UsageError(
                f"--workers {workers} with --devices {','.join(map(str, spec.gpu_ids))}: on "
                "GPUs there is one rank per device; leave --workers out."
            )
        return len(spec.gpu_ids)
    return workers or 2


class TokenEpochs:
    """The run's ``data`` under DDP: each pass yields one epoch of tokens (no sample is
    loaded in the kernel), numbered on from the previous epoch's."""

    def __init__(self, engine: DDPEngine, data: Any) -> None:
        self.engine = engine
        self.data = data
        self._next = 0

    def __len__(self) -> int:
        return len(self.data)

    def __iter__(self) -> Iterator[BatchToken]:
        for token in self.engine.iter_batches(self.data, epochs=1):
            yield dataclasses.replace(token, step=self._next)
            self._next += 1


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
) -> tuple[DDPEngine, AllocationController, SnapshotSource | None, TokenEpochs]:
    """Engine (not started: ``prepare`` starts the ranks), controller, snapshot source and
    the token stream the loop iterates."""
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
    )
    monitor = default_monitor()
    controller = AllocationController(
        engine,
        policy=policy,
        headroom=headroom,
        control_interval=control_interval,
        snapshots=monitor,
    )
    return engine, controller, monitor, TokenEpochs(engine, data)
