"""Monitoring: host (psutil, cgroup-aware) and GPUs (NVML) sampled into bounded rings.

>>> from adaptive_nb.monitor import Monitor, describe_machine
>>> with Monitor() as mon:           # CPU-only with a notice when there is no GPU driver
...     line = describe_machine(mon)
"""

from __future__ import annotations

from .gpu import GpuSampler, parse_cuda_visible_devices, torch_index_map
from .host import CgroupLimits, HostSampler, read_cgroup_limits, usable_cores
from .nvml import (
    NO_DRIVER_NOTICE,
    NO_GPU_NOTICE,
    MemoryMB,
    NvmlBackend,
    NvmlDeviceError,
    PynvmlBackend,
    open_nvml,
)
from .ring import NumericRing, Ring
from .sampler import (
    HOST_SERIES,
    Listener,
    Monitor,
    default_monitor,
    describe_machine,
    stop_default_monitor,
)
from .snapshot import GpuFault, GpuProcess, GpuSample, HostSample, Snapshot, SnapshotSource

__all__ = [
    "HOST_SERIES",
    "NO_DRIVER_NOTICE",
    "NO_GPU_NOTICE",
    "CgroupLimits",
    "GpuFault",
    "GpuProcess",
    "GpuSample",
    "GpuSampler",
    "HostSample",
    "HostSampler",
    "Listener",
    "MemoryMB",
    "Monitor",
    "NumericRing",
    "NvmlBackend",
    "NvmlDeviceError",
    "PynvmlBackend",
    "Ring",
    "Snapshot",
    "SnapshotSource",
    "default_monitor",
    "describe_machine",
    "open_nvml",
    "parse_cuda_visible_devices",
    "read_cgroup_limits",
    "stop_default_monitor",
    "torch_index_map",
    "usable_cores",
]
