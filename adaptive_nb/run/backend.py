"""What a device spec becomes: the engine that runs each step, the controller that adapts
it and the snapshot source it reads (CPU threads, weighted DataParallel over GPUs, or a
device kind registered in :mod:`~adaptive_nb.run.plugins`, such as the simulated fleet)."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from torch import nn

from ..engine.base import Engine
from ..engine.cpu import CpuEngine
from ..engine.dataparallel import DataParallelEngine
from ..monitor.snapshot import SnapshotSource
from ..plan.allocation import AllocationController
from ..plan.base import Controller, NullController
from ..plan.threads import ThreadController
from . import slot
from .own_memory import tell_monitor_own_memory
from .plugins import device_provider
from .validate import DeviceSpec

__all__ = ["build_backend", "build_gpu_run"]

log = logging.getLogger("adaptive_nb")


def build_backend(
    spec: DeviceSpec,
    *,
    policy: str,
    headroom: float,
    control_interval: float,
    min_chunk: int | None = None,
) -> tuple[Engine, Controller, SnapshotSource | None]:
    """Engine, controller and snapshot source for a device spec (``min_chunk``: the fewest
    samples a GPU of weighted DataParallel is given; None: 2 with BatchNorm, else 1)."""
    if spec.kind == "sim":
        provider = device_provider("sim")
        engine, controller, source = provider(
            str(spec.sim_path), policy=policy, headroom=headroom, control_interval=control_interval
        )
        return engine, controller, source
    monitor = _default_monitor()
    if spec.kind == "gpu":
        _tell_monitor_cuda_uuids(monitor)
        tell_monitor_own_memory(monitor, list(spec.gpu_ids))  # NVML PIDs miss us in containers
        gpu_engine, gpu_controller = build_gpu_run(
            list(spec.gpu_ids),
            min_chunk=min_chunk,
            policy=policy,
            headroom=headroom,
            control_interval=control_interval,
            snapshots=monitor,
        )
        return gpu_engine, gpu_controller, monitor
    cpu_controller: Controller = (
        NullController()
        if policy == "static"
        else ThreadController(policy=policy, workload=_active_workload)
    )
    return CpuEngine(), cpu_controller, monitor


def _active_workload() -> tuple[nn.Module | None, int | None]:
    """The model and expected steps of the run in progress, read by the CPU thread policy at
    the run's first step (it is built before the run, which owns both): the model keys what
    earlier runs learned, the length decides whether probing can pay for itself."""
    run = slot.active_run()
    if run is None:
        return None, None
    return run.model, run.info.total_steps


def build_gpu_run(
    device_ids: Sequence[int],
    *,
    policy: str,
    headroom: float,
    control_interval: float,
    snapshots: SnapshotSource | None,
    min_chunk: int | None = None,
) -> tuple[DataParallelEngine, AllocationController]:
    """Weighted DataParallel engine over CUDA ``device_ids`` (the first is the primary) and
    its allocation controller."""
    engine = DataParallelEngine(list(device_ids), min_chunk)
    controller = AllocationController(
        engine,
        policy=policy,
        headroom=headroom,
        control_interval=control_interval,
        snapshots=snapshots,
    )
    return engine, controller


def _tell_monitor_cuda_uuids(monitor: object) -> None:
    """Map NVML devices to torch indices by UUID (exact under any CUDA_DEVICE_ORDER)."""
    setter = getattr(monitor, "set_cuda_uuids", None)
    if setter is None:
        return
    try:
        uuids = [
            str(torch.cuda.get_device_properties(i).uuid) for i in range(torch.cuda.device_count())
        ]
    except Exception as exc:  # an old driver without UUIDs: keep the CUDA_VISIBLE_DEVICES map
        log.debug("torch device UUIDs unavailable: %s", exc)
        return
    setter(uuids)


def _default_monitor() -> SnapshotSource | None:
    try:
        from ..monitor import default_monitor

        mon: SnapshotSource = default_monitor()
        return mon
    except Exception as exc:  # monitoring is optional for training
        log.warning("adaptive_nb: monitoring unavailable (%s); training continues.", exc)
        return None
