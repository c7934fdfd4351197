"""A DDP rank: a fresh Python process (``python -m adaptive_nb.engine.ddp.worker``) that
connects back to the kernel, joins the process group, then runs the kernel's commands
in order until told to stop, or until the kernel goes away.

Started by :mod:`.launcher`, never by hand. The kernel's address and the rank come in the
environment, the connection's secret on stdin. A watchdog thread exits the process as
soon as its parent is gone (the kernel died or was restarted), so a rank never outlives
the notebook; a closed connection ends it too.
"""

from __future__ import annotations

import os
import sys
import threading
import time
import traceback
from collections.abc import Callable, Mapping
from datetime import timedelta
from multiprocessing.connection import Client
from typing import TYPE_CHECKING, Any

from . import channel as ch

if TYPE_CHECKING:
    from .rank import RankJob


def _watch_parent(parent: int) -> None:
    while True:
        if os.getppid() != parent:
            os._exit(3)
        time.sleep(0.2)


def _error_reply(exc: BaseException, rank: int) -> tuple[Any, ...]:
    text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    return (ch.FAILED, rank, type(exc).__name__, str(exc), text, ch.try_pickle(exc))


LoadJob = Callable[[bytes], "tuple[RankJob, tuple[Any, ...]]"]
"""Builds the rank's job from the shipped bytes; returns it and what the ``OK`` reply
carries after ``(OK, rank)``."""
Extra = Callable[["RankJob"], "tuple[Any, ...]"]
"""A command of another front (e.g. Ray Train's checkpoint): runs on the job, returns the
reply."""


def serve(
    conn: Any,
    rank: int,
    world_size: int,
    *,
    load_job: LoadJob | None = None,
    extra: Mapping[str, Extra] | None = None,
) -> None:
    """The rank's command loop, in order, until ``STOP`` or the peer goes away. ``conn``:
    anything with ``recv_bytes``/``send_bytes`` (a socket connection here, Ray's hub in
    :mod:`adaptive_nb.engine.ray_train.worker`). ``load_job``: how ``JOB`` builds the
    job (default: unpickle it); ``extra``: commands beyond :mod:`.channel`'s, answered."""
    import cloudpickle

    from .rank import RankJob, StepFailed, is_oom

    def default_load(payload: bytes) -> tuple[RankJob, tuple[Any, ...]]:
        return RankJob(cloudpickle.loads(payload), rank, world_size), ()

    load = load_job or default_load
    handlers = dict(extra or {})
    job: RankJob | None = None
    late: BaseException | None = None  # an error in a command that has no reply
    idle = 0.0  # seconds spent waiting for a command since the last step's reply
    while True:
        waited = time.perf_counter()
        try:
            msg = ch.get(conn)
        except (EOFError, OSError):
            return
        idle += time.perf_counter() - waited
        kind = msg[0]
        try:
            if kind == ch.STOP:
                ch.put(conn, (ch.OK, rank))
                return
            if late is not None and (kind in ch.REPLIED or kind in handlers):
                err, late = late, None
                raise err
            if kind == ch.JOB:
                job = None
                job, told = load(msg[1])
                ch.put(conn, (ch.OK, rank, *told))
            elif kind == ch.PLAN:
                assert job is not None
                job.add_plan(*msg[1:])
            elif kind == ch.STEP:
                assert job is not None
                flags = msg[3] if len(msg) > 3 else 0
                if flags & ch.IF_OK and not job.all_ok:
                    ch.put(conn, (ch.SKIPPED, rank, msg[1].step))
                    continue
                if len(msg) > 2 and msg[2] is not None:  # the previous step's update
                    job.apply(msg[2])
                try:
                    done = job.forward_backward(msg[1])
                    done["idle_s"], idle = idle, 0.0  # this rank waited for the kernel
                    ch.put(conn, (ch.DONE, done))
                except StepFailed as exc:
                    ch.put(conn, (ch.LOST, rank, str(exc)))
                except Exception as exc:
                    if not is_oom(exc):
                        raise
                    ch.put(conn, (ch.OOM, rank, str(exc)))
            elif kind == ch.APPLY:
                assert job is not None
                try:
                    job.apply(msg[1])
                except Exception as exc:  # reported with the next command's reply
                    late = exc
            elif kind == ch.DISCARD:
                assert job is not None
                job.discard()
                ch.put(conn, (ch.OK, rank))
            elif kind == ch.STATE:
                assert job is not None
                ch.put(conn, (ch.STATE, rank, job.state()))
            elif kind == ch.LOG:
                ch.put(conn, (ch.LOG, rank, list(job.history) if job is not None else []))
            elif kind == ch.GRADS:
                assert job is not None
                ch.put(conn, (ch.GRADS, rank, job.gradients()))
            elif kind == ch.END:
                job = None
                ch.put(conn, (ch.OK, rank))
            elif kind in handlers:
                assert job is not None
                ch.put(conn, handlers[kind](job))
            else:
                raise RuntimeError(f"unknown command {kind!r}")
        except Exception as exc:
            ch.put(conn, _error_reply(exc, rank))


def main() -> int:
    rank = int(os.environ["RANK"])
    world_size = int(os.environ["WORLD_SIZE"])
    parent = int(os.environ["ADNB_DDP_PARENT"])
    threading.Thread(target=_watch_parent, args=(parent,), daemon=True).start()
    host, port = os.environ["ADNB_DDP_KERNEL"].rsplit(":", 1)
    secret = bytes.fromhex(sys.stdin.readline().strip())
    conn = Client((host, int(port)), authkey=secret)
    ch.no_delay(conn)
    try:
        ch.put(conn, (ch.HELLO, rank, os.getpid()))
        import torch
        import torch.distributed as dist

        threads = int(os.environ.get("ADNB_DDP_THREADS", "0"))
        if threads > 0:
            torch.set_num_threads(threads)
        device = os.environ.get("ADNB_DDP_DEVICE")
        if device is not None:  # before the group forms: nccl binds each rank to its GPU
            torch.cuda.set_device(int(device))
        dist.init_process_group(
            backend=os.environ.get("ADNB_DDP_BACKEND", "gloo"),
            rank=rank,
            world_size=world_size,
            timeout=timedelta(seconds=float(os.environ.get("ADNB_DDP_TIMEOUT", "300"))),
        )
        ch.put(conn, (ch.OK, rank))
    except Exception as exc:
        ch.put(conn, _error_reply(exc, rank))
        return 1
    try:
        serve(conn, rank, world_size)
    finally:
        conn.close()
    return 0


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # no interpreter teardown: a process group with dead peers can hang it
