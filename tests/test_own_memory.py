"""Own GPU memory counted from the CUDA allocator, not by NVML PID: in a container NVML
lists our process under a host PID, and our memory must still not count as another job's."""

from __future__ import annotations

import logging

import pytest
import torch

from adaptive_nb.events import EventKind
from adaptive_nb.layout import Plan
from adaptive_nb.monitor import GpuSampler, Monitor
from adaptive_nb.monitor._fake_nvml import FakeGpu, FakeNvml
from adaptive_nb.plan.allocation import AllocationController
from adaptive_nb.run.own_memory import CudaOwnMemory, measure_context_mb, tell_monitor_own_memory
from adaptive_nb.step import StepOutcome

ME = 4242
HOST_PID = 731_000  # how NVML lists this kernel when it runs in a container
CO_TENANT = 99
OURS_MB = 7500.0
THEIRS_MB = 2000.0
TOTAL_MB = 16000.0
BATCH = 240


def containerised_fleet() -> list[FakeGpu]:
    return [
        FakeGpu(
            name=f"GPU{k}",
            mem_total_mb=TOTAL_MB,
            processes=[(HOST_PID, OURS_MB), (CO_TENANT, THEIRS_MB)],
        )
        for k in range(2)
    ]


def reader(held: dict[int, float]) -> CudaOwnMemory:
    return CudaOwnMemory({i: 0.0 for i in held}, reserved_mb=lambda i: held[i])


def test_without_a_reader_our_memory_counts_as_external() -> None:
    g = GpuSampler(FakeNvml(containerised_fleet()), pid=ME, cuda_visible_devices=None)
    s = g.sample()[0][0]
    assert s.self_mem_mb == 0.0 and s.external_mem_mb == OURS_MB + THEIRS_MB  # the bug


def test_allocator_count_excludes_our_memory_from_external() -> None:
    sampler = GpuSampler(FakeNvml(containerised_fleet()), pid=ME, cuda_visible_devices=None)
    sampler.set_own_memory_reader(reader({0: OURS_MB, 1: 500.0}))
    s0, s1 = sampler.sample()[0]
    assert s0.own_mem_mb == OURS_MB and s0.pid_mem_mb == 0.0
    assert s0.self_mem_mb == OURS_MB
    assert s0.external_mem_mb == THEIRS_MB
    assert s0.unlisted_own_mem_mb == OURS_MB
    # the allocator holds less than the process entry we cannot match: still ours only
    assert s1.external_mem_mb == OURS_MB + THEIRS_MB - 500.0


def test_sample_dict_carries_both_counts() -> None:
    sampler = GpuSampler(FakeNvml(containerised_fleet()), pid=ME, cuda_visible_devices=None)
    sampler.set_own_memory_reader(reader({0: OURS_MB, 1: OURS_MB}))
    d = sampler.sample()[0][0].to_dict()
    assert (d["own_mem_mb"], d["self_mem_mb"], d["external_mem_mb"]) == (
        OURS_MB,
        OURS_MB,
        THEIRS_MB,
    )


def test_pid_match_wins_when_it_sees_more_than_the_allocator() -> None:
    gpus = containerised_fleet()[:1]
    gpus[0].processes = [(ME, 3000.0), (CO_TENANT, THEIRS_MB)]  # e.g. non-torch allocations
    sampler = GpuSampler(FakeNvml(gpus), pid=ME, cuda_visible_devices=None)
    sampler.set_own_memory_reader(reader({0: 2000.0}))
    s = sampler.sample()[0][0]
    assert s.self_mem_mb == 3000.0 and s.external_mem_mb == THEIRS_MB
    assert s.unlisted_own_mem_mb == 0.0


def test_a_failing_reader_falls_back_to_pids_and_is_logged_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    def broken(index: int) -> float | None:
        raise RuntimeError("driver hiccup")

    sampler = GpuSampler(FakeNvml(containerised_fleet()), pid=ME, cuda_visible_devices=None)
    sampler.set_own_memory_reader(broken)
    caplog.set_level(logging.WARNING)
    for _ in range(3):
        samples, faults = sampler.sample()
        assert faults == () and all(s.own_mem_mb is None for s in samples)
    assert len([r for r in caplog.records if "own GPU memory" in r.getMessage()]) == 1


def test_devices_the_reader_does_not_know_keep_pid_matching() -> None:
    sampler = GpuSampler(FakeNvml(containerised_fleet()), pid=ME, cuda_visible_devices=None)
    sampler.set_own_memory_reader(reader({0: OURS_MB}))
    s0, s1 = sampler.sample()[0]
    assert s0.own_mem_mb == OURS_MB and s1.own_mem_mb is None


class Engine:
    last_batch = BATCH

    def device_names(self) -> list[str]:
        return ["GPU 0 (test)", "GPU 1 (test)"]

    def monitor_keys(self) -> list[int | None]:
        return [0, 1]

    def apply_plan(self, plan: Plan) -> None:
        pass


def warmed_controller(mon: Monitor) -> AllocationController:
    ctl = AllocationController(Engine(), snapshots=mon)
    for b in (120, 60, 90, 40, 110) * 6:  # demand 1000 + 50·b MB per device
        chunks = {0: b, 1: BATCH - b}
        ctl.observe(
            StepOutcome(
                loss=torch.zeros(()),
                samples=BATCH,
                wall_s=0.25,
                device_time_s={p: 0.005 + c / 500.0 for p, c in chunks.items()},
                device_batch=chunks,
                peak_mem_mb={p: 1000.0 + 50.0 * c for p, c in chunks.items()},
            )
        )
    return ctl


def test_controller_cap_is_not_halved_by_our_own_memory() -> None:
    # 16000 MB GPUs, we hold 7500, a co-tenant 2000. Counting ours as external leaves
    # 6500·0.9 MB: (5850 − 1000) / 50 = 97 samples per device, 2 micro-batches for 240.
    # Counting right: 14000·0.9 → 232 samples, one micro-batch of 120 + 120.
    mon = Monitor(nvml=FakeNvml(containerised_fleet()), cuda_visible_devices=None)
    mon.set_own_memory_reader(reader({0: OURS_MB, 1: OURS_MB}))
    ctl = warmed_controller(mon)
    events = ctl.tick(1.0, 30, mon.sample_now())
    assert ctl.plan.micro_batches == 1
    assert ctl.plan.chunks(BATCH) == [120, 120]
    notices = [e for e in events if e.kind == EventKind.NOTICE and "PID namespace" in e.detail]
    assert len(notices) == 2 and "GPU 0 (test)" in notices[0].detail
    again = ctl.tick(3.0, 38, mon.sample_now())  # said once per device
    assert not [e for e in again if "PID namespace" in e.detail]


def test_controller_without_reader_is_starved_as_before() -> None:
    # the same fleet without the reader: the failure mode this module fixes, shown
    mon = Monitor(nvml=FakeNvml(containerised_fleet()), cuda_visible_devices=None)
    ctl = warmed_controller(mon)
    ctl.tick(1.0, 30, mon.sample_now())
    assert ctl.plan.micro_batches == 2


def test_context_measured_by_nvml_difference_when_created() -> None:
    used = {0: 5000.0, 1: 3000.0, 2: 1000.0}
    contexts: set[int] = {0}  # the model already lives on device 0

    def create(i: int) -> None:
        contexts.add(i)
        used[i] += 450.0 if i == 1 else 350.0

    known: dict[int, float] = {}
    sizes = measure_context_mb(
        [0, 1, 2],
        lambda i: used[i],
        known=known,
        has_context=lambda i: i in contexts,
        create_context=create,
        reserved_mb=lambda i: 0.0,
    )
    assert sizes == {0: 400.0, 1: 450.0, 2: 350.0}  # device 0: median of those measured
    assert known == {1: 450.0, 2: 350.0}
    # measured once per device: a later run reuses the sizes
    again = measure_context_mb(
        [1],
        lambda i: pytest.fail("NVML read again"),
        known=known,
        has_context=lambda i: False,
        create_context=lambda i: pytest.fail("context created again"),
    )
    assert again == {1: 450.0}


def test_context_unknown_everywhere_counts_as_external() -> None:
    sizes = measure_context_mb(
        [0], lambda i: 1000.0, known={}, has_context=lambda i: True, create_context=print
    )
    assert sizes == {0: 0.0}


def test_reader_adds_context_to_reserved() -> None:
    r = CudaOwnMemory({0: 300.0}, reserved_mb=lambda i: 1024.0)
    assert r(0) == 1324.0 and r(1) is None


def test_backend_helper_sets_the_reader_on_a_monitor() -> None:
    mon = Monitor(nvml=FakeNvml(containerised_fleet()), cuda_visible_devices=None)
    tell_monitor_own_memory(mon, [])  # no devices to measure: still installs a reader
    assert isinstance(mon.gpu._own, CudaOwnMemory)
    tell_monitor_own_memory(object(), [0])  # a source without the setter is left alone


@pytest.mark.gpu
def test_reader_matches_nvml_for_this_process_on_a_real_gpu() -> None:
    from adaptive_nb.monitor import default_monitor

    mon = default_monitor()
    tell_monitor_own_memory(mon, [0])
    x = torch.empty(256 * 2**20, dtype=torch.uint8, device="cuda:0")
    g = next(g for g in mon.sample_now().gpus if g.index == 0)
    assert g.own_mem_mb is not None and g.own_mem_mb >= 256.0
    if g.pid_mem_mb > 0:  # NVML sees our PID here: the two counts must roughly agree
        assert g.own_mem_mb == pytest.approx(g.pid_mem_mb, abs=max(256.0, 0.15 * g.pid_mem_mb))
    del x
