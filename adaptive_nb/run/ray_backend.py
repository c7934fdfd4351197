"""``engine="ray"``: the Ray Train engine (:mod:`adaptive_nb.engine.ray_train`) driven by
the same loop and allocation controller as the other engines.

As under DDP the run iterates *tokens* (the workers load their own slices) and the
workers apply the optimizer step. A worker lost mid-run is Ray Train's business: it
restarts the group from its latest checkpoint and the engine replays the steps after it
inside one ``forward_backward`` (the loop sees one slow step); the report carries the
restart as an event and in ``summary["ray_restarts"]``. Options that act on gradients
the kernel does not hold, and adaptive_nb's own checkpoints, are refused up front.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Any

from ..engine.ray_train import RayEngine, check_auth_mode
from ..errors import DeviceFailure, UsageError
from ..events import EventKind
from ..monitor.snapshot import SnapshotSource
from ..plan.allocation import AllocationController
from ..step import StepFn
from .backend import _default_monitor as default_monitor
from .ddp_backend import TokenEpochs
from .validate import DeviceSpec

__all__ = [
    "RayEvents",
    "RayOptions",
    "build_ray_run",
    "check_ray_options",
    "parse_workers",
]

_INSTALL = "pip install 'adaptive_nb[ray]'"


@dataclass(frozen=True)
class RayOptions:
    """The checked options of a Ray run."""

    min_workers: int
    max_workers: int
    gpus_per_worker: float
    ray_address: str | None


def parse_workers(workers: Any) -> tuple[int, int] | None:
    """``N``, ``"N"`` or ``"MIN:MAX"`` (``(MIN, MAX)``) → ``(min, max)``; None if unset."""
    if workers is None:
        return None
    bad = UsageError(
        f"workers (--workers) must be a whole number N ≥ 1 or MIN:MAX with 1 ≤ MIN ≤ MAX "
        f"(e.g. 2:4), got {workers!r}."
    )
    if isinstance(workers, bool):
        raise bad
    if isinstance(workers, int):
        pair = (workers, workers)
    elif isinstance(workers, tuple) and len(workers) == 2:
        pair = workers
    elif isinstance(workers, str):
        parts = workers.strip().split(":")
        if len(parts) not in (1, 2) or not all(p.strip().isdigit() for p in parts):
            raise bad
        nums = [int(p) for p in parts]
        pair = (nums[0], nums[-1])
    else:
        raise bad
    lo, hi = pair
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in pair) or not 1 <= lo <= hi:
        raise bad
    return lo, hi


def check_ray_options(
    engine: str,
    workers: Any,
    spec: DeviceSpec,
    *,
    ray_address: str | None,
    gpus_per_worker: float | None,
    devices: Any = "auto",
    accumulate: int,
    precision: str,
    checkpoint_dir: Any,
    resume: Any,
    sync_bn: bool,
    max_restarts: int = 0,
) -> RayOptions | None:
    """The options of ``engine="ray"`` (None for another engine, after checking that no
    Ray-only option was given); UsageError for anything the engine cannot honour."""
    if engine != "ray":
        given = [
            name
            for name, value in (
                ("ray_address (--ray-address)", ray_address),
                ("gpus_per_worker (--gpus-per-worker)", gpus_per_worker),
            )
            if value is not None
        ]
        if given:
            raise UsageError(
                f"{' and '.join(given)} belong to engine='ray' (--engine ray): add it, or "
                "leave them out."
            )
        return None
    if importlib.util.find_spec("ray") is None or importlib.util.find_spec("ray.train") is None:
        raise UsageError(f"engine='ray' needs Ray Train, which is not installed: {_INSTALL}.")
    from ray.train.v2._internal.constants import is_v2_enabled

    if not is_v2_enabled():
        raise UsageError(
            "engine='ray' needs Ray Train V2 (the default since Ray 2.50), but "
            "RAY_TRAIN_V2_ENABLED=0 is set in this environment: unset it."
        )
    pair = parse_workers(workers) or (2, 2)
    if gpus_per_worker is None:
        gpus = 0.0
    elif (
        isinstance(gpus_per_worker, bool)
        or not isinstance(gpus_per_worker, (int, float))
        or not gpus_per_worker >= 0
    ):
        raise UsageError(
            f"gpus_per_worker (--gpus-per-worker) must be a number ≥ 0, got {gpus_per_worker!r}."
        )
    else:
        gpus = float(gpus_per_worker)
    if ray_address is not None and (not isinstance(ray_address, str) or not ray_address.strip()):
        raise UsageError(
            f"ray_address (--ray-address) must be a Ray address such as 'ray://head:10001' or "
            f"'head:6379', got {ray_address!r}."
        )
    if spec.kind == "sim":
        raise UsageError(
            "engine='ray' runs real Ray Train workers; a simulated fleet (devices='sim:…') runs "
            "on the DataParallel engine: drop --engine ray."
        )
    if devices not in (None, "auto") and not (spec.kind == "cpu" and gpus == 0):
        raise UsageError(
            f"devices={devices!r} (--devices) with engine='ray': Ray places the workers; ask "
            "for GPUs with gpus_per_worker (--gpus-per-worker 1) and leave devices at its "
            "default."
        )
    refused = {
        "accumulate > 1 (--accumulate)": accumulate > 1,
        "precision other than fp32 (--precision)": precision != "fp32",
        "checkpoints (--checkpoint / --resume): Ray Train checkpoints the workers itself": (
            checkpoint_dir is not None or bool(resume)
        ),
        "sync_bn (--sync-bn)": bool(sync_bn),
    }
    if max_restarts:
        raise UsageError(
            "max_restarts (--max-restarts) restarts engine='ddp' groups; under engine='ray' "
            "Ray Train restarts the workers itself (from its own checkpoints): leave it out."
        )
    bad = [name for name, hit in refused.items() if hit]
    if bad:
        raise UsageError(
            f"engine='ray' does not support {', '.join(bad)} yet: leave them out, or use "
            "another engine."
        )
    check_auth_mode(ray_address)
    return RayOptions(pair[0], pair[1], gpus, ray_address.strip() if ray_address else None)


class RayEvents:
    """The run's hook into the engine (``Run(restarts=...)``): the engine's events (the
    workers' devices, restarts by Ray Train) go into the report, and the summary gets the
    restarts and checkpoints. Restarts themselves are Ray Train's: a worker failure that
    reaches the loop means Ray gave up, and the run stops."""

    def __init__(self, engine: RayEngine) -> None:
        self.engine = engine
        self.absent: set[int] = set()  # positions excluded because their worker is absent

    def begin(self, run: Any) -> None:
        def sink(kind: str, detail: str) -> None:  # a restart is told as a notice too
            run._event(EventKind.NOTICE, detail)

        def resized(present: int) -> None:
            """An elastic group of ``present`` workers: the positions beyond it get a zero
            share (excluded in the planner), those back in it are included again."""
            for pos in range(self.engine.world_size):
                if pos >= present and pos not in self.absent:
                    self.absent.add(pos)
                    run._decision(
                        run.controller.set_device_enabled(pos, False, run._now(), run.step)
                    )
                elif pos < present and pos in self.absent:
                    self.absent.discard(pos)
                    run._decision(
                        run.controller.set_device_enabled(pos, True, run._now(), run.step)
                    )

        self.engine.set_event_sink(sink)
        self.engine.on_resize = resized
        resized(self.engine.group.current_world)

    def restart(self, run: Any, error: DeviceFailure) -> bool:
        return False

    def summary(self) -> dict[str, Any]:
        e = self.engine
        return {
            "ray_restarts": len(e.restarts),
            "ray_restart_history": list(e.restarts),
            "ray_checkpoints": e.checkpoints,
            "ray_checkpoint_s": round(e.checkpoint_s, 3),
        }


def build_ray_run(
    step: StepFn,
    *,
    model: Any,
    optimizer: Any,
    data: Any,
    options: RayOptions,
    policy: str,
    headroom: float,
    control_interval: float,
    clip_grad_norm: float | None,
    data_name: str,
) -> tuple[RayEngine, AllocationController, SnapshotSource | None, TokenEpochs, RayEvents]:
    """Engine (not started: ``prepare`` connects to Ray and starts the workers),
    controller, snapshot source, the token stream the loop iterates and the report hook."""
    engine = RayEngine(
        step,
        model=model,
        optimizer=optimizer,
        data=data,
        min_workers=options.min_workers,
        max_workers=options.max_workers,
        gpus_per_worker=options.gpus_per_worker,
        ray_address=options.ray_address,
        clip_grad_norm=clip_grad_norm,
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
    return engine, controller, monitor, TokenEpochs(engine, data), RayEvents(engine)
