"""A programmable stand-in for NVML: tests and simulated fleets describe GPUs in plain
Python and change them while a monitor samples.

Each :class:`FakeGpu` is a mutable record; change its attributes at any time and the next
sample sees the new values. Memory is in MB, utilisation in percent.

>>> gpu = FakeGpu(name="A100", mem_total_mb=40960, processes=[(4242, 1024.0)])
>>> nvml = FakeNvml([gpu])
>>> nvml.memory_mb(0).used       # mem_used_mb=None: the sum of the processes' memory
1024.0
>>> gpu.util_pct = 75.0          # the next sample reads 75 %
>>> gpu.fail = "lost"            # reads of this device now raise NvmlDeviceError(lost=True)
>>> FakeNvml.no_driver().notice
'No NVIDIA GPU driver found: monitoring CPU and RAM only.'
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal

from .nvml import NO_DRIVER_NOTICE, NO_GPU_NOTICE, MemoryMB, NvmlDeviceError

__all__ = ["FakeGpu", "FakeNvml"]

_serial = itertools.count()

FailMode = Literal["error", "lost"]


def _fake_uuid() -> str:
    return f"GPU-fa4e0000-0000-4000-8000-{next(_serial):012x}"


@dataclass
class FakeGpu:
    """One simulated GPU. Every attribute may be changed between samples.

    * ``mem_used_mb=None`` means "the sum of ``processes``' memory"; set a number to
      model memory not attributed to any process.
    * ``processes``: ``[(pid, used_mb), ...]`` compute processes on this device.
    * ``power_w`` / ``temperature_c``: None models a device that does not report them.
    * ``fail``: None (healthy), ``"error"`` (reads raise a transient
      :class:`NvmlDeviceError`) or ``"lost"`` (reads raise with ``lost=True``, as when a GPU
      falls off the bus).
    """

    name: str = "Simulated GPU"
    uuid: str = field(default_factory=_fake_uuid)
    mem_total_mb: float = 16384.0
    util_pct: float = 0.0
    mem_used_mb: float | None = None
    processes: list[tuple[int, float]] = field(default_factory=list)
    power_w: float | None = None
    temperature_c: float | None = None
    fail: FailMode | None = None

    def used_mb(self) -> float:
        if self.mem_used_mb is not None:
            return float(self.mem_used_mb)
        return float(sum(mb for _, mb in self.processes))


class FakeNvml:
    """Implements :class:`~adaptive_nb.monitor.nvml.NvmlBackend` over a list of
    :class:`FakeGpu` (``devices``, mutable: append or remove to hot-plug).

    ``driver=False`` models a machine without an NVIDIA driver (unavailable, with the
    same notice as the real backend). ``simulated`` labels the samples (default True).
    ``reads`` counts device reads, for cost tests.
    """

    def __init__(
        self,
        devices: Iterable[FakeGpu] = (),
        *,
        driver: bool = True,
        simulated: bool = True,
        notice: str | None = None,
    ) -> None:
        self.devices: list[FakeGpu] = list(devices)
        self.driver = driver
        self._simulated = simulated
        self._notice = notice
        self.reads = 0

    @classmethod
    def no_driver(cls) -> FakeNvml:
        """A machine with no NVIDIA driver."""
        return cls(driver=False)

    @property
    def available(self) -> bool:
        return self.driver and self._notice is None and len(self.devices) > 0

    @property
    def notice(self) -> str | None:
        if self._notice is not None:
            return self._notice
        if not self.driver:
            return NO_DRIVER_NOTICE
        if not self.devices:
            return NO_GPU_NOTICE
        return None

    @property
    def simulated(self) -> bool:
        return self._simulated

    def _gpu(self, index: int) -> FakeGpu:
        self.reads += 1
        if not self.available:
            raise NvmlDeviceError(index, self.notice or "NVML unavailable")
        if not 0 <= index < len(self.devices):
            raise NvmlDeviceError(index, "no such device", lost=True)
        gpu = self.devices[index]
        if gpu.fail == "lost":
            raise NvmlDeviceError(index, "GPU is lost", lost=True)
        if gpu.fail is not None:
            raise NvmlDeviceError(index, "unknown error")
        return gpu

    def device_count(self) -> int:
        return len(self.devices) if self.available else 0

    def uuid(self, index: int) -> str:
        return self._gpu(index).uuid

    def name(self, index: int) -> str:
        return self._gpu(index).name

    def utilization_pct(self, index: int) -> float:
        return float(self._gpu(index).util_pct)

    def memory_mb(self, index: int) -> MemoryMB:
        gpu = self._gpu(index)
        total = float(gpu.mem_total_mb)
        used = min(gpu.used_mb(), total)
        return MemoryMB(used, total - used, total)

    def power_w(self, index: int) -> float | None:
        return self._gpu(index).power_w

    def temperature_c(self, index: int) -> float | None:
        return self._gpu(index).temperature_c

    def compute_processes(self, index: int) -> list[tuple[int, float]]:
        return [(int(pid), float(mb)) for pid, mb in self._gpu(index).processes]
