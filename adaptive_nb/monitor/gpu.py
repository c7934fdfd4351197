"""GPU sampling: NVML readings turned into :class:`GpuSample` records with torch indices.

NVML numbers devices in PCI bus order; torch numbers the devices ``CUDA_VISIBLE_DEVICES``
lets it see. The mapping is made by UUID and worked out from the environment variable
alone (no CUDA call), so it is cheap and testable:

>>> parse_cuda_visible_devices("2,0", ["GPU-aa", "GPU-bb", "GPU-cc"])
[2, 0]
>>> parse_cuda_visible_devices("GPU-cc", ["GPU-aa", "GPU-bb", "GPU-cc"])
[2]

Integer entries are read as NVML (PCI bus) indices, which is what CUDA uses when
``CUDA_DEVICE_ORDER=PCI_BUS_ID`` or when the GPUs are alike. A caller that knows torch's
own UUIDs (``torch.cuda.get_device_properties(i).uuid``) can pass them as ``cuda_uuids``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Final

from .nvml import NvmlBackend, NvmlDeviceError
from .snapshot import GpuFault, GpuProcess, GpuSample, OwnMemoryReader

__all__ = ["GpuSampler", "parse_cuda_visible_devices", "torch_index_map"]

log = logging.getLogger(__name__)


class _FromEnv:
    def __repr__(self) -> str:
        return "<read CUDA_VISIBLE_DEVICES from the environment>"


FROM_ENV: Final = _FromEnv()


def parse_cuda_visible_devices(value: str | None, nvml_uuids: Sequence[str]) -> list[int | None]:
    """Torch index → NVML index for a ``CUDA_VISIBLE_DEVICES`` value.

    Position *i* of the result is torch device *i*; its value is the NVML index, or None
    for an entry that cannot be mapped to a whole GPU (a ``MIG-`` instance). Like CUDA,
    parsing stops at the first invalid entry (unknown index or UUID prefix, ambiguous
    prefix, duplicate). ``None`` (unset) means every device in NVML order; an empty
    string means none.
    """
    if value is None:
        return list(range(len(nvml_uuids)))
    out: list[int | None] = []
    seen: set[int] = set()
    lowered = [u.lower() for u in nvml_uuids]
    for raw in value.split(","):
        token = raw.strip()
        if not token:
            break
        nvml_index: int | None
        if token.upper().startswith("MIG-"):
            out.append(None)
            continue
        if token.upper().startswith("GPU-"):
            matches = [k for k, u in enumerate(lowered) if u.startswith(token.lower())]
            if len(matches) != 1:
                break
            nvml_index = matches[0]
        else:
            try:
                nvml_index = int(token)
            except ValueError:
                break
            if not 0 <= nvml_index < len(nvml_uuids):
                break
        if nvml_index in seen:
            break
        seen.add(nvml_index)
        out.append(nvml_index)
    return out


def torch_index_map(
    value: str | None, nvml_uuids: Sequence[str], cuda_uuids: Sequence[str] | None = None
) -> dict[int, int]:
    """NVML index → torch index for the devices torch can see (others are absent).

    ``cuda_uuids`` (torch's UUIDs in torch order, when known) takes precedence over the
    environment variable."""
    if cuda_uuids is not None:
        by_uuid = {_norm_uuid(u): k for k, u in enumerate(nvml_uuids)}
        mapping: dict[int, int] = {}
        for torch_index, u in enumerate(cuda_uuids):
            nvml_index = by_uuid.get(_norm_uuid(u))
            if nvml_index is not None:
                mapping[nvml_index] = torch_index
        return mapping
    order = parse_cuda_visible_devices(value, nvml_uuids)
    return {nvml: k for k, nvml in enumerate(order) if nvml is not None}


def _norm_uuid(u: str) -> str:
    u = u.strip().lower()
    return u[4:] if u.startswith("gpu-") else u


class GpuSampler:
    """Reads every NVML device into :class:`GpuSample` records.

    * ``pid``: the process whose GPU processes are marked ``is_self`` (default: this one).
    * ``cuda_visible_devices``: the value to map indices with; by default the
      environment variable is read at each sample (cheap; re-mapped only when it changes).
    * A device that cannot be read is skipped and reported as a :class:`GpuFault`; the
      first failure of each device is logged once. Nothing raises out of :meth:`sample`.
    * ``own_memory``: see :meth:`set_own_memory_reader`.
    """

    def __init__(
        self,
        backend: NvmlBackend,
        pid: int | None = None,
        cuda_visible_devices: str | _FromEnv | None = FROM_ENV,
        cuda_uuids: Sequence[str] | None = None,
    ) -> None:
        self.backend = backend
        self.pid = os.getpid() if pid is None else pid
        self._cvd = cuda_visible_devices
        self._cuda_uuids = list(cuda_uuids) if cuda_uuids is not None else None
        self._static: dict[int, tuple[str, str]] = {}  # nvml index -> (uuid, name)
        self._map_key: tuple[object, tuple[str, ...]] | None = None
        self._map: dict[int, int] = {}
        self._failing: set[int] = set()
        self._last_uuid: dict[int, str] = {}  # survives a lost device's static info
        self.lost: dict[int, str] = {}  # nvml index -> uuid of devices reported lost
        self._own: OwnMemoryReader | None = None
        self._own_failed = False

    def set_cuda_uuids(self, cuda_uuids: Sequence[str] | None) -> None:
        """Map by torch's own device UUIDs (torch order) from now on: exact whatever
        ``CUDA_DEVICE_ORDER`` is (CUDA's default order, fastest first, can differ from
        NVML's PCI order on a mixed workstation)."""
        self._cuda_uuids = list(cuda_uuids) if cuda_uuids is not None else None
        self._map_key = None  # re-map at the next sample

    def set_own_memory_reader(self, reader: OwnMemoryReader | None) -> None:
        """Count this process's memory with ``reader(torch_index)`` from now on (MB, or
        None when unknown), instead of only by matching NVML's process PIDs to ours: in
        Docker and most cloud notebooks NVML reports PIDs of another PID namespace, so our
        own memory would be counted as another job's. A GPU run sets it (CUDA allocator
        reserved + context); the sampler itself needs no torch."""
        self._own = reader
        self._own_failed = False

    def _own_mb(self, index: int | None) -> float | None:
        reader = self._own
        if reader is None or index is None:
            return None
        try:
            mb = reader(index)
        except Exception:  # the reader must not break sampling: fall back to PID matching
            if not self._own_failed:
                self._own_failed = True
                log.warning("Reading own GPU memory failed; matching NVML PIDs", exc_info=True)
            return None
        return None if mb is None else max(0.0, float(mb))

    def _env_value(self) -> str | None:
        if isinstance(self._cvd, _FromEnv):
            return os.environ.get("CUDA_VISIBLE_DEVICES")
        return self._cvd

    def _static_info(self, i: int) -> tuple[str, str]:
        info = self._static.get(i)
        if info is None:
            info = (self.backend.uuid(i), self.backend.name(i))
            self._static[i] = info
            self._last_uuid[i] = info[0]
        return info

    def _torch_index(self, count: int) -> dict[int, int]:
        uuids = tuple(self._static[i][0] if i in self._static else "" for i in range(count))
        env = self._env_value()
        key = (env, uuids)
        if key != self._map_key:
            self._map = torch_index_map(env, uuids, self._cuda_uuids)
            self._map_key = key
        return self._map

    def names(self) -> list[str]:
        """Device names in NVML order (those whose name could be read)."""
        out: list[str] = []
        for i in range(self._count()):
            try:
                out.append(self._static_info(i)[1])
            except NvmlDeviceError:
                continue
        return out

    def _count(self) -> int:
        try:
            return int(self.backend.device_count())
        except NvmlDeviceError:
            return 0

    def sample(self) -> tuple[tuple[GpuSample, ...], tuple[GpuFault, ...]]:
        count = self._count()
        readable: dict[int, tuple[str, str]] = {}
        faults: list[tuple[int, str, NvmlDeviceError]] = []
        for i in range(count):
            try:
                readable[i] = self._static_info(i)
            except NvmlDeviceError as err:
                faults.append((i, self._last_uuid.get(i, ""), err))
        index_of = self._torch_index(count)

        samples: list[GpuSample] = []
        simulated = bool(getattr(self.backend, "simulated", False))
        for i, (uuid, name) in readable.items():
            try:
                samples.append(self._read(i, uuid, name, index_of.get(i), simulated))
            except NvmlDeviceError as err:
                faults.append((i, uuid, err))
            else:
                if i in self._failing:
                    self._failing.discard(i)
                    self.lost.pop(i, None)
                    log.info("GPU %s (%s) can be read again", i, name)
        return tuple(samples), tuple(self._fault(i, u, e, index_of) for i, u, e in faults)

    def _read(self, i: int, uuid: str, name: str, index: int | None, sim: bool) -> GpuSample:
        b = self.backend
        mem = b.memory_mb(i)
        util = b.utilization_pct(i)
        procs = tuple(
            GpuProcess(pid=pid, used_memory_mb=mb, is_self=pid == self.pid)
            for pid, mb in b.compute_processes(i)
        )
        return GpuSample(
            index=index,
            nvml_index=i,
            uuid=uuid,
            name=name,
            util_pct=util,
            mem_used_mb=mem.used,
            mem_free_mb=mem.free,
            mem_total_mb=mem.total,
            power_w=b.power_w(i),
            temperature_c=b.temperature_c(i),
            processes=procs,
            simulated=sim,
            own_mem_mb=self._own_mb(index),
        )

    def _fault(self, i: int, uuid: str, err: NvmlDeviceError, index_of: dict[int, int]) -> GpuFault:
        if i not in self._failing:
            self._failing.add(i)
            log.warning("Cannot read GPU %s%s: %s", i, " (lost)" if err.lost else "", err)
        if err.lost:
            self.lost[i] = uuid
            self._static.pop(i, None)  # a device that returns may come back different
        return GpuFault(
            nvml_index=i, index=index_of.get(i), uuid=uuid, lost=err.lost, reason=str(err)
        )
