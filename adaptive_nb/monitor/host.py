"""Host sampling with psutil: CPU and RAM of the machine and of this process, bounded by the
container's cgroup limits and the process's CPU affinity.

Every call is non-blocking: CPU percentages are computed from the difference between two
successive reads of the kernel's counters, never by sleeping.

>>> sampler = HostSampler()
>>> sample = sampler.sample()
>>> sample.cpu_cores > 0
True
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import psutil

from .snapshot import HostSample

__all__ = [
    "CgroupLimits",
    "HostSampler",
    "read_cgroup_limits",
    "usable_cores",
]

MB = 1024.0 * 1024.0
DEFAULT_CGROUP_ROOT = "/sys/fs/cgroup"
# cgroup v1 reports "no limit" as a huge page-aligned number (e.g. 9223372036854771712).
_UNLIMITED_BYTES = 1 << 60


@dataclass(frozen=True)
class CgroupLimits:
    """Limits found in the cgroup filesystem (None: no limit set or not readable)."""

    version: int | None  # 1, 2, or None when no cgroup files were found
    memory_limit_bytes: int | None
    cpu_quota_cores: float | None  # quota / period, e.g. 1.5
    memory_usage_file: Path | None = None  # where the cgroup's current usage is read

    @property
    def memory_limit_mb(self) -> float | None:
        return None if self.memory_limit_bytes is None else self.memory_limit_bytes / MB


def _read_text(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None


def _parse_bytes(text: str | None) -> int | None:
    if text is None or text == "max":
        return None
    try:
        value = int(text)
    except ValueError:
        return None
    if value <= 0 or value >= _UNLIMITED_BYTES:
        return None
    return value


def _parse_cpu_max(text: str | None) -> float | None:
    """cgroup v2 ``cpu.max``: ``"max 100000"`` (no limit) or ``"150000 100000"``."""
    if text is None:
        return None
    parts = text.split()
    if not parts or parts[0] == "max":
        return None
    try:
        quota = int(parts[0])
        period = int(parts[1]) if len(parts) > 1 else 100_000
    except ValueError:
        return None
    if quota <= 0 or period <= 0:
        return None
    return quota / period


def _parse_cfs(quota_text: str | None, period_text: str | None) -> float | None:
    """cgroup v1 ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us`` (quota -1: no limit)."""
    if quota_text is None or period_text is None:
        return None
    try:
        quota, period = int(quota_text), int(period_text)
    except ValueError:
        return None
    if quota <= 0 or period <= 0:
        return None
    return quota / period


def _own_cgroup_path(proc_cgroup: Path, v2: bool, controller: str = "") -> str | None:
    """This process's cgroup path from ``/proc/self/cgroup`` (``0::/path`` for v2,
    ``N:controller,...:/path`` for v1)."""
    text = _read_text(proc_cgroup)
    if text is None:
        return None
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        hier, controllers, path = parts
        if v2 and hier == "0" and controllers == "":
            return path
        if not v2 and controller in controllers.split(","):
            return path
    return None


def _candidate_dirs(base: Path, own_path: str | None) -> list[Path]:
    """The process's own cgroup directory and its ancestors up to ``base`` (limits are
    hierarchical: the tightest one along the way applies)."""
    dirs: list[Path] = []
    if own_path and own_path not in ("/", "") and ".." not in own_path.split("/"):
        d = base / own_path.lstrip("/")
        while True:
            if d.is_dir():
                dirs.append(d)
            if d == base or base not in d.parents:
                break
            d = d.parent
    if base not in dirs:
        dirs.append(base)
    return dirs


def _min_opt(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return min(present) if present else None


def read_cgroup_limits(
    root: str | os.PathLike[str] = DEFAULT_CGROUP_ROOT,
    proc_cgroup: str | os.PathLike[str] = "/proc/self/cgroup",
) -> CgroupLimits:
    """Read memory and CPU limits from cgroup v2 (``memory.max``, ``cpu.max``) or v1
    (``memory/memory.limit_in_bytes``, ``cpu/cpu.cfs_quota_us`` + ``cpu.cfs_period_us``)
    under ``root``. Missing or unreadable files mean "no limit"; nothing raises."""
    base = Path(root)
    proc = Path(proc_cgroup)
    if (base / "cgroup.controllers").exists() or (base / "memory.max").exists():
        dirs = _candidate_dirs(base, _own_cgroup_path(proc, v2=True))
        mem_limits = [_parse_bytes(_read_text(d / "memory.max")) for d in dirs]
        cpu_limits = [_parse_cpu_max(_read_text(d / "cpu.max")) for d in dirs]
        usage = next((d / "memory.current" for d in dirs if (d / "memory.current").exists()), None)
        mem = _min_opt([float(m) if m is not None else None for m in mem_limits])
        return CgroupLimits(2, None if mem is None else int(mem), _min_opt(cpu_limits), usage)

    mem_dirs = [base / "memory"] if (base / "memory").is_dir() else []
    cpu_dirs = [base / n for n in ("cpu", "cpu,cpuacct", "cpuacct,cpu") if (base / n).is_dir()]
    if not mem_dirs and not cpu_dirs and not (base / "memory.limit_in_bytes").exists():
        return CgroupLimits(None, None, None)
    if not mem_dirs and (base / "memory.limit_in_bytes").exists():
        mem_dirs = [base]  # root points straight at a v1 controller directory
    if not cpu_dirs and (base / "cpu.cfs_quota_us").exists():
        cpu_dirs = [base]

    mem_limit: float | None = None
    usage_file: Path | None = None
    for m in mem_dirs:
        dirs = _candidate_dirs(m, _own_cgroup_path(proc, v2=False, controller="memory"))
        limits: list[float | None] = []
        for d in dirs:
            b = _parse_bytes(_read_text(d / "memory.limit_in_bytes"))
            limits.append(None if b is None else float(b))
        mem_limit = _min_opt([mem_limit, *limits])
        if usage_file is None:
            usage_file = next(
                (
                    d / "memory.usage_in_bytes"
                    for d in dirs
                    if (d / "memory.usage_in_bytes").exists()
                ),
                None,
            )
    cpu_quota: float | None = None
    for c in cpu_dirs:
        dirs = _candidate_dirs(c, _own_cgroup_path(proc, v2=False, controller="cpu"))
        quotas = [
            _parse_cfs(_read_text(d / "cpu.cfs_quota_us"), _read_text(d / "cpu.cfs_period_us"))
            for d in dirs
        ]
        cpu_quota = _min_opt([cpu_quota, *quotas])
    return CgroupLimits(1, None if mem_limit is None else int(mem_limit), cpu_quota, usage_file)


def _affinity_count() -> int | None:
    getaffinity = getattr(os, "sched_getaffinity", None)
    if getaffinity is None:
        return None
    try:
        return len(getaffinity(0))
    except OSError:
        return None


def usable_cores(
    limits: CgroupLimits, affinity: int | None = None, logical: int | None = None
) -> float:
    """Cores this process may use: the smallest of the logical CPU count, the CPU affinity
    set and the cgroup CPU quota (which may be fractional, e.g. 1.5)."""
    candidates: list[float] = []
    total = logical if logical is not None else (os.cpu_count() or 1)
    candidates.append(float(total))
    if affinity is not None and affinity > 0:
        candidates.append(float(affinity))
    if limits.cpu_quota_cores is not None:
        candidates.append(limits.cpu_quota_cores)
    return max(min(candidates), 0.01)


class HostSampler:
    """Samples the host and this process. Keeps the previous CPU counters so that each
    :meth:`sample` reports usage since the previous call (or since construction).

    ``cgroup_root`` and ``proc_cgroup`` are injectable so tests can point them at fake
    files; limits are read once at construction (call :meth:`refresh_limits` to re-read).
    Not thread-safe: one owner calls :meth:`sample`.
    """

    def __init__(
        self,
        cgroup_root: str | os.PathLike[str] = DEFAULT_CGROUP_ROOT,
        proc_cgroup: str | os.PathLike[str] = "/proc/self/cgroup",
        pid: int | None = None,
    ) -> None:
        self._cgroup_root = cgroup_root
        self._proc_cgroup = proc_cgroup
        self._process = psutil.Process(pid)
        self.limits = read_cgroup_limits(cgroup_root, proc_cgroup)
        self.cpu_cores = usable_cores(self.limits, _affinity_count())
        self._last_times = self._read_core_times()
        self._process.cpu_percent(interval=None)  # prime: the next call measures from here

    def refresh_limits(self) -> None:
        self.limits = read_cgroup_limits(self._cgroup_root, self._proc_cgroup)
        self.cpu_cores = usable_cores(self.limits, _affinity_count())

    @staticmethod
    def _read_core_times() -> list[tuple[float, float]]:
        """(busy, total) seconds per core, psutil's definition (idle and iowait not busy;
        guest time already counted in user time)."""
        out: list[tuple[float, float]] = []
        for t in psutil.cpu_times(percpu=True):
            total = sum(t)
            for name in ("guest", "guest_nice"):
                total -= getattr(t, name, 0.0)
            idle = t.idle + getattr(t, "iowait", 0.0)
            out.append((total - idle, total))
        return out

    def _cpu_percent(self) -> tuple[float, tuple[float, ...]]:
        now = self._read_core_times()
        prev = self._last_times
        self._last_times = now
        per_core: list[float] = []
        busy_sum = total_sum = 0.0
        for k, (busy, total) in enumerate(now):
            if k < len(prev):
                d_busy, d_total = busy - prev[k][0], total - prev[k][1]
            else:
                d_busy, d_total = 0.0, 0.0
            busy_sum += max(d_busy, 0.0)
            total_sum += max(d_total, 0.0)
            per_core.append(_pct(d_busy, d_total))
        return _pct(busy_sum, total_sum), tuple(per_core)

    def _ram(self) -> tuple[float, float, float]:
        vm = psutil.virtual_memory()
        total = vm.total / MB
        used = (vm.total - vm.available) / MB
        available = vm.available / MB
        limit = self.limits.memory_limit_mb
        if limit is not None and limit < total:
            usage_file = self.limits.memory_usage_file
            cg_used = _parse_bytes(_read_text(usage_file)) if usage_file is not None else None
            if cg_used is not None:
                used = cg_used / MB
            total = limit
            available = max(0.0, min(available, limit - used))
        return used, available, total

    def sample(self) -> HostSample:
        cpu_pct, per_core = self._cpu_percent()
        used, available, total = self._ram()
        try:
            with self._process.oneshot():
                proc_cpu = float(self._process.cpu_percent(interval=None))
                rss = self._process.memory_info().rss / MB
        except (psutil.Error, OSError):
            proc_cpu, rss = 0.0, 0.0
        return HostSample(
            cpu_pct=cpu_pct,
            per_core_pct=per_core,
            ram_used_mb=used,
            ram_available_mb=available,
            ram_total_mb=total,
            proc_cpu_pct=proc_cpu,
            proc_rss_mb=rss,
            cpu_cores=self.cpu_cores,
        )


def _pct(busy: float, total: float) -> float:
    if total <= 0.0:
        return 0.0
    return round(min(max(busy / total * 100.0, 0.0), 100.0), 1)
