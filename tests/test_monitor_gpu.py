"""GPU sampler over FakeNvml: values, processes, torch-index mapping, failing devices."""

from __future__ import annotations

import logging

import pytest

from adaptive_nb.monitor import GpuSampler, Monitor, parse_cuda_visible_devices
from adaptive_nb.monitor._fake_nvml import FakeGpu, FakeNvml
from adaptive_nb.monitor.gpu import torch_index_map

UUIDS = [
    "GPU-aaaa1111-0000-0000-0000-000000000000",
    "GPU-bbbb2222-0000-0000-0000-000000000000",
    "GPU-bbbb3333-0000-0000-0000-000000000000",
    "GPU-cccc4444-0000-0000-0000-000000000000",
]
ME = 4242


def fleet() -> list[FakeGpu]:
    return [FakeGpu(name=f"GPU{k}", uuid=u, mem_total_mb=16384.0) for k, u in enumerate(UUIDS)]


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, [0, 1, 2, 3]),
        ("", []),
        ("  ", []),
        ("2,0", [2, 0]),
        (" 3 , 1 ", [3, 1]),
        ("1,7,2", [1]),  # out of range stops the list, as in CUDA
        ("1,x,2", [1]),
        ("0,0", [0]),  # duplicate stops
        ("-1", []),
        ("GPU-cccc", [3]),
        ("gpu-AAAA1111", [0]),
        ("GPU-bbbb,0", []),  # ambiguous prefix stops
        ("GPU-bbbb3,GPU-aaaa", [2, 0]),
        ("GPU-ffff", []),
        ("MIG-1234,1", [None, 1]),
        ("1,GPU-bbbb2", [1]),  # duplicate by UUID stops
    ],
)
def test_parse_cuda_visible_devices(value: str | None, expected: list[int | None]) -> None:
    assert parse_cuda_visible_devices(value, UUIDS) == expected


def test_torch_index_map_prefers_known_cuda_uuids() -> None:
    assert torch_index_map("2,0", UUIDS) == {2: 0, 0: 1}
    assert torch_index_map("MIG-x,3", UUIDS) == {3: 1}
    # torch's own UUID list wins over the variable (e.g. CUDA ordered fastest first)
    cuda = ["bbbb2222-0000-0000-0000-000000000000", UUIDS[0]]
    assert torch_index_map("0,1", UUIDS, cuda_uuids=cuda) == {1: 0, 0: 1}


def test_values_and_processes() -> None:
    gpus = fleet()
    gpus[0].util_pct = 37.0
    gpus[0].processes = [(ME, 2048.0), (999, 1024.0)]
    gpus[0].power_w = 250.0
    gpus[0].temperature_c = 61.0
    gpus[1].mem_used_mb = 500.0  # memory held without a listed process
    sampler = GpuSampler(FakeNvml(gpus), pid=ME, cuda_visible_devices=None)
    samples, faults = sampler.sample()
    assert faults == ()
    assert [s.index for s in samples] == [0, 1, 2, 3]
    g0, g1 = samples[0], samples[1]
    assert (g0.name, g0.uuid, g0.nvml_index) == ("GPU0", UUIDS[0], 0)
    assert g0.util_pct == 37.0
    assert g0.mem_used_mb == 3072.0 and g0.mem_total_mb == 16384.0
    assert g0.mem_free_mb == 16384.0 - 3072.0
    assert (g0.power_w, g0.temperature_c) == (250.0, 61.0)
    assert [(p.pid, p.is_self) for p in g0.processes] == [(ME, True), (999, False)]
    assert g0.self_mem_mb == 2048.0
    assert g0.external_mem_mb == 1024.0
    assert g0.simulated
    assert g1.processes == () and g1.external_mem_mb == 500.0
    assert g1.power_w is None and g1.temperature_c is None


def test_mutations_between_samples_are_seen() -> None:
    gpus = fleet()[:1]
    sampler = GpuSampler(FakeNvml(gpus), pid=ME, cuda_visible_devices=None)
    assert sampler.sample()[0][0].util_pct == 0.0
    gpus[0].util_pct = 90.0
    gpus[0].processes = [(ME, 4000.0)]
    s = sampler.sample()[0][0]
    assert s.util_pct == 90.0 and s.self_mem_mb == 4000.0 and s.external_mem_mb == 0.0


def test_default_pid_is_this_process() -> None:
    import os

    gpus = fleet()[:1]
    gpus[0].processes = [(os.getpid(), 10.0)]
    s = GpuSampler(FakeNvml(gpus), cuda_visible_devices=None).sample()[0][0]
    assert s.processes[0].is_self


def test_indices_follow_cuda_visible_devices_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    sampler = GpuSampler(FakeNvml(fleet()), pid=ME)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-cccc,1")
    by_nvml = {s.nvml_index: s.index for s in sampler.sample()[0]}
    assert by_nvml == {0: None, 1: 1, 2: None, 3: 0}
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert all(s.index is None for s in sampler.sample()[0])  # still sampled, not visible
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert [s.index for s in sampler.sample()[0]] == [0, 1, 2, 3]


def test_failing_device_is_skipped_and_reported_once(caplog: pytest.LogCaptureFixture) -> None:
    gpus = fleet()
    sampler = GpuSampler(FakeNvml(gpus), pid=ME, cuda_visible_devices="3,2,1,0")
    assert len(sampler.sample()[0]) == 4
    gpus[2].fail = "error"
    caplog.set_level(logging.WARNING)
    for _ in range(3):
        samples, faults = sampler.sample()
        assert [s.nvml_index for s in samples] == [0, 1, 3]
        assert len(faults) == 1
        f = faults[0]
        assert (f.nvml_index, f.index, f.uuid, f.lost) == (2, 1, UUIDS[2], False)
    assert len([r for r in caplog.records if "Cannot read GPU 2" in r.getMessage()]) == 1
    assert sampler.lost == {}
    gpus[2].fail = None
    assert len(sampler.sample()[0]) == 4


def test_lost_device_is_reported_lost() -> None:
    gpus = fleet()
    sampler = GpuSampler(FakeNvml(gpus), pid=ME, cuda_visible_devices=None)
    sampler.sample()
    gpus[1].fail = "lost"
    samples, faults = sampler.sample()
    assert [s.nvml_index for s in samples] == [0, 2, 3]
    assert faults[0].lost and faults[0].nvml_index == 1
    assert sampler.lost == {1: UUIDS[1]}


def test_device_failing_from_the_start_has_no_uuid() -> None:
    gpus = fleet()
    gpus[0].fail = "error"
    samples, faults = GpuSampler(FakeNvml(gpus), pid=ME, cuda_visible_devices=None).sample()
    assert len(samples) == 3
    assert faults[0].uuid == "" and faults[0].index == 0


def test_no_driver_gives_no_samples() -> None:
    sampler = GpuSampler(FakeNvml.no_driver(), pid=ME)
    assert sampler.sample() == ((), ())
    assert sampler.names() == []


def test_names_and_hot_plug() -> None:
    nv = FakeNvml(fleet()[:2])
    sampler = GpuSampler(nv, pid=ME, cuda_visible_devices=None)
    assert sampler.names() == ["GPU0", "GPU1"]
    nv.devices.append(FakeGpu(name="late", uuid="GPU-dddd"))
    samples, _ = sampler.sample()
    assert [s.name for s in samples] == ["GPU0", "GPU1", "late"]
    assert samples[2].index == 2


def test_torch_uuids_set_later_fix_the_index_of_each_sample() -> None:
    # NVML lists GPUs in PCI order; CUDA's default order (fastest first) may differ
    nvml = FakeNvml([FakeGpu("RTX 3090", uuid="GPU-aaa"), FakeGpu("RTX 4090", uuid="GPU-bbb")])
    mon = Monitor(nvml=nvml, cuda_visible_devices=None)
    before = {g.name: g.index for g in mon.sample_now().gpus}
    assert before == {"RTX 3090": 0, "RTX 4090": 1}
    mon.set_cuda_uuids(["bbb", "GPU-AAA"])  # torch: 0 = the 4090, 1 = the 3090
    after = {g.name: g.index for g in mon.sample_now().gpus}
    assert after == {"RTX 3090": 1, "RTX 4090": 0}
