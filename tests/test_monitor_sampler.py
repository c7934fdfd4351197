"""Monitor: synchronous and background sampling, history, listeners, notices, memory bounds,
the one-line machine description and the process-wide default."""

from __future__ import annotations

import gc
import logging
import threading
import time
import tracemalloc

import pytest

from adaptive_nb.errors import UsageError
from adaptive_nb.monitor import (
    NO_DRIVER_NOTICE,
    HostSample,
    HostSampler,
    Monitor,
    Snapshot,
    default_monitor,
    describe_machine,
    stop_default_monitor,
)
from adaptive_nb.monitor._fake_nvml import FakeGpu, FakeNvml

ME = 4242
HOST = HostSample(
    cpu_pct=12.5,
    per_core_pct=(10.0, 15.0),
    ram_used_mb=1000.0,
    ram_available_mb=7192.0,
    ram_total_mb=8192.0,
    proc_cpu_pct=50.0,
    proc_rss_mb=300.0,
    cpu_cores=2.0,
)


class FixedHost(HostSampler):
    """A host sampler that returns a fixed reading (fast, deterministic)."""

    def __init__(self, fail_after: int | None = None) -> None:
        self.cpu_cores = 2.0
        self.calls = 0
        self.fail_after = fail_after

    def sample(self) -> HostSample:
        self.calls += 1
        if self.fail_after is not None and self.calls > self.fail_after:
            raise OSError("psutil hiccup")
        return HOST


def wait_for(cond: object, timeout: float = 3.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if callable(cond) and cond():
            return
        time.sleep(0.01)
    raise AssertionError("condition not met in time")


def two_gpus() -> FakeNvml:
    return FakeNvml(
        [
            FakeGpu(
                name="NVIDIA A100-SXM4-40GB",
                uuid="GPU-a",
                mem_total_mb=40960.0,
                util_pct=3.0,
                processes=[(ME, 1228.8)],
            ),
            FakeGpu(name="NVIDIA RTX 4090", uuid="GPU-b", mem_total_mb=24576.0),
        ]
    )


def monitor(**kw: object) -> Monitor:
    kw.setdefault("nvml", two_gpus())
    kw.setdefault("host", FixedHost())
    kw.setdefault("cuda_visible_devices", None)
    return Monitor(pid=ME, **kw)  # type: ignore[arg-type]


def test_sample_now_stores_and_returns_snapshot() -> None:
    mon = monitor()
    assert mon.latest() is None and mon.history() == []
    snap = mon.sample_now()
    assert isinstance(snap, Snapshot)
    assert snap.host == HOST
    assert [g.name for g in snap.gpus] == ["NVIDIA A100-SXM4-40GB", "NVIDIA RTX 4090"]
    assert snap.gpus[0].self_mem_mb == 1228.8
    assert mon.latest() is snap
    assert mon.history() == [snap]
    assert mon.gpu_available and mon.notice is None
    assert mon.gpu_names() == ["NVIDIA A100-SXM4-40GB", "NVIDIA RTX 4090"]
    assert mon.series("cpu_pct").tolist() == [12.5]
    assert mon.mean_cost_s() is not None and mon.mean_cost_s() > 0  # type: ignore[operator]
    with pytest.raises(UsageError, match="no monitor series"):
        mon.series("nope")


def test_bad_arguments_are_usage_errors() -> None:
    with pytest.raises(UsageError):
        Monitor(rate_hz=0, nvml=FakeNvml(), host=FixedHost())
    with pytest.raises(UsageError):
        Monitor(capacity=0, nvml=FakeNvml(), host=FixedHost())


def test_thread_samples_at_rate_and_stops() -> None:
    mon = monitor(rate_hz=50.0)
    seen: list[Snapshot] = []
    threads: set[str] = set()

    def listener(s: Snapshot) -> None:
        seen.append(s)
        threads.add(threading.current_thread().name)

    remove = mon.add_listener(listener)
    with mon:
        assert mon.running
        wait_for(lambda: len(seen) >= 5)
    assert not mon.running
    n = mon.samples_taken
    time.sleep(0.1)
    assert mon.samples_taken == n  # really stopped
    assert threads == {"adaptive_nb-monitor"}
    assert seen[-1] is mon.history()[-1]
    ts = [s.t for s in mon.history()]
    assert ts == sorted(ts)
    remove()
    mon.start()
    wait_for(lambda: mon.samples_taken >= n + 2)
    mon.stop()
    assert len(seen) <= n  # removed listener was not called again


def test_rate_is_respected_roughly() -> None:
    mon = monitor(rate_hz=20.0)
    mon.start()
    time.sleep(0.5)
    mon.stop()
    assert 5 <= mon.samples_taken <= 15


def test_history_seconds_filters_by_age() -> None:
    mon = monitor()
    old = mon.sample_now()
    time.sleep(0.2)
    recent = mon.sample_now()
    assert mon.history(0.1) == [recent]
    assert mon.history(10.0) == [old, recent]


def test_listener_errors_are_logged_once_and_do_not_stop_sampling(
    caplog: pytest.LogCaptureFixture,
) -> None:
    mon = monitor(rate_hz=100.0)
    good: list[Snapshot] = []

    def bad(_: Snapshot) -> None:
        raise RuntimeError("listener bug")

    mon.add_listener(bad)
    mon.add_listener(good.append)
    caplog.set_level(logging.WARNING)
    with mon:
        wait_for(lambda: len(good) >= 5)
    failures = [r for r in caplog.records if "listener" in r.getMessage()]
    assert len(failures) == 1


def test_host_errors_do_not_kill_the_thread(caplog: pytest.LogCaptureFixture) -> None:
    host = FixedHost(fail_after=2)
    mon = monitor(rate_hz=100.0, host=host)
    caplog.set_level(logging.WARNING)
    with mon:
        wait_for(lambda: mon.samples_taken >= 10)
    assert all(s.host == HOST for s in mon.history())  # last good reading reused
    assert len([r for r in caplog.records if "Host sampling failed" in r.getMessage()]) == 1


def test_device_failing_mid_run_is_skipped_without_exception() -> None:
    nv = two_gpus()
    mon = monitor(rate_hz=100.0, nvml=nv)
    with mon:
        wait_for(lambda: mon.samples_taken >= 2)
        nv.devices[1].fail = "lost"
        n = mon.samples_taken
        wait_for(lambda: mon.samples_taken >= n + 3)
        assert mon.running
    last = mon.latest()
    assert last is not None
    assert [g.uuid for g in last.gpus] == ["GPU-a"]
    assert last.faults[0].uuid == "GPU-b" and last.faults[0].lost
    assert mon.lost_gpus() == {1: "GPU-b"}
    assert "1 unreadable" in describe_machine(last)


def test_no_driver_gives_exactly_one_notice_and_cpu_only(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    mon = monitor(nvml=FakeNvml.no_driver(), rate_hz=100.0)
    assert not mon.gpu_available
    assert mon.notice == NO_DRIVER_NOTICE
    assert mon.gpu_names() == []
    with mon:
        wait_for(lambda: mon.samples_taken >= 5)
    assert all(s.gpus == () and s.faults == () for s in mon.history())
    assert caplog.records == []  # nothing logged: the notice is the one message
    assert describe_machine(mon) == "CPU only: 2 cores, 8.0 GB RAM"


def test_default_nvml_on_this_machine_falls_back_with_notice() -> None:
    mon = Monitor(host=FixedHost())
    if mon.gpu_available:
        pytest.skip("this machine has a working NVIDIA driver")
    assert mon.notice is not None and mon.notice.endswith("monitoring CPU and RAM only.")
    assert mon.sample_now().gpus == ()


def test_describe_machine_with_gpus() -> None:
    mon = monitor()
    line = describe_machine(mon)
    assert line == (
        "2 simulated GPUs: GPU 0 NVIDIA A100-SXM4-40GB 40.0 GB (3% busy, 1.2 GB used) · "
        "GPU 1 NVIDIA RTX 4090 24.0 GB (0% busy, 0.0 GB used)"
    )
    real = FakeNvml([FakeGpu(name="T4", mem_total_mb=15360.0)], simulated=False)
    line = describe_machine(monitor(nvml=real, cuda_visible_devices=""))
    assert line == "1 GPU: GPU nvml:0 (hidden) T4 15.0 GB (0% busy, 0.0 GB used)"


def test_describe_machine_cpu_only_mentions_other_failures() -> None:
    odd = FakeNvml(driver=False, notice="No permission to read the NVIDIA driver: x.")
    assert describe_machine(monitor(nvml=odd)) == (
        "CPU only: 2 cores, 8.0 GB RAM (No permission to read the NVIDIA driver: x.)"
    )
    snap = Snapshot(t=0.0, host=HostSample(0, (), 0, 0, 1536.0, 0, 0, 1.5))
    assert describe_machine(snap) == "CPU only: 1.5 cores, 1.5 GB RAM"


def test_memory_stays_flat_over_many_samples() -> None:
    # A default monitor left running by an earlier test samples through the same code on
    # its own thread (its rings still filling): stop it so only this monitor is measured.
    stop_default_monitor()
    capacity = 64
    mon = monitor(capacity=capacity, nvml=FakeNvml([FakeGpu(processes=[(ME, 1.0)])]))
    for _ in range(2_000):
        mon.sample_now()
    gc.collect()
    # Count only allocations made through the monitor's code (other threads of the test
    # process, e.g. an earlier test's background work, allocate too and must not count).
    ours = [tracemalloc.Filter(True, "*adaptive_nb/monitor/*", all_frames=True)]
    tracemalloc.start(25)
    try:
        for _ in range(2 * capacity):  # steady state: the rings hold traced samples only
            mon.sample_now()
        gc.collect()
        first = tracemalloc.take_snapshot().filter_traces(ours)
        for _ in range(20_000):
            mon.sample_now()
        gc.collect()
        second = tracemalloc.take_snapshot().filter_traces(ours)
    finally:
        tracemalloc.stop()
    before = sum(stat.size for stat in first.statistics("filename"))
    after = sum(stat.size for stat in second.statistics("filename"))
    assert len(mon.history()) == capacity
    assert mon._snapshots.storage_len == capacity
    assert all(len(mon.series(n)) == capacity for n in ("t", "cost_s", "cpu_pct"))
    assert mon.samples_taken == 22_000 + 2 * capacity
    assert after - before < 64 * 1024, f"grew by {after - before} bytes"


def test_default_monitor_is_a_started_singleton() -> None:
    try:
        a = default_monitor()
        b = default_monitor()
        assert a is b and a.running
        wait_for(lambda: a.latest() is not None)
    finally:
        stop_default_monitor()
    assert not a.running
    stop_default_monitor()  # idempotent
    c = default_monitor()
    try:
        assert c is not a and c.running
    finally:
        stop_default_monitor()
