"""Readmission by measurement: a left-out GPU whose NVML utilisation stays at 99 % (time-
slicing with any co-tenant reads ~100 %) gets a small probe share now and then; it comes
back when the probe's measured time says it helps, and stays out, probing less and less
often, when it does not."""

from __future__ import annotations

import re

import pytest
import torch

from adaptive_nb.errors import DeviceFailure, OutOfMemory
from adaptive_nb.events import Event, EventKind
from adaptive_nb.layout import Plan
from adaptive_nb.monitor.snapshot import GpuSample, HostSample, Snapshot
from adaptive_nb.plan.allocation import AllocationController
from adaptive_nb.plan.probe import Readmission, probe_plan
from adaptive_nb.step import StepOutcome

HOST = HostSample(0.0, (), 0.0, 0.0, 0.0, 0.0, 0.0, 1.0)
BATCH = 240
DT = 0.25  # seconds per step
TICK = 2.0  # control interval


class Engine:
    def __init__(self, n: int) -> None:
        self.n = n
        self.last_batch = BATCH
        self.plans: list[Plan] = []

    def device_names(self) -> list[str]:
        return [f"GPU {i} (test)" for i in range(self.n)]

    def monitor_keys(self) -> list[int | None]:
        return list(range(self.n))

    def apply_plan(self, plan: Plan) -> None:
        self.plans.append(plan)


class Fleet:
    """Three GPUs at 500 samples/s; GPU 2's co-tenant slows it by ``slowdown`` while NVML
    reports ``util`` for it. Records how many samples each step gave GPU 2."""

    def __init__(self, ctl: AllocationController) -> None:
        self.ctl = ctl
        self.slowdown = 1.0
        self.util = 0.0
        self.t = 0.0
        self.next_tick = 0.0
        self.gpu2_chunks: list[tuple[float, int]] = []
        self.events: list[Event] = []

    def step(self) -> None:
        layout = self.ctl.plan.layout(BATCH)
        times: dict[int, float] = {}
        sizes: dict[int, int] = {}
        for chunks in layout:
            for i, b in enumerate(chunks):
                if b > 0:
                    slow = self.slowdown if i == 2 else 1.0
                    times[i] = times.get(i, 0.0) + slow * (0.005 + b / 500.0)
                    sizes[i] = sizes.get(i, 0) + b
        self.gpu2_chunks.append((self.t, sizes.get(2, 0)))
        self.ctl.observe(
            StepOutcome(
                loss=torch.zeros(()),
                samples=BATCH,
                wall_s=max(times.values()) + 0.002 * len(times),
                device_time_s=times,
                device_batch=sizes,
                peak_mem_mb={i: 1000.0 + 20.0 * b / len(layout) for i, b in sizes.items()},
                micro_batches=len(layout),
            )
        )
        self.t += DT
        if self.t >= self.next_tick:
            self.next_tick = self.t + TICK
            self.events += self.ctl.tick(self.t, int(self.t / DT), self.snapshot())

    def snapshot(self) -> Snapshot:
        gpus = tuple(
            GpuSample(
                index=i,
                nvml_index=i,
                uuid=f"u{i}",
                name="test",
                util_pct=100.0 * (self.util if i == 2 else 0.0),
                mem_used_mb=0.0,
                mem_free_mb=24000.0,
                mem_total_mb=24000.0,
            )
            for i in range(3)
        )
        return Snapshot(self.t, HOST, gpus)

    def run_until(self, t1: float) -> None:
        while self.t < t1:
            self.step()

    def of(self, kind: str, text: str) -> list[Event]:
        return [e for e in self.events if e.kind == kind and text in e.detail]


def dropped_under_load() -> tuple[Fleet, float]:
    ctl = AllocationController(Engine(3), control_interval=TICK)
    fleet = Fleet(ctl)
    fleet.run_until(4.0)
    assert ctl.plan.devices == (0, 1, 2)
    fleet.slowdown, fleet.util = 100.0, 0.99
    fleet.run_until(14.0)
    left = fleet.of(EventKind.DEVICES, "GPU 2 (test) left out")
    assert left and 2 not in ctl.plan.devices
    return fleet, left[0].t


def test_light_co_tenant_at_99_percent_is_readmitted_by_measurement() -> None:
    fleet, t_drop = dropped_under_load()
    fleet.slowdown = 1.1  # the heavy job left; a light one stays: NVML still reads 99 %
    fleet.run_until(t_drop + 120.0)
    back = [e for e in fleet.events if e.kind == EventKind.DEVICE_READMITTED]
    assert back, fleet.events
    assert back[0].t <= t_drop + 60.0 + 3 * TICK  # first probe after 60 s, decided a tick on
    # the slowdown is measured against the unloaded fit extrapolated to the probe's few
    # samples, so it is near the true 1.1×, far from the 100× NVML's 99 % implies
    found = re.search(r"probe measured (\d+\.\d+)× .*\(NVML: 99% busy\)", back[0].detail)
    assert found and 0.8 <= float(found.group(1)) <= 1.4, back[0].detail
    assert 2 in fleet.ctl.plan.devices
    assert fleet.ctl.plan.chunks(BATCH)[2] >= 60  # a real share, not the probe's few samples
    assert fleet.ctl.summary()["readmission_probes_won"] == 1


def test_probe_that_loses_keeps_the_device_out_and_backs_off() -> None:
    fleet, t_drop = dropped_under_load()
    fleet.run_until(t_drop + 500.0)  # the heavy co-tenant stays
    assert 2 not in fleet.ctl.plan.devices
    assert not [e for e in fleet.events if e.kind == EventKind.DEVICE_READMITTED]
    starts = [e.t for e in fleet.of(EventKind.NOTICE, "GPU 2 (test): probing with")]
    outs = fleet.of(EventKind.NOTICE, "stays out")
    assert len(starts) == 3 and len(outs) == 3  # at +60, +60+120, +180+240 s
    gaps = [b - a for a, b in zip([t_drop, *starts], starts, strict=False)]
    assert gaps[0] == pytest.approx(60.0, abs=TICK + DT)
    assert gaps[1] == pytest.approx(120.0 + TICK, abs=TICK + DT)
    assert gaps[2] == pytest.approx(240.0 + TICK, abs=TICK + DT)
    assert "next probe in 480 s" in outs[-1].detail
    # bounded cost: GPU 2 got a few samples only during the probes' intervals
    probed = [(t, b) for t, b in fleet.gpu2_chunks if t > t_drop + DT and b > 0]
    assert all(b <= 5 for _, b in probed)
    assert len(probed) <= 3 * (TICK / DT + 1)


def test_device_with_idle_nvml_still_comes_back_without_a_probe() -> None:
    fleet, t_drop = dropped_under_load()
    fleet.slowdown, fleet.util = 1.0, 0.0
    fleet.run_until(t_drop + 55.0)
    back = [e for e in fleet.events if e.kind == EventKind.DEVICE_READMITTED]
    assert back and "forecast external load" in back[0].detail
    assert not fleet.of(EventKind.NOTICE, "probing")


def test_a_fault_during_a_probe_restores_the_plan_without_the_device() -> None:
    fleet, t_drop = dropped_under_load()
    ctl = fleet.ctl
    while ctl.readmission.active is None and fleet.t < t_drop + 70.0:
        fleet.step()
    assert ctl.readmission.active == 2 and 2 in ctl.plan.devices
    ctl.on_oom(OutOfMemory("boom", device=2), fleet.t, 999)
    assert ctl.readmission.active is None and 2 not in ctl.plan.devices
    fleet.run_until(fleet.t + 10.0)
    ctl.on_device_failure(DeviceFailure("gone", device=1), fleet.t, 1000)
    assert ctl.plan.devices == (0,)


def test_failed_or_excluded_devices_are_never_probed() -> None:
    fleet, t_drop = dropped_under_load()
    fleet.ctl.set_device_enabled(2, False, fleet.t, 99)
    fleet.run_until(t_drop + 300.0)
    assert not fleet.of(EventKind.NOTICE, "probing")


def test_probe_plan_adds_a_capped_small_chunk() -> None:
    plan = Plan(devices=(0, 1), shares=(0.5, 0.5, 0.0), micro_batches=1, batch=BATCH)
    p = probe_plan(plan, 2, 5)
    assert p.devices == (0, 1, 2) and p.chunks() == [118, 117, 5]
    r = Readmission(3, fraction=0.02, min_samples=2)
    assert r.samples(BATCH, 1) == 5 and r.samples(40, 1) == 2


def test_back_off_doubles_on_lost_probes_and_on_a_drop_after_a_won_one() -> None:
    r = Readmission(2, first=60.0, max_backoff=900.0)
    saved = Plan(devices=(0,), shares=(1.0, 0.0), micro_batches=1, batch=BATCH)
    r.dropped(1, 0.0)
    assert not r.due(1, 59.0) and r.due(1, 60.0)
    r.start(1, 60.0, saved)
    assert r.active == 1 and not r.due(1, 1e9)  # one probe at a time
    assert not r.ready(62.0)  # nothing measured yet
    r.record(5.0)
    r.record(4.0)
    assert r.ready(62.0)
    assert r.finish() == (1, 4.0, saved)  # the first (cold) step left out
    assert r.lost(1, 62.0) == 120.0 and r.due(1, 182.0) and not r.due(1, 181.0)
    r.won(1)  # a later probe let it back in ...
    r.dropped(1, 300.0)  # ... and in use it did not hold its share: back off further
    assert not r.due(1, 539.0) and r.due(1, 540.0)
    for _ in range(10):
        r.lost(1, 0.0)
    assert r.lost(1, 0.0) == 900.0  # capped
    assert r.summary() == {"readmission_probes": 1, "readmission_probes_won": 1}
