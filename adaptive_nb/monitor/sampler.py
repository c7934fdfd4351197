"""The monitor: a background thread that samples host and GPUs into bounded ring buffers.

>>> from adaptive_nb.monitor import Monitor
>>> from adaptive_nb.monitor._fake_nvml import FakeGpu, FakeNvml  # a scripted NVML
>>> with Monitor(rate_hz=2.0, nvml=FakeNvml([FakeGpu(name="A100")])) as mon:
...     snap = mon.sample_now()
>>> snap.gpus[0].name
'A100'

Nothing here raises into the caller once constructed: NVML problems become a ``notice``
(no GPU monitoring) or a :class:`~adaptive_nb.monitor.snapshot.GpuFault` (one device
unreadable); an unexpected error in a sampler or a listener is logged once and sampling
goes on.
"""

from __future__ import annotations

import atexit
import bisect
import logging
import threading
import time
from collections.abc import Callable, Sequence
from types import TracebackType

import numpy as np
import numpy.typing as npt

from ..errors import UsageError
from .gpu import FROM_ENV, GpuSampler, _FromEnv
from .host import HostSampler
from .nvml import NO_DRIVER_NOTICE, NvmlBackend, open_nvml
from .ring import NumericRing, Ring
from .snapshot import GpuFault, GpuSample, HostSample, OwnMemoryReader, Snapshot

__all__ = [
    "HOST_SERIES",
    "Listener",
    "Monitor",
    "default_monitor",
    "describe_machine",
    "stop_default_monitor",
]

log = logging.getLogger(__name__)

Listener = Callable[[Snapshot], None]

HOST_SERIES = (
    "cpu_pct",
    "ram_used_mb",
    "ram_available_mb",
    "proc_cpu_pct",
    "proc_rss_mb",
)
"""Host fields kept as numeric series (see :meth:`Monitor.series`), besides ``"t"`` and
``"cost_s"`` (seconds one sample took)."""

DEFAULT_CAPACITY = 3600  # 30 minutes at 2 Hz


class Monitor:
    """Samples the machine at ``rate_hz`` into ring buffers of ``capacity`` snapshots.

    * ``nvml``: the GPU backend; None tries the real NVML once and falls back to CPU-only
      monitoring with :attr:`notice` set.
    * ``host``: the host sampler (default: a :class:`HostSampler` for this process).
    * ``pid``: whose GPU processes count as ``is_self`` (default: this process).
    * ``cuda_visible_devices`` / ``cuda_uuids``: see :class:`GpuSampler`.

    :meth:`start` runs a daemon thread; :meth:`sample_now` samples on the calling thread.
    Both store the snapshot; listeners are called (on the sampler thread) only for the
    thread's samples.
    """

    def __init__(
        self,
        rate_hz: float = 2.0,
        capacity: int = DEFAULT_CAPACITY,
        nvml: NvmlBackend | None = None,
        host: HostSampler | None = None,
        *,
        pid: int | None = None,
        cuda_visible_devices: str | _FromEnv | None = FROM_ENV,
        cuda_uuids: Sequence[str] | None = None,
    ) -> None:
        if not rate_hz > 0:
            raise UsageError(f"the monitor's rate must be above 0 Hz, got {rate_hz}")
        if int(capacity) < 1:
            raise UsageError(f"the monitor must keep at least 1 sample, got {capacity}")
        self.rate_hz = float(rate_hz)
        self.capacity = int(capacity)
        self.nvml: NvmlBackend = nvml if nvml is not None else open_nvml()
        self.host = host if host is not None else HostSampler(pid=pid)
        self.gpu = GpuSampler(self.nvml, pid, cuda_visible_devices, cuda_uuids)

        self._lock = threading.Lock()  # guards the rings and the listener list
        self._sample_lock = threading.Lock()  # one sample at a time (samplers keep deltas)
        self._snapshots: Ring[Snapshot] = Ring(self.capacity)
        self._series = {name: NumericRing(self.capacity) for name in ("t", "cost_s", *HOST_SERIES)}
        self._listeners: list[Listener] = []
        self._logged: set[str] = set()
        self._last_host: HostSample | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self.samples_taken = 0

    # --- what the machine is -------------------------------------------------------------
    @property
    def gpu_available(self) -> bool:
        return bool(self.nvml.available)

    @property
    def notice(self) -> str | None:
        """The one clear line saying why GPUs are not monitored (None when they are)."""
        return None if self.nvml.available else self.nvml.notice

    def gpu_names(self) -> list[str]:
        """GPU names in NVML order ([] without GPUs)."""
        if not self.nvml.available:
            return []
        with self._sample_lock:
            return self.gpu.names()

    def set_cuda_uuids(self, cuda_uuids: Sequence[str] | None) -> None:
        """Tell the sampler torch's device UUIDs (in torch order) so that each
        :class:`GpuSample` carries the right torch index (see :class:`GpuSampler`)."""
        with self._sample_lock:
            self.gpu.set_cuda_uuids(cuda_uuids)

    def set_own_memory_reader(self, reader: OwnMemoryReader | None) -> None:
        """Count this process's GPU memory with ``reader(torch_index)`` (see
        :meth:`GpuSampler.set_own_memory_reader`); None: back to PID matching only."""
        with self._sample_lock:
            self.gpu.set_own_memory_reader(reader)

    def lost_gpus(self) -> dict[int, str]:
        """NVML index → UUID of GPUs that were reported lost (fell off the bus)."""
        return dict(self.gpu.lost)

    # --- sampling ------------------------------------------------------------------------
    def _log_once(self, key: str, msg: str, *args: object) -> None:
        if key not in self._logged:
            self._logged.add(key)
            log.warning(msg, *args, exc_info=True)

    def _host_sample(self) -> HostSample:
        try:
            h = self.host.sample()
        except Exception:
            self._log_once("host", "Host sampling failed; reusing the last reading")
            if self._last_host is not None:
                return self._last_host
            cores = float(getattr(self.host, "cpu_cores", 1.0))
            return HostSample(0.0, (), 0.0, 0.0, 0.0, 0.0, 0.0, cores)
        self._last_host = h
        return h

    def _gpu_sample(self) -> tuple[tuple[GpuSample, ...], tuple[GpuFault, ...]]:
        if not self.nvml.available:
            return (), ()
        try:
            return self.gpu.sample()
        except Exception:
            self._log_once("gpu", "GPU sampling failed; no GPU readings in this sample")
            return (), ()

    def sample_now(self) -> Snapshot:
        """Take one sample on the calling thread, store it and return it. Never raises."""
        with self._sample_lock:
            t0 = time.perf_counter()
            host = self._host_sample()
            gpus, faults = self._gpu_sample()
            snap = Snapshot(t=time.monotonic(), host=host, gpus=gpus, faults=faults)
            cost = time.perf_counter() - t0
        with self._lock:
            self._snapshots.append(snap)
            series = self._series
            series["t"].append(snap.t)
            series["cost_s"].append(cost)
            for name in HOST_SERIES:
                series[name].append(getattr(host, name))
            self.samples_taken += 1
        return snap

    # --- reading -------------------------------------------------------------------------
    def latest(self) -> Snapshot | None:
        with self._lock:
            return self._snapshots.last()

    def history(self, seconds: float | None = None) -> list[Snapshot]:
        """Stored snapshots, oldest first; only those from the last ``seconds`` if given."""
        with self._lock:
            items = self._snapshots.items()
        if seconds is None:
            return items
        cutoff = time.monotonic() - seconds
        start = bisect.bisect_left(items, cutoff, key=lambda s: s.t)
        return items[start:]

    def series(self, name: str) -> npt.NDArray[np.floating]:
        """A numeric series, oldest first: ``"t"``, ``"cost_s"`` or one of
        :data:`HOST_SERIES`."""
        ring = self._series.get(name)
        if ring is None:
            known = ", ".join(self._series)
            raise UsageError(f"no monitor series named {name!r}; known: {known}")
        with self._lock:
            return ring.values()

    def mean_cost_s(self) -> float | None:
        """Mean seconds one stored sample took to take (None before the first)."""
        values = self.series("cost_s")
        return float(values.mean()) if values.size else None

    # --- listeners -----------------------------------------------------------------------
    def add_listener(self, fn: Listener) -> Callable[[], None]:
        """Call ``fn(snapshot)`` on the sampler thread after each background sample.
        Keep it quick; exceptions are logged once and ignored. Returns a function that
        removes the listener."""
        with self._lock:
            self._listeners.append(fn)

        def remove() -> None:
            self.remove_listener(fn)

        return remove

    def remove_listener(self, fn: Listener) -> None:
        with self._lock:
            if fn in self._listeners:
                self._listeners.remove(fn)

    def _notify(self, snap: Snapshot) -> None:
        with self._lock:
            listeners = list(self._listeners)
        for fn in listeners:
            try:
                fn(snap)
            except Exception:
                self._log_once(f"listener:{id(fn)}", "Monitor listener %r failed", fn)

    # --- thread --------------------------------------------------------------------------
    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> Monitor:
        """Start the background sampler (no-op when already running)."""
        if self.running:
            return self
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._run, args=(self._stop,), name="adaptive_nb-monitor", daemon=True
        )
        self._thread.start()
        return self

    def stop(self, timeout: float = 2.0) -> None:
        """Stop the background sampler and wait up to ``timeout`` seconds for it."""
        self._stop.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)
        self._thread = None

    def _run(self, stop: threading.Event) -> None:
        period = 1.0 / self.rate_hz
        deadline = time.monotonic()
        while not stop.is_set():
            try:
                snap = self.sample_now()
            except Exception:  # sample_now guards itself; this is the last net
                self._log_once("loop", "Monitor sample failed")
            else:
                self._notify(snap)
            deadline += period
            now = time.monotonic()
            if deadline < now:  # fell behind: skip the missed ticks, no burst
                deadline = now
            stop.wait(deadline - now)

    def __enter__(self) -> Monitor:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<Monitor {self.rate_hz:g} Hz, {len(self.gpu_names())} GPUs, {state}>"


# --- one-line description -------------------------------------------------------------------


def _gb(mb: float) -> str:
    return f"{mb / 1024.0:.1f} GB"


def _cores(n: float) -> str:
    return f"{int(n)}" if float(n).is_integer() else f"{n:.1f}"


def describe_machine(source: Monitor | Snapshot, notice: str | None = None) -> str:
    """One line about the machine, e.g.
    ``2 GPUs: GPU 0 NVIDIA A100-SXM4-40GB 40.0 GB (3% busy, 1.2 GB used) · GPU 1 ...`` or
    ``CPU only: 2 cores, 23.5 GB RAM``. With a monitor, its notice is added when NVML failed
    for another reason than a missing driver."""
    if isinstance(source, Monitor):
        snap = source.latest() or source.sample_now()
        notice = notice if notice is not None else source.notice
    else:
        snap = source
    gpus = snap.gpus
    if gpus:
        simulated = all(g.simulated for g in gpus)
        kind = "simulated GPU" if simulated else "GPU"
        head = f"{len(gpus)} {kind}{'s' if len(gpus) != 1 else ''}"
        parts = []
        for g in gpus:
            label = f"GPU {g.index}" if g.index is not None else f"GPU nvml:{g.nvml_index} (hidden)"
            tag = " [simulated]" if g.simulated and not simulated else ""
            parts.append(
                f"{label} {g.name}{tag} {_gb(g.mem_total_mb)} "
                f"({g.util_pct:.0f}% busy, {_gb(g.mem_used_mb)} used)"
            )
        line = f"{head}: " + " · ".join(parts)
        if snap.faults:
            line += f" · {len(snap.faults)} unreadable"
        return line
    host = snap.host
    line = f"CPU only: {_cores(host.cpu_cores)} cores, {_gb(host.ram_total_mb)} RAM"
    if notice and notice != NO_DRIVER_NOTICE:
        line += f" ({notice})"
    return line


# --- process-wide default -------------------------------------------------------------------

_default: Monitor | None = None
_default_lock = threading.Lock()
_atexit_registered = False


def default_monitor() -> Monitor:
    """The process-wide monitor (2 Hz, real NVML), started on first use and stopped at
    exit. Shared by the dashboard, the server extension and training runs."""
    global _default, _atexit_registered
    with _default_lock:
        if _default is None:
            _default = Monitor()
            if not _atexit_registered:
                atexit.register(stop_default_monitor)
                _atexit_registered = True
        if not _default.running:
            _default.start()
        return _default


def stop_default_monitor() -> None:
    """Stop and forget the process-wide monitor (safe to call any time, repeatedly)."""
    global _default
    with _default_lock:
        mon, _default = _default, None
    if mon is not None:
        mon.stop()
