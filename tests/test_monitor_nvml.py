"""The NVML layer: the real library on this machine, and the real backend's error handling
driven through a scripted stand-in for the ``pynvml`` module."""

from __future__ import annotations

import logging
from types import SimpleNamespace
from typing import Any

import pynvml
import pytest

from adaptive_nb.monitor import NvmlBackend, NvmlDeviceError
from adaptive_nb.monitor._fake_nvml import FakeGpu, FakeNvml
from adaptive_nb.monitor.nvml import (
    NO_DRIVER_NOTICE,
    NO_GPU_NOTICE,
    PynvmlBackend,
    _Session,
    open_nvml,
)

MB = 1024 * 1024


def _has_driver() -> bool:
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        return False
    pynvml.nvmlShutdown()
    return True


@pytest.mark.skipif(_has_driver(), reason="this check is for machines without an NVIDIA driver")
def test_real_nvml_without_driver_gives_one_notice_and_no_traceback(
    caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    caplog.set_level(logging.DEBUG)
    backend = open_nvml()
    assert backend.available is False
    assert backend.notice == NO_DRIVER_NOTICE
    assert backend.device_count() == 0
    assert backend.power_w(0) is None
    with pytest.raises(NvmlDeviceError):
        backend.utilization_pct(0)
    out = capsys.readouterr()
    assert "Traceback" not in out.out + out.err
    assert "Traceback" not in caplog.text
    assert open_nvml().notice == NO_DRIVER_NOTICE  # initialised once, same answer


class _Proc:
    def __init__(self, pid: int, used: int | None) -> None:
        self.pid = pid
        self.usedGpuMemory = used


def scripted_pynvml(**overrides: Any) -> SimpleNamespace:
    """A stand-in for the pynvml module: one 16 GiB device unless overridden; real error
    classes so the backend's isinstance checks are exercised."""
    calls: dict[str, int] = {}

    def counted(name: str, value: Any) -> Any:
        def fn(*args: Any) -> Any:
            calls[name] = calls.get(name, 0) + 1
            result = value(*args) if callable(value) else value
            if isinstance(result, BaseException):
                raise result
            return result

        return fn

    funcs: dict[str, Any] = {
        "nvmlInit": None,
        "nvmlShutdown": None,
        "nvmlDeviceGetCount": 1,
        "nvmlDeviceGetHandleByIndex": lambda i: f"h{i}",
        "nvmlDeviceGetUUID": "GPU-1234",
        "nvmlDeviceGetName": b"Tesla T4",
        "nvmlDeviceGetUtilizationRates": SimpleNamespace(gpu=42, memory=10),
        "nvmlDeviceGetMemoryInfo": SimpleNamespace(
            used=1024 * MB, free=15 * 1024 * MB, total=16 * 1024 * MB
        ),
        "nvmlDeviceGetPowerUsage": 70500,
        "nvmlDeviceGetTemperature": 55,
        "nvmlDeviceGetComputeRunningProcesses": [_Proc(10, 512 * MB), _Proc(11, None)],
    }
    funcs.update(overrides)
    ns = SimpleNamespace(
        NVMLError=pynvml.NVMLError,
        NVML_TEMPERATURE_GPU=0,
        calls=calls,
        **{n: getattr(pynvml, n) for n in dir(pynvml) if n.startswith("NVMLError_")},
    )
    for name, value in funcs.items():
        setattr(ns, name, counted(name, value))
    return ns


def backend_with(**overrides: Any) -> tuple[PynvmlBackend, SimpleNamespace]:
    module = scripted_pynvml(**overrides)
    return PynvmlBackend(_Session(loader=lambda: module)), module


def test_real_backend_reads_and_converts_units() -> None:
    b, _ = backend_with()
    assert isinstance(b, NvmlBackend)
    assert b.available and b.notice is None and not b.simulated
    assert b.device_count() == 1
    assert b.uuid(0) == "GPU-1234"
    assert b.name(0) == "Tesla T4"
    assert b.utilization_pct(0) == 42.0
    assert tuple(b.memory_mb(0)) == (1024.0, 15 * 1024.0, 16 * 1024.0)
    assert b.power_w(0) == 70.5
    assert b.temperature_c(0) == 55.0
    assert b.compute_processes(0) == [(10, 512.0), (11, 0.0)]


@pytest.mark.parametrize(
    ("error", "notice"),
    [
        (pynvml.NVMLError_LibraryNotFound(), NO_DRIVER_NOTICE),
        (pynvml.NVMLError_DriverNotLoaded(), NO_DRIVER_NOTICE),
        (pynvml.NVMLError_NoPermission(), "No permission to read the NVIDIA driver"),
        (pynvml.NVMLError_LibRmVersionMismatch(), "different versions"),
        (pynvml.NVMLError_Unknown(), "NVIDIA monitoring unavailable"),
    ],
)
def test_init_failures_become_one_notice(error: Exception, notice: str) -> None:
    b, module = backend_with(nvmlInit=error)
    assert not b.available
    assert b.notice is not None and notice in b.notice
    assert b.notice.endswith("monitoring CPU and RAM only.")
    assert b.device_count() == 0
    # a second backend on the same session does not try to initialise again
    again = PynvmlBackend(b._session)
    assert again.notice == b.notice
    assert module.calls["nvmlInit"] == 1


def test_missing_library_module_gives_notice() -> None:
    def loader() -> Any:
        raise ImportError("no pynvml")

    b = PynvmlBackend(_Session(loader=loader))
    assert not b.available and b.notice is not None and "nvidia-ml-py" in b.notice


def test_driver_without_gpus() -> None:
    b, _ = backend_with(nvmlDeviceGetCount=0)
    assert not b.available
    assert b.notice == NO_GPU_NOTICE


def test_unsupported_optional_fields_are_none() -> None:
    b, _ = backend_with(
        nvmlDeviceGetPowerUsage=pynvml.NVMLError_NotSupported(),
        nvmlDeviceGetTemperature=pynvml.NVMLError_NoPermission(),
        nvmlDeviceGetComputeRunningProcesses=pynvml.NVMLError_NotSupported(),
    )
    assert b.power_w(0) is None
    assert b.temperature_c(0) is None
    assert b.compute_processes(0) == []
    assert b.utilization_pct(0) == 42.0


def test_lost_gpu_raises_device_error_marked_lost() -> None:
    b, _ = backend_with(
        nvmlDeviceGetMemoryInfo=pynvml.NVMLError_GpuIsLost(),
        nvmlDeviceGetPowerUsage=pynvml.NVMLError_GpuIsLost(),
    )
    with pytest.raises(NvmlDeviceError) as info:
        b.memory_mb(0)
    assert info.value.lost and info.value.index == 0
    with pytest.raises(NvmlDeviceError) as info2:
        b.power_w(0)  # even an optional field reports a lost device
    assert info2.value.lost


def test_transient_error_is_not_lost() -> None:
    b, _ = backend_with(nvmlDeviceGetUtilizationRates=pynvml.NVMLError_Unknown())
    with pytest.raises(NvmlDeviceError) as info:
        b.utilization_pct(0)
    assert not info.value.lost


def test_handles_are_cached_and_shutdown_is_idempotent() -> None:
    b, module = backend_with()
    for _ in range(3):
        b.utilization_pct(0)
    assert module.calls["nvmlDeviceGetHandleByIndex"] == 1
    b._session.shutdown()
    b._session.shutdown()
    assert module.calls["nvmlShutdown"] == 1
    with pytest.raises(NvmlDeviceError):  # calls after shutdown fail cleanly
        b.utilization_pct(0)


def test_fake_nvml_follows_protocol_and_mutations() -> None:
    gpu = FakeGpu(name="A100", mem_total_mb=40960, processes=[(1, 100.0), (2, 50.0)])
    nv = FakeNvml([gpu])
    assert isinstance(nv, NvmlBackend)
    assert nv.available and nv.notice is None and nv.simulated
    assert nv.memory_mb(0) == (150.0, 40810.0, 40960.0)
    gpu.mem_used_mb = 1000.0
    gpu.util_pct = 80.0
    assert nv.memory_mb(0).used == 1000.0
    assert nv.utilization_pct(0) == 80.0
    gpu.fail = "error"
    with pytest.raises(NvmlDeviceError) as info:
        nv.name(0)
    assert not info.value.lost
    gpu.fail = "lost"
    with pytest.raises(NvmlDeviceError) as info:
        nv.name(0)
    assert info.value.lost
    assert FakeNvml.no_driver().notice == NO_DRIVER_NOTICE
    assert not FakeNvml.no_driver().available
    assert FakeNvml([]).notice == NO_GPU_NOTICE
