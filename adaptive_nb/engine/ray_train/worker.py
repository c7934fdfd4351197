"""The Ray Train worker: ``train_loop_per_worker`` of the :class:`TorchTrainer`.

Ray Train has already formed the torch process group (gloo on CPUs, nccl on GPUs) when
this runs; the worker joins the :class:`~.hub.Hub` for this attempt, then runs the
kernel's commands in order exactly like a DDP rank (:mod:`adaptive_nb.engine.ddp.worker`,
whose :class:`~adaptive_nb.engine.ddp.rank.RankJob` it reuses: uneven-share loss scaling,
slicing, per-rank measurements) plus one command of its own, ``CKPT``: every rank calls
``ray.train.report`` (a barrier in Ray Train) and rank 0 attaches a checkpoint of the
model, the optimizer and the number of steps applied. After a restart ``JOB`` loads the
latest checkpoint (``ray.train.get_checkpoint()``) over the shipped state and answers
with the step it holds, from which the kernel replays.
"""

from __future__ import annotations

import os
import socket
import tempfile
from typing import Any

from ..ddp import channel as ch
from ..ddp.worker import serve as serve_commands
from .hub import STOP_ALL

__all__ = ["CKPT", "HubConnection", "train_loop"]

CKPT = "ckpt"
_STATE_FILE = "adaptive_nb_state.pt"


class HubConnection:
    """``recv_bytes``/``send_bytes`` over the hub (what :mod:`..ddp.channel` needs). A
    reply is held until the next receive and goes with it (one hub call per step);
    :meth:`flush` sends a held reply on its own."""

    def __init__(self, hub: Any, attempt: int, rank: int) -> None:
        self.hub = hub
        self.attempt = attempt
        self.rank = rank
        self._held: bytes | None = None

    def recv_bytes(self) -> bytes:
        import ray

        held, self._held = self._held, None
        data: bytes = ray.get(self.hub.reply_and_recv.remote(self.attempt, self.rank, held))
        if data == STOP_ALL:
            raise EOFError("the hub is closed")
        return data

    def send_bytes(self, data: bytes) -> None:
        self.flush()
        self._held = data

    def flush(self) -> None:
        import ray

        held, self._held = self._held, None
        if held is not None:
            ray.get(self.hub.reply.remote(self.attempt, self.rank, held))


def _device_name(device: Any) -> str:
    import torch

    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (cuda:{device.index})"
    return "cpu"


def train_loop(config: dict[str, Any]) -> None:
    """Ray Train's ``train_loop_per_worker`` (``config``: the hub and torch threads)."""
    import ray.train
    import ray.train.torch
    import torch

    threads = int(config.get("threads") or 0)
    if threads > 0:
        torch.set_num_threads(threads)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    info = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "node_rank": ctx.get_node_rank(),
        "device": _device_name(device),
        "cuda": device.index if device.type == "cuda" else None,
    }
    hub = config["hub"]
    attempt = ray.get(hub.join.remote(rank, world, info))
    conn = HubConnection(hub, attempt, rank)
    try:
        serve(conn, rank, world, device)
    finally:
        conn.flush()


def _load_checkpoint(job: Any) -> int:
    """The latest Ray Train checkpoint into ``job``; the steps it holds (0: none)."""
    import ray.train
    import torch

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return 0
    with checkpoint.as_directory() as path:
        state = torch.load(os.path.join(path, _STATE_FILE), map_location=job.device)
    job.module.load_state_dict(state["model"])
    job.optimizer.load_state_dict(state["optimizer"])
    job.applied = int(state["applied"])
    return int(job.applied)


def _report_checkpoint(job: Any, rank: int) -> None:
    """Every rank reports (Ray Train's barrier); rank 0 attaches the state."""
    import ray.train
    import torch

    metrics = {"applied": job.applied}
    if rank != 0:
        ray.train.report(metrics, checkpoint=None)
        return
    with tempfile.TemporaryDirectory(prefix="adaptive_nb_ckpt_") as tmp:
        torch.save(job.state(), os.path.join(tmp, _STATE_FILE))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))


def serve(conn: HubConnection, rank: int, world_size: int, device: Any) -> None:
    """The DDP rank's command loop (:func:`adaptive_nb.engine.ddp.worker.serve`), with
    the job placed on this worker's device, loaded from Ray's checkpoint after a
    restart, and the ``CKPT`` command."""
    import cloudpickle

    from ..ddp.rank import RankJob

    def load_job(payload: bytes) -> tuple[RankJob, tuple[Any, ...]]:
        shipped = cloudpickle.loads(payload)
        if device.type == "cuda":  # each rank reads its own entry
            shipped["device_ids"] = [device.index] * world_size
        else:
            shipped["device_ids"] = None
            shipped["sync_bn"] = False
        job = RankJob(shipped, rank, world_size)
        return job, (_load_checkpoint(job),)

    def checkpoint(job: RankJob) -> tuple[Any, ...]:
        _report_checkpoint(job, rank)
        return (ch.OK, rank, job.applied)

    serve_commands(conn, rank, world_size, load_job=load_job, extra={CKPT: checkpoint})
