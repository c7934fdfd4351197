"""What one monitoring sample holds: host (CPU/RAM) and per-GPU readings."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

__all__ = [
    "GpuFault",
    "GpuProcess",
    "GpuSample",
    "HostSample",
    "OwnMemoryReader",
    "Snapshot",
    "SnapshotSource",
]

OwnMemoryReader = Callable[[int], float | None]
"""``reader(torch_index) -> MB`` this process holds on the device (CUDA allocator reserved
+ context), or None when unknown. Set by a GPU run (which has torch); the monitor itself
never imports torch."""


@dataclass(frozen=True)
class GpuProcess:
    """A compute process holding memory on a GPU."""

    pid: int
    used_memory_mb: float
    is_self: bool  # True for this Python process (the training run)


@dataclass(frozen=True)
class GpuSample:
    """One reading of one GPU. ``index`` is the torch (CUDA-visible) index, or None when
    the device is not visible to torch in this process (``CUDA_VISIBLE_DEVICES``)."""

    index: int | None
    nvml_index: int
    uuid: str
    name: str
    util_pct: float
    mem_used_mb: float
    mem_free_mb: float
    mem_total_mb: float
    power_w: float | None = None
    temperature_c: float | None = None
    processes: tuple[GpuProcess, ...] = ()
    simulated: bool = False
    # This process's memory as its CUDA allocator counts it (reserved + the context), when
    # a training run told the monitor how to read it; None: not known (PID matching only).
    own_mem_mb: float | None = None

    @property
    def pid_mem_mb(self) -> float:
        """Memory NVML's process list attributes to this process's PID. In a container
        NVML reports PIDs of the host's namespace, so this is often 0 for our own job."""
        return sum(p.used_memory_mb for p in self.processes if p.is_self)

    @property
    def self_mem_mb(self) -> float:
        """Memory this process holds: the larger of the allocator's count and the PID
        match (the allocator does not see non-torch allocations; the PID match does not
        work across PID namespaces)."""
        if self.own_mem_mb is None:
            return self.pid_mem_mb
        return max(self.own_mem_mb, self.pid_mem_mb)

    @property
    def unlisted_own_mem_mb(self) -> float:
        """Own memory (allocator count) that NVML's process list does not attribute to our
        PID: large when the PIDs come from another PID namespace; 0 when unknown."""
        if self.own_mem_mb is None:
            return 0.0
        return max(0.0, self.own_mem_mb - self.pid_mem_mb)

    @property
    def external_mem_mb(self) -> float:
        """Memory held by other processes (or not attributed to any process of ours)."""
        return max(0.0, self.mem_used_mb - self.self_mem_mb)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["self_mem_mb"] = self.self_mem_mb
        d["external_mem_mb"] = self.external_mem_mb
        return d


@dataclass(frozen=True)
class GpuFault:
    """A GPU that could not be read in this sample (it is absent from ``Snapshot.gpus``).
    ``lost``: the device is gone (fell off the bus / needs a reset), not a passing error."""

    nvml_index: int
    index: int | None  # torch (CUDA-visible) index, as in GpuSample
    uuid: str  # "" when not even the UUID could be read
    lost: bool
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class HostSample:
    """One reading of the host: system and this process."""

    cpu_pct: float  # whole machine, 0..100
    per_core_pct: tuple[float, ...]
    ram_used_mb: float
    ram_available_mb: float
    ram_total_mb: float  # cgroup limit when lower than physical RAM
    proc_cpu_pct: float  # this process, 100 = one core
    proc_rss_mb: float
    cpu_cores: float  # usable cores (cgroup quota or affinity)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Snapshot:
    """Everything sampled at one instant (``t`` from ``time.monotonic()``)."""

    t: float
    host: HostSample
    gpus: tuple[GpuSample, ...] = field(default_factory=tuple)
    faults: tuple[GpuFault, ...] = ()  # GPUs present but unreadable in this sample

    def to_dict(self) -> dict[str, Any]:
        return {
            "t": self.t,
            "host": self.host.to_dict(),
            "gpus": [g.to_dict() for g in self.gpus],
            "faults": [f.to_dict() for f in self.faults],
        }


class SnapshotSource(Protocol):
    """Anything that serves the latest monitoring sample: the background :class:`Monitor`,
    a simulated fleet's NVML view, a test's scripted source."""

    def latest(self) -> Snapshot | None: ...
