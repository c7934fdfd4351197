"""What NVML would show on the simulated fleet: a :class:`FakeNvml` kept in step with the
scenario's state, read by the monitor's own GPU sampler.

At virtual time ``t`` it shows the state at ``t − monitor_lag_s`` (clamped at 0): the
external load, memory and failures of that moment and this run's own usage after the last
step that had ended by then. What NVML reports of a co-tenant is its ``external_util``,
never its true ``slowdown``: the two are kept apart on purpose."""

from __future__ import annotations

import os

from ..monitor._fake_nvml import FakeGpu, FakeNvml
from ..monitor.gpu import GpuSampler
from ..monitor.snapshot import HostSample, Snapshot
from .fleet import Fleet

__all__ = ["SimSnapshots"]

_EXTERNAL_PID = 0x7FFF0000  # a pid that is not ours: the "other job" on a device


class SimSnapshots:
    """``latest()`` → :class:`Snapshot` of the simulated GPUs at the virtual time (samples
    marked ``simulated``; a failed device is unreadable, as a GPU that fell off the bus).
    Utilisation: external load plus this run's busy share of what is left."""

    def __init__(self, fleet: Fleet, *, real_host: bool = True) -> None:
        self.fleet = fleet
        self.gpus = [
            FakeGpu(name=f"{d.name} (simulated)", mem_total_mb=1024.0 * d.memory_gb)
            for d in fleet.scenario.devices
        ]
        self.nvml = FakeNvml(self.gpus, simulated=True)
        self._pid = os.getpid()
        self.sampler = GpuSampler(self.nvml, pid=self._pid, cuda_visible_devices=None)
        self._host_sampler = None
        if real_host:
            try:
                from ..monitor.host import HostSampler

                self._host_sampler = HostSampler()
            except Exception:
                self._host_sampler = None
        self._host0 = HostSample(0.0, (), 0.0, 0.0, 0.0, 0.0, 0.0, float(os.cpu_count() or 1))

    def seen_at(self) -> float:
        """The virtual time whose state the monitor shows now."""
        return max(0.0, self.fleet.clock.now() - self.fleet.scenario.monitor_lag_s)

    def _refresh(self) -> None:
        fl = self.fleet
        t = self.seen_at()
        busy_by, mem_by = fl.own_usage(t)
        for i, gpu in enumerate(self.gpus):
            st = fl.state(i, t)
            gpu.fail = "lost" if st.failed else None
            busy = busy_by.get(i, 0.0)
            gpu.util_pct = 100.0 * min(1.0, st.util + (1.0 - st.util) * busy)
            procs: list[tuple[int, float]] = []
            if st.ext_mem_gb > 0:
                procs.append((_EXTERNAL_PID + i, 1024.0 * st.ext_mem_gb))
            room = max(0.0, gpu.mem_total_mb - 1024.0 * st.ext_mem_gb)
            mine = min(mem_by.get(i, 0.0), room)
            if mine > 0:
                procs.append((self._pid, mine))
            gpu.processes = procs

    def latest(self) -> Snapshot | None:
        self._refresh()
        gpus, faults = self.sampler.sample()
        host = self._host0
        if self._host_sampler is not None:
            try:
                host = self._host_sampler.sample()
            except Exception:
                host = self._host0
        return Snapshot(t=self.fleet.clock.now(), host=host, gpus=gpus, faults=faults)
