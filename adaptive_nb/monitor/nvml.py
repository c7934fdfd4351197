"""The NVML layer: a small backend protocol and the real backend over ``pynvml``.

Every ``pynvml.NVMLError`` is turned into one of three outcomes here, and nowhere else:

* NVML cannot start (no library, driver not loaded, no permission, ...): the backend is
  *unavailable* and carries one clear ``notice`` (e.g. :data:`NO_DRIVER_NOTICE`); nothing
  is raised and no traceback is printed.
* An optional field is not supported (power, temperature, processes): that value is None
  (processes: empty).
* A device cannot be read (GPU lost, unknown error): :class:`NvmlDeviceError` is raised for
  that device only; the GPU sampler skips the device and reports it. ``lost`` tells whether
  the device has fallen off the bus.

All quantities are in MB (1 MB = 2**20 bytes), percent, watts and degrees Celsius.

>>> backend = open_nvml()          # never raises
>>> backend.available or backend.notice is not None
True
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import threading
from collections.abc import Callable
from typing import Any, NamedTuple, Protocol, TypeVar, runtime_checkable

__all__ = [
    "NO_DRIVER_NOTICE",
    "NO_GPU_NOTICE",
    "MemoryMB",
    "NvmlBackend",
    "NvmlDeviceError",
    "PynvmlBackend",
    "open_nvml",
]

log = logging.getLogger(__name__)

MB = 1024.0 * 1024.0
NO_DRIVER_NOTICE = "No NVIDIA GPU driver found: monitoring CPU and RAM only."
NO_GPU_NOTICE = "NVIDIA driver found but no GPU is present: monitoring CPU and RAM only."

R = TypeVar("R")


class MemoryMB(NamedTuple):
    """Device memory in MB."""

    used: float
    free: float
    total: float


class NvmlDeviceError(RuntimeError):
    """One device could not be read. ``lost``: the device is gone (fell off the bus,
    needs a reset); otherwise the error may be transient."""

    def __init__(self, index: int, message: str, lost: bool = False) -> None:
        super().__init__(f"GPU (NVML index {index}): {message}")
        self.index = index
        self.lost = lost


@runtime_checkable
class NvmlBackend(Protocol):
    """What the GPU sampler needs from NVML, by NVML device index.

    ``utilization_pct`` and ``memory_mb`` raise :class:`NvmlDeviceError` when the device
    cannot be read; the optional readings return None (processes: ``[]``) when the device
    does not support them. Only :class:`NvmlDeviceError` may escape a method.
    """

    @property
    def available(self) -> bool:
        """True when NVML works and at least one device exists."""
        ...

    @property
    def notice(self) -> str | None:
        """Why GPUs are not monitored (None when ``available``)."""
        ...

    @property
    def simulated(self) -> bool:
        """True when the devices are not real (their samples are labelled simulated)."""
        ...

    def device_count(self) -> int: ...

    def uuid(self, index: int) -> str: ...

    def name(self, index: int) -> str: ...

    def utilization_pct(self, index: int) -> float: ...

    def memory_mb(self, index: int) -> MemoryMB: ...

    def power_w(self, index: int) -> float | None: ...

    def temperature_c(self, index: int) -> float | None: ...

    def compute_processes(self, index: int) -> list[tuple[int, float]]:
        """``[(pid, used_memory_mb), ...]`` (memory 0.0 when the driver does not say)."""
        ...


# --- process-wide NVML session --------------------------------------------------------------


class _Session:
    """NVML initialised once per process (thread-safe, idempotent) and shut down at exit
    after in-flight calls finish. All NVML calls go through :meth:`call` under one lock."""

    def __init__(self, loader: Callable[[], Any] | None = None) -> None:
        self._loader = loader or _import_pynvml
        self.lock = threading.RLock()
        self.started = False
        self.closed = False
        self.notice: str | None = None
        self.error: BaseException | None = None
        self.module: Any = None

    def start(self) -> bool:
        with self.lock:
            if self.started:
                return self.module is not None and self.notice is None
            self.started = True
            try:
                pynvml = self._loader()
            except ImportError:
                self.notice = (
                    "The NVIDIA monitoring library (nvidia-ml-py) is not installed: "
                    "monitoring CPU and RAM only."
                )
                return False
            try:
                pynvml.nvmlInit()
            except pynvml.NVMLError as err:
                self.error = err
                self.notice = _init_notice(pynvml, err)
                log.info("NVML unavailable: %s", err)
                return False
            except OSError as err:  # a broken libnvidia-ml that fails to load
                self.error = err
                self.notice = (
                    f"NVIDIA monitoring failed to load ({err}): monitoring CPU and RAM only."
                )
                return False
            self.module = pynvml
            atexit.register(self.shutdown)
            return True

    def shutdown(self) -> None:
        """Shut NVML down once; waits (under the lock) for any in-flight call."""
        acquired = self.lock.acquire(timeout=5.0)
        try:
            if self.closed or self.module is None:
                self.closed = True
                return
            self.closed = True
            if not acquired:  # a call is stuck inside the driver: leave it to the OS
                return
            with contextlib.suppress(Exception):
                self.module.nvmlShutdown()
        finally:
            if acquired:
                self.lock.release()


def _import_pynvml() -> Any:
    import pynvml

    return pynvml


def _init_notice(pynvml: Any, err: BaseException) -> str:
    no_driver = tuple(
        getattr(pynvml, n)
        for n in (
            "NVMLError_LibraryNotFound",
            "NVMLError_DriverNotLoaded",
            "NVMLError_FunctionNotFound",
        )
        if hasattr(pynvml, n)
    )
    if isinstance(err, no_driver):
        return NO_DRIVER_NOTICE
    if isinstance(err, getattr(pynvml, "NVMLError_NoPermission", ())):
        return "No permission to read the NVIDIA driver: monitoring CPU and RAM only."
    if isinstance(err, getattr(pynvml, "NVMLError_LibRmVersionMismatch", ())):
        return (
            "The NVIDIA driver and its library have different versions (reload the driver "
            "or reboot): monitoring CPU and RAM only."
        )
    return f"NVIDIA monitoring unavailable ({err}): monitoring CPU and RAM only."


_SESSION = _Session()


class PynvmlBackend:
    """The real backend. Construct it with :func:`open_nvml` (it never raises)."""

    simulated = False

    def __init__(self, session: _Session | None = None) -> None:
        self._session = session or _SESSION
        ok = self._session.start()
        self._nv: Any = self._session.module
        self._handles: dict[int, Any] = {}
        self._count = 0
        self._notice = self._session.notice
        if ok:
            try:
                self._count = int(self._locked(self._nv.nvmlDeviceGetCount))
            except self._nv.NVMLError as err:
                self._notice = (
                    f"NVIDIA monitoring unavailable ({err}): monitoring CPU and RAM only."
                )
            else:
                if self._count == 0:
                    self._notice = NO_GPU_NOTICE
        self._lost = self._lost_errors()

    def _lost_errors(self) -> tuple[type[BaseException], ...]:
        if self._nv is None:
            return ()
        names = ("NVMLError_GpuIsLost", "NVMLError_GpuNotFound", "NVMLError_ResetRequired")
        return tuple(getattr(self._nv, n) for n in names if hasattr(self._nv, n))

    @property
    def available(self) -> bool:
        return self._nv is not None and self._count > 0 and self._notice is None

    @property
    def notice(self) -> str | None:
        return self._notice

    def _locked(self, fn: Callable[..., R], *args: Any) -> R:
        with self._session.lock:
            if self._session.closed:
                raise RuntimeError("NVML has been shut down")
            return fn(*args)

    def _handle(self, index: int) -> Any:
        h = self._handles.get(index)
        if h is None:
            h = self._locked(self._nv.nvmlDeviceGetHandleByIndex, index)
            self._handles[index] = h
        return h

    def _device_error(self, index: int, err: BaseException) -> NvmlDeviceError:
        lost = isinstance(err, self._lost)
        if lost:
            self._handles.pop(index, None)
        return NvmlDeviceError(index, str(err) or type(err).__name__, lost=lost)

    def _call(self, index: int, fn_name: str, *args: Any) -> Any:
        return self._locked(getattr(self._nv, fn_name), self._handle(index), *args)

    def _required(self, index: int, fn_name: str, *args: Any) -> Any:
        if not self.available:
            raise NvmlDeviceError(index, self._notice or "NVML unavailable")
        try:
            return self._call(index, fn_name, *args)
        except (self._nv.NVMLError, RuntimeError) as err:
            raise self._device_error(index, err) from None

    def _optional(self, index: int, fn_name: str, *args: Any) -> Any:
        """None when unsupported; a lost device still raises so it is noticed."""
        if not self.available:
            return None
        try:
            return self._call(index, fn_name, *args)
        except (self._nv.NVMLError, RuntimeError) as err:
            if isinstance(err, self._lost):
                raise self._device_error(index, err) from None
            return None

    # --- protocol ------------------------------------------------------------------------
    def device_count(self) -> int:
        return self._count if self.available else 0

    def uuid(self, index: int) -> str:
        return _text(self._required(index, "nvmlDeviceGetUUID"))

    def name(self, index: int) -> str:
        return _text(self._required(index, "nvmlDeviceGetName"))

    def utilization_pct(self, index: int) -> float:
        return float(self._required(index, "nvmlDeviceGetUtilizationRates").gpu)

    def memory_mb(self, index: int) -> MemoryMB:
        info = self._required(index, "nvmlDeviceGetMemoryInfo")
        return MemoryMB(info.used / MB, info.free / MB, info.total / MB)

    def power_w(self, index: int) -> float | None:
        mw = self._optional(index, "nvmlDeviceGetPowerUsage")
        return None if mw is None else float(mw) / 1000.0

    def temperature_c(self, index: int) -> float | None:
        if not self.available:
            return None
        t = self._optional(index, "nvmlDeviceGetTemperature", self._nv.NVML_TEMPERATURE_GPU)
        return None if t is None else float(t)

    def compute_processes(self, index: int) -> list[tuple[int, float]]:
        procs = self._optional(index, "nvmlDeviceGetComputeRunningProcesses")
        if not procs:
            return []
        out: list[tuple[int, float]] = []
        for p in procs:
            used = getattr(p, "usedGpuMemory", None)
            out.append((int(p.pid), float(used) / MB if isinstance(used, int) else 0.0))
        return out


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def open_nvml() -> PynvmlBackend:
    """The real NVML backend. Never raises; check ``available`` and ``notice``."""
    return PynvmlBackend()
