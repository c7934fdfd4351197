"""Server-side state: one cached resource sampler and the kernel-pid → notebook map.

Nothing here runs a shell command, signals or changes a process; about other processes it
only reads their parent pid (to attribute a GPU process started by a kernel to that kernel)
and, for GPU processes, whether their command line names a kernel's connection file.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from ...monitor import Monitor, NvmlBackend, Snapshot
from ..run_status import read_runs

__all__ = ["KernelInfo", "KernelMap", "ResourceSampler", "ServerState", "resources_json"]


class ResourceSampler:
    """Samples on demand, at most once per ``max_age_s``: concurrent requests share one
    sample, and NVML is opened once for the life of the server (never per request)."""

    def __init__(
        self,
        max_age_s: float = 0.75,
        nvml: NvmlBackend | None = None,
        monitor_factory: Callable[[], Monitor] | None = None,
    ) -> None:
        self.max_age_s = float(max_age_s)
        self._nvml = nvml
        self._factory = monitor_factory
        self._monitor: Monitor | None = None
        self._lock: asyncio.Lock | None = None

    @property
    def monitor(self) -> Monitor:
        if self._monitor is None:
            if self._factory is not None:
                self._monitor = self._factory()
            else:
                # Not started: it samples only when asked. Its own pid is the server's, so
                # no GPU process is "self" here (the server holds no GPU memory).
                self._monitor = Monitor(rate_hz=1.0, capacity=4, nvml=self._nvml)
        return self._monitor

    @property
    def samples_taken(self) -> int:
        return self._monitor.samples_taken if self._monitor is not None else 0

    async def snapshot(self) -> Snapshot:
        """The latest sample if fresher than ``max_age_s``; otherwise a new one (taken on a
        worker thread so a slow driver never blocks the server's event loop)."""
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            mon = self.monitor
            last = mon.latest()
            if last is not None and time.monotonic() - last.t < self.max_age_s:
                return last
            return await asyncio.get_running_loop().run_in_executor(None, mon.sample_now)


@dataclass(frozen=True)
class KernelInfo:
    kernel_id: str
    notebook: str | None


class KernelMap:
    """Maps pids to this server's kernels and their notebooks.

    A kernel's pid comes from its provisioner (``provisioner.pid`` /
    ``provisioner.process.pid``). A GPU process is attributed to a kernel when it is the
    kernel, a descendant of it (e.g. a data-loader worker), or a process whose command line
    names the kernel's connection file.
    """

    def __init__(self, kernel_manager: Any, session_manager: Any | None) -> None:
        self.km = kernel_manager
        self.sm = session_manager

    def kernel_pids(self) -> dict[int, str]:
        """pid → kernel id of this server's local kernels."""
        pids: dict[int, str] = {}
        for kid in self._kernel_ids():
            pid = _kernel_pid(self._kernel(kid))
            if pid is not None:
                pids[pid] = kid
        return pids

    async def notebooks(self) -> dict[str, str]:
        """kernel id → notebook (session) path."""
        if self.sm is None:
            return {}
        try:
            sessions = await self.sm.list_sessions()
        except Exception:
            return {}
        out: dict[str, str] = {}
        for s in sessions:
            kernel = s.get("kernel") or {}
            kid, path = kernel.get("id"), s.get("path")
            if kid and path:
                out[str(kid)] = str(path)
        return out

    async def owners(self, pids: Iterable[int]) -> dict[int, KernelInfo]:
        """pid → owning kernel and notebook, for those pids that belong to a kernel."""
        wanted = set(pids)
        if not wanted:
            return {}
        kernel_pids = self.kernel_pids()
        notebooks = await self.notebooks()
        owners: dict[int, KernelInfo] = {}
        conn_files: dict[str, str] | None = None
        for pid in wanted:
            kid = kernel_pids.get(pid) or _ancestor_kernel(pid, kernel_pids)
            if kid is None:
                if conn_files is None:
                    conn_files = self._connection_files()
                kid = _kernel_by_cmdline(pid, conn_files)
            if kid is not None:
                owners[pid] = KernelInfo(kid, notebooks.get(kid))
        return owners

    def _kernel_ids(self) -> list[str]:
        try:
            return [str(k) for k in self.km.list_kernel_ids()]
        except Exception:
            return []

    def _kernel(self, kid: str) -> Any:
        try:
            return self.km.get_kernel(kid)
        except Exception:
            return None

    def _connection_files(self) -> dict[str, str]:
        """Connection-file base name → kernel id."""
        out: dict[str, str] = {}
        for kid in self._kernel_ids():
            path = getattr(self._kernel(kid), "connection_file", None)
            if path:
                out[os.path.basename(str(path))] = kid
        return out


def _kernel_pid(kernel: Any) -> int | None:
    provisioner = getattr(kernel, "provisioner", None)
    if provisioner is None:
        return None
    pid = getattr(provisioner, "pid", None)
    if not isinstance(pid, int):
        process = getattr(provisioner, "process", None)
        pid = getattr(process, "pid", None)
    return pid if isinstance(pid, int) and pid > 0 else None


def _ancestor_kernel(pid: int, kernel_pids: dict[int, str]) -> str | None:
    if not kernel_pids:
        return None
    try:
        parents = psutil.Process(pid).parents()
    except (psutil.Error, OSError):
        return None
    for parent in parents:
        kid = kernel_pids.get(parent.pid)
        if kid is not None:
            return kid
    return None


def _kernel_by_cmdline(pid: int, conn_files: dict[str, str]) -> str | None:
    if not conn_files:
        return None
    try:
        cmdline = psutil.Process(pid).cmdline()
    except (psutil.Error, OSError):
        return None
    for arg in cmdline:
        kid = conn_files.get(os.path.basename(arg))
        if kid is not None:
            return kid
    return None


def resources_json(
    snap: Snapshot, owners: dict[int, KernelInfo], notice: str | None
) -> dict[str, Any]:
    """The ``/resources`` payload. About processes: pid, memory and owning notebook only."""
    host = snap.host
    gpus: list[dict[str, Any]] = []
    for g in snap.gpus:
        procs = []
        for p in sorted(g.processes, key=lambda p: -p.used_memory_mb):
            owner = owners.get(p.pid)
            procs.append(
                {
                    "pid": p.pid,
                    "memory_mb": round(p.used_memory_mb, 1),
                    "kernel_id": owner.kernel_id if owner else None,
                    "notebook": owner.notebook if owner else None,
                }
            )
        gpus.append(
            {
                "index": g.index,
                "nvml_index": g.nvml_index,
                "uuid": g.uuid,
                "name": g.name,
                "simulated": g.simulated,
                "utilisation_pct": round(g.util_pct, 1),
                "memory_used_mb": round(g.mem_used_mb, 1),
                "memory_total_mb": round(g.mem_total_mb, 1),
                "processes": procs,
            }
        )
    total = host.ram_total_mb
    return {
        "time": time.time(),
        "sample_age_s": round(max(0.0, time.monotonic() - snap.t), 3),
        "gpu_available": bool(snap.gpus),
        "notice": notice,
        "gpus": gpus,
        "cpu": {
            "percent": round(host.cpu_pct, 1),
            "per_core_percent": [round(x, 1) for x in host.per_core_pct],
            "cores": host.cpu_cores,
        },
        "memory": {
            "used_mb": round(host.ram_used_mb, 1),
            "available_mb": round(host.ram_available_mb, 1),
            "total_mb": round(total, 1),
            "percent": round(100.0 * host.ram_used_mb / total, 1) if total > 0 else 0.0,
        },
    }


class ServerState:
    """What the handlers share (stored in ``web_app.settings["adaptive_nb"]``)."""

    def __init__(
        self,
        kernel_map: KernelMap,
        runtime_dir: str | os.PathLike[str],
        sampler: ResourceSampler | None = None,
    ) -> None:
        self.kernel_map = kernel_map
        self.runtime_dir = Path(runtime_dir)
        self.sampler = sampler if sampler is not None else ResourceSampler()

    async def resources(self) -> dict[str, Any]:
        snap = await self.sampler.snapshot()
        pids = {p.pid for g in snap.gpus for p in g.processes}
        owners = await self.kernel_map.owners(pids)
        return resources_json(snap, owners, self.sampler.monitor.notice)

    async def runs(self) -> dict[str, Any]:
        runs = read_runs(self.runtime_dir)
        if runs:
            notebooks = await self.kernel_map.notebooks()
            for run in runs:
                kid = run.get("kernel_id")
                if kid in notebooks:
                    run["notebook"] = notebooks[kid]
                with contextlib.suppress(KeyError, TypeError, ValueError):
                    run["age_s"] = round(max(0.0, time.time() - float(run["updated"])), 1)
        return {"runs": runs}
