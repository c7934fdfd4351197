"""Start ``W`` DDP ranks as fresh Python processes and talk to them.

Fresh interpreters (``subprocess.Popen([sys.executable, "-m", ...worker])``), because
``fork`` is unsafe once the kernel has initialised CUDA and ``spawn`` cannot unpickle
what a notebook defines in ``__main__``; the job travels cloudpickled over an
authenticated loopback connection instead. The process group uses ``MASTER_ADDR
127.0.0.1`` and a port free at start-up (gloo on the CPU, nccl on GPUs).

No orphans: a failed start kills every process it started before raising; :meth:`kill`
(also run by a finaliser when the group is garbage-collected or the interpreter exits)
kills what is left; the ranks themselves exit when the kernel process goes away.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import secrets
import select
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from collections.abc import Sequence
from multiprocessing.connection import Connection, Listener, wait
from pathlib import Path
from typing import Any

from . import channel as ch
from .errors import DDPStartError, WorkerLost

__all__ = ["WorkerGroup", "free_port"]

_WORKER_MODULE = __name__.rpartition(".")[0] + ".worker"

# What gloo/nccl say when a peer's connection dropped (the peer died).
_PEER_GONE = re.compile(r"Connection (reset|closed) by peer|Broken pipe|NCCL.*remote", re.I)


def free_port() -> int:
    """A TCP port free on the loopback interface now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _readable(conns: list[Connection], timeout: float | None) -> list[Connection]:
    """The connections with something to read (``multiprocessing.connection.wait`` without
    building and closing a selector object on every call: this runs twice a step)."""
    if not hasattr(select, "poll"):  # pragma: no cover - not Linux/macOS
        return list(wait(conns, timeout))  # type: ignore[arg-type]
    by_fd = {conn.fileno(): conn for conn in conns}
    poller = select.poll()
    for fd in by_fd:
        poller.register(fd, select.POLLIN)
    ms = None if timeout is None else max(0, math.ceil(timeout * 1000))
    return [by_fd[fd] for fd, _ in poller.poll(ms)]  # (a closed peer reads as ready)


def _cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def _kill(procs: Sequence[subprocess.Popen[bytes]], logs: Path | None = None) -> None:
    for p in procs:
        if p.poll() is None:
            p.kill()
    for p in procs:
        with contextlib.suppress(subprocess.TimeoutExpired):  # SIGKILL cannot be ignored
            p.wait(timeout=10)
    if logs is not None:
        shutil.rmtree(logs, ignore_errors=True)


class WorkerGroup:
    """``world_size`` rank processes in one process group, and a connection to each.

    ``threads``: torch threads per rank (default: this machine's cores shared out).
    ``master_port``: the process group's rendezvous port (default: a free one).
    ``device_ids``: the CUDA device of each rank (nccl), set before the group forms."""

    def __init__(
        self,
        world_size: int,
        *,
        backend: str = "gloo",
        threads: int | None = None,
        master_port: int | None = None,
        timeout_s: float = 300.0,
        start_timeout_s: float = 120.0,
        device_ids: Sequence[int] | None = None,
    ) -> None:
        if world_size < 1:
            raise ValueError(f"world_size must be >= 1, got {world_size}")
        self.world_size = world_size
        self.backend = backend
        self.threads = threads if threads is not None else max(1, _cpus() // world_size)
        self.master_port = master_port
        self.timeout_s = timeout_s
        self.start_timeout_s = start_timeout_s
        self.device_ids = list(device_ids) if device_ids else None  # one CUDA device per rank
        self.procs: list[subprocess.Popen[bytes]] = []
        self.conns: list[Connection] = []
        # the ranks' output, quoted in errors; removed with the ranks
        self.log_dir = Path(tempfile.gettempdir()) / f"adaptive_nb_ddp_{os.getpid()}_{id(self)}"
        self._finalizer = weakref.finalize(self, _kill, self.procs, self.log_dir)
        self.started = False

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def log_tail(self, rank: int, lines: int = 15) -> str:
        path = self.log_dir / f"rank{rank}.log"
        try:
            text = path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""
        return "\n".join(text.strip().splitlines()[-lines:])

    # -- start ------------------------------------------------------------------------------
    def start(self) -> WorkerGroup:
        """Start the ranks and wait until each has joined the process group."""
        if self.started:
            return self
        _kill(self.procs)  # a group killed after a failure starts afresh
        self.procs.clear()
        self.log_dir.mkdir(parents=True, exist_ok=True)
        secret = secrets.token_bytes(32)
        listener = Listener(("127.0.0.1", 0), authkey=secret)
        port = self.master_port if self.master_port is not None else free_port()
        try:
            self._spawn(listener.address, port, secret)
            self._accept(listener, port)
            replies = self.gather(timeout=self.start_timeout_s, what="joining the process group")
            failed = [r for r in replies.values() if r[0] == ch.FAILED]
            if failed:
                raise _join_failure(failed[0], port)
        except BaseException as exc:
            self.kill()
            if isinstance(exc, WorkerLost):
                raise DDPStartError(str(exc)) from None
            raise
        finally:
            listener.close()
        self.started = True
        return self

    def _spawn(self, address: Any, port: int, secret: bytes) -> None:
        paths = [p or os.getcwd() for p in sys.path]
        package_root = str(Path(__file__).resolve().parents[3])
        env_base = dict(os.environ)
        env_base.update(
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
            WORLD_SIZE=str(self.world_size),
            ADNB_DDP_PARENT=str(os.getpid()),
            ADNB_DDP_KERNEL=f"{address[0]}:{address[1]}",
            ADNB_DDP_THREADS=str(self.threads),
            ADNB_DDP_BACKEND=self.backend,
            ADNB_DDP_TIMEOUT=str(self.timeout_s),
            PYTHONPATH=os.pathsep.join(dict.fromkeys([package_root, *paths])),
        )
        if sys.platform.startswith("linux"):
            env_base.setdefault("GLOO_SOCKET_IFNAME", "lo")  # loopback only
        for rank in range(self.world_size):
            env = dict(env_base, RANK=str(rank), LOCAL_RANK=str(rank))
            if self.device_ids:
                env["ADNB_DDP_DEVICE"] = str(self.device_ids[rank])
            with open(self.log_dir / f"rank{rank}.log", "wb") as log:
                proc = subprocess.Popen(
                    [sys.executable, "-m", _WORKER_MODULE],
                    stdin=subprocess.PIPE,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=env,
                )
            self.procs.append(proc)
            assert proc.stdin is not None
            proc.stdin.write(secret.hex().encode() + b"\n")
            proc.stdin.close()

    def _accept(self, listener: Listener, port: int) -> None:
        """Accept one connection per rank, failing fast if a rank exits first."""
        got: list[Connection] = []
        errors: list[BaseException] = []

        def accept() -> None:
            try:
                while len(got) < self.world_size:
                    got.append(listener.accept())
            except BaseException as exc:  # the listener closed on a failed start
                errors.append(exc)

        thread = threading.Thread(target=accept, daemon=True)
        thread.start()
        deadline = time.monotonic() + self.start_timeout_s
        while thread.is_alive():
            thread.join(0.05)
            for rank, p in enumerate(self.procs):
                if p.poll() is not None and len(got) < self.world_size:
                    # a rank that connected, failed to join and exited before the others
                    # connected has its reason on its connection, not in its log
                    for conn in list(got):
                        reason = _pending_failure(conn)
                        if reason is not None:
                            raise _join_failure(reason, port)
                    raise DDPStartError(
                        f"rank {rank} exited with code {p.returncode} while starting:\n"
                        f"{self.log_tail(rank)}"
                    )
            if time.monotonic() > deadline:
                raise DDPStartError(f"the ranks did not connect within {self.start_timeout_s} s")
        if errors:
            raise DDPStartError(f"accepting the ranks failed: {errors[0]}")
        by_rank: dict[int, Connection] = {}
        for conn in got:
            ch.no_delay(conn)
            hello = ch.get(conn)
            by_rank[int(hello[1])] = conn
        self.conns[:] = [by_rank[r] for r in range(self.world_size)]

    # -- talk -------------------------------------------------------------------------------
    def send(self, rank: int, message: tuple[Any, ...] | bytes) -> None:
        """One message (or one already encoded) to ``rank``."""
        data = message if isinstance(message, bytes) else ch.encode(message)
        try:
            self.conns[rank].send_bytes(data)
        except (OSError, EOFError) as exc:
            raise WorkerLost(f"rank {rank} is gone ({exc})", device=rank) from None

    def send_all(self, message: tuple[Any, ...]) -> None:
        """Send to every rank still reachable, then raise for the first that is not (so
        the ranks that live all got the same commands: an update reaches every survivor)."""
        lost: WorkerLost | None = None
        data = ch.encode(message)  # pickled once for all the ranks
        for rank in range(self.world_size):
            try:
                self.send(rank, data)
            except WorkerLost as exc:
                lost = lost or exc
        if lost is not None:
            raise lost

    def gather(
        self,
        ranks: Sequence[int] | None = None,
        *,
        timeout: float | None = None,
        what: str = "a reply",
        stop_on: frozenset[str] = frozenset({ch.FAILED, ch.LOST}),
    ) -> dict[int, tuple[Any, ...]]:
        """One reply from each of ``ranks`` (default all), by rank. Returns early, with the
        replies so far, once one is a kind in ``stop_on`` (the other ranks may be waiting
        in a collective that will never complete). A rank whose connection closes raises
        :class:`WorkerLost`; so does a ``timeout`` (seconds)."""
        want = list(range(self.world_size)) if ranks is None else list(ranks)
        pending = {self.conns[r]: r for r in want}
        replies: dict[int, tuple[Any, ...]] = {}
        deadline = None if timeout is None else time.monotonic() + timeout
        while pending:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            ready = _readable(list(pending), left)
            if not ready:
                raise WorkerLost(
                    f"ranks {sorted(pending.values())} sent no reply within {timeout} s ({what})",
                    device=min(pending.values()),
                )
            for conn in ready:
                rank = pending.pop(conn)
                try:
                    reply = ch.get(conn)
                except (EOFError, OSError):
                    code = self.procs[rank].poll() if rank < len(self.procs) else None
                    tail = self.log_tail(rank)
                    raise WorkerLost(
                        f"rank {rank} died (exit code {code}) during {what}"
                        + (f"; its last output:\n{tail}" if tail else ""),
                        device=rank,
                    ) from None
                replies[rank] = reply
                if reply[0] in stop_on:
                    return replies
        return replies

    def receive_until(self, rank: int, kind: str, timeout: float) -> tuple[Any, ...]:
        """The next reply of ``kind`` from ``rank``, skipping earlier replies (after a
        failed step a rank may first answer the step); :class:`WorkerLost` on timeout."""
        deadline = time.monotonic() + timeout
        while True:
            left = max(0.0, deadline - time.monotonic())
            reply = self.gather(
                [rank], timeout=left, what=f"a {kind!r} reply", stop_on=frozenset()
            )[rank]
            if reply[0] == kind:
                return reply

    def dead_rank(self, message: str) -> int | None:
        """The rank whose death a collective's error reports (a reset connection): the
        first process found exited within a moment, or None for any other error."""
        if not _PEER_GONE.search(message):
            return None
        deadline = time.monotonic() + 5.0
        while time.monotonic() < deadline:
            dead = [r for r, p in enumerate(self.procs) if p.poll() is not None]
            if dead:
                return dead[0]
            time.sleep(0.01)
        return None

    def alive(self) -> list[int]:
        return [r for r, p in enumerate(self.procs) if p.poll() is None]

    # -- end --------------------------------------------------------------------------------
    def stop(self, timeout: float = 10.0) -> None:
        """Ask every rank to exit, then kill whatever has not."""
        try:
            for rank in self.alive():
                try:
                    ch.put(self.conns[rank], (ch.STOP,))
                except (OSError, EOFError, IndexError):
                    continue
            deadline = time.monotonic() + timeout
            for p in self.procs:
                try:
                    p.wait(timeout=max(0.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    break
        finally:
            self.kill()

    def kill(self) -> None:
        """Kill every rank still running and close the connections (idempotent)."""
        _kill(self.procs, self.log_dir)
        for conn in self.conns:
            conn.close()
        self.conns.clear()
        self.started = False

    def __enter__(self) -> WorkerGroup:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _pending_failure(conn: Connection) -> tuple[Any, ...] | None:
    """The FAILED message waiting on ``conn`` (after its hello), if any."""
    try:
        while conn.poll(0.2):
            message = ch.get(conn)
            if message[0] == ch.FAILED:
                return tuple(message)
    except (OSError, EOFError):
        return None
    return None


def _join_failure(failed: tuple[Any, ...], port: int) -> DDPStartError:
    """The error for a rank that could not join the process group (a port in use named)."""
    _, rank, kind, message, _, _ = failed
    hint = ""
    if "address already in use" in message.lower() or "errno 98" in message.lower():
        hint = (
            f" Port {port} is in use: leave master_port unset (a free port is chosen) or "
            "pass another one."
        )
    return DDPStartError(f"rank {rank} could not join the process group: {kind}: {message}.{hint}")
