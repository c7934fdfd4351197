"""Status files of active ``%%adaptive_train`` runs, one per kernel, in Jupyter's runtime dir.

A run attaches :class:`RunStatusPublisher` (an observer); it writes
``adaptive-nb-run-<kernel id>.json`` at most once per second (temp file + ``os.replace``, so
readers never see half a file) and removes it when the run ends, also on errors and at
interpreter exit. The server extension lists these files with :func:`read_runs`, which ignores
and deletes files whose process is gone.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import re
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psutil

from ..events import Event, EventKind, Progress, RunInfo, TickRecord
from ..run.observers import BaseObserver

if TYPE_CHECKING:
    from ..run.report import RunReport

__all__ = [
    "FILE_PREFIX",
    "RunStatusPublisher",
    "current_kernel_id",
    "read_runs",
    "runtime_dir",
    "status_path",
]

FILE_PREFIX = "adaptive-nb-run-"
FORMAT_VERSION = 1
_KERNEL_FILE = re.compile(r"kernel-([0-9A-Za-z_.-]+)\.json$")
_SAFE = re.compile(r"[^0-9A-Za-z_.-]")
_POLICY_WORD = re.compile(r"\b(adaptive|weights|static)\b")


def runtime_dir() -> Path:
    """Jupyter's runtime directory (``JUPYTER_RUNTIME_DIR`` or the platform default)."""
    from jupyter_core.paths import jupyter_runtime_dir

    return Path(jupyter_runtime_dir())


def current_kernel_id() -> str | None:
    """The id of the kernel this code runs in, from its connection file; None outside one."""
    try:
        from ipykernel.connect import get_connection_file

        match = _KERNEL_FILE.search(os.path.basename(get_connection_file()))
    except Exception:  # not in a kernel (RuntimeError), or no ipykernel
        return None
    return match.group(1) if match else None


def status_path(directory: str | os.PathLike[str], kernel_id: str | None, pid: int) -> Path:
    """Where the status file of the run in ``kernel_id`` (or process ``pid``) lives."""
    key = _SAFE.sub("_", kernel_id) if kernel_id else f"pid-{pid}"
    return Path(directory) / f"{FILE_PREFIX}{key}.json"


def _process_started(pid: int) -> float | None:
    try:
        return float(psutil.Process(pid).create_time())
    except (psutil.Error, OSError):
        return None


class RunStatusPublisher(BaseObserver):
    """Observer that publishes a run's status to a file the server extension reads.

    ``kernel_id``/``notebook`` default to the current kernel (connection file) and the
    notebook path the server gave the kernel (``JPY_SESSION_NAME``). ``min_interval_s`` bounds
    the write rate. Use as a context manager, or call :meth:`close`, so the file is removed
    even when the run fails before ``on_end``.
    """

    def __init__(
        self,
        kernel_id: str | None = None,
        notebook: str | None = None,
        directory: str | os.PathLike[str] | None = None,
        min_interval_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.pid = os.getpid()
        self.kernel_id = kernel_id if kernel_id is not None else current_kernel_id()
        self.notebook = notebook if notebook is not None else os.environ.get("JPY_SESSION_NAME")
        self.directory = Path(directory) if directory is not None else runtime_dir()
        self.path = status_path(self.directory, self.kernel_id, self.pid)
        self.min_interval_s = float(min_interval_s)
        self._clock = clock
        self._lock = threading.Lock()
        self._state: dict[str, Any] = {}
        self._last_write: float | None = None
        self._dirty = False
        self._closed = False
        self.writes = 0  # number of files written (for tests and overhead checks)

    # -- observer ----------------------------------------------------------------------
    def on_start(self, info: RunInfo) -> None:
        self._state = {
            "version": FORMAT_VERSION,
            "run_id": info.run_id,
            "kernel_id": self.kernel_id,
            "notebook": self.notebook,
            "pid": self.pid,
            "pid_started": _process_started(self.pid),
            "step": 0,
            "total_steps": info.total_steps,
            "epoch": 0,
            "epochs": info.epochs,
            "samples_per_s": 0.0,
            "eta_s": None,
            "loss": None,
            "devices": list(info.devices),
            "shares": {},
            "policy": info.policy,
            "simulated": bool(info.simulated),
            "global_batch": info.global_batch,
            "paused": False,
            "started": info.started_at,
            "updated": time.time(),
        }
        self._closed = False
        atexit.register(self.close)
        self._publish(force=True)

    def on_progress(self, progress: Progress) -> None:
        self._update(
            step=progress.step,
            total_steps=progress.total_steps,
            epoch=progress.epoch,
            samples_per_s=_finite(progress.samples_per_s),
            eta_s=_finite(progress.eta_s),
            loss=_finite(progress.loss),
            paused=progress.paused,
        )

    def on_tick(self, record: TickRecord) -> None:
        self._update(
            devices=list(record.devices),
            shares={k: _finite(v) for k, v in record.shares.items()},
            samples_per_s=_finite(record.samples_per_s),
        )

    def on_event(self, event: Event) -> None:
        if event.kind == EventKind.POLICY:
            # The detail names the new policy last, e.g. "policy adaptive -> static".
            named = _POLICY_WORD.findall(event.detail or "")
            if named:
                self._update(policy=named[-1])
        elif event.kind == EventKind.PAUSE:
            self._update(paused=True)
        elif event.kind == EventKind.RESUME:
            self._update(paused=False)

    def on_end(self, report: RunReport) -> None:
        self.close()

    # -- lifecycle ---------------------------------------------------------------------
    def close(self) -> None:
        """Remove the status file (idempotent)."""
        with self._lock:
            self._closed = True
            with contextlib.suppress(FileNotFoundError, OSError):
                self.path.unlink()
        atexit.unregister(self.close)

    def __enter__(self) -> RunStatusPublisher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def flush(self) -> None:
        """Write pending changes now, ignoring the rate limit."""
        if self._dirty:
            self._publish(force=True)

    # -- internals ---------------------------------------------------------------------
    def _update(self, **changes: Any) -> None:
        if not self._state or self._closed:
            return
        self._state.update(changes)
        self._dirty = True
        self._publish(force=False)

    def _publish(self, force: bool) -> None:
        now = self._clock()
        if (
            not force
            and self._last_write is not None
            and now - self._last_write < self.min_interval_s
        ):
            return
        with self._lock:
            if self._closed:
                return
            self._state["updated"] = time.time()
            data = json.dumps(self._state, allow_nan=False)
            tmp = self.path.with_name(f".{self.path.name}.{self.pid}.tmp")
            try:
                self.directory.mkdir(parents=True, exist_ok=True)
                tmp.write_text(data, encoding="utf-8")
                os.replace(tmp, self.path)
            except OSError:
                with contextlib.suppress(OSError):
                    tmp.unlink()
                return
            self._last_write = now
            self._dirty = False
            self.writes += 1


def _finite(x: float | None) -> float | None:
    if x is None:
        return None
    x = float(x)
    return x if x == x and abs(x) != float("inf") else None


def _alive(pid: object, started: object) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    actual = _process_started(pid)
    if actual is None:
        return False
    # A reused pid belongs to a process started later than the run's.
    return not (isinstance(started, (int, float)) and abs(actual - float(started)) > 1.0)


def read_runs(directory: str | os.PathLike[str] | None = None) -> list[dict[str, Any]]:
    """Status of active runs, oldest first. Files of dead processes (or unreadable files
    older than a minute) are removed."""
    root = Path(directory) if directory is not None else runtime_dir()
    runs: list[dict[str, Any]] = []
    try:
        paths = sorted(root.glob(f"{FILE_PREFIX}*.json"))
    except OSError:
        return runs
    for path in paths:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            continue
        except (OSError, ValueError):
            with contextlib.suppress(OSError):
                if time.time() - path.stat().st_mtime > 60:
                    path.unlink()
            continue
        if not isinstance(data, dict) or not _alive(data.get("pid"), data.get("pid_started")):
            with contextlib.suppress(OSError):
                path.unlink()
            continue
        data.pop("pid_started", None)
        runs.append(data)
    runs.sort(key=lambda r: float(r.get("started") or 0.0))
    return runs
