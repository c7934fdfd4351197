"""The memory model fits what a step needs (peak *allocated*), keeps the caching
allocator's slack (reserved − allocated) as a separate margin, and a device the
controller stops using is asked to give its cached memory back."""

from __future__ import annotations

import pytest
import torch

from adaptive_nb.errors import DeviceFailure
from adaptive_nb.layout import Plan
from adaptive_nb.monitor.snapshot import GpuProcess, GpuSample, HostSample, Snapshot
from adaptive_nb.plan.allocation import AllocationController
from adaptive_nb.step import StepOutcome

HOST = HostSample(0.0, (), 0.0, 0.0, 0.0, 0.0, 0.0, 1.0)
BATCH = 240
TOTAL_MB = 24000.0


class Engine:
    def __init__(self, n: int, *, release: bool = True) -> None:
        self.n = n
        self.last_batch = BATCH
        self.plans: list[Plan] = []
        self.released: list[int] = []
        if not release:
            self.release_device = None  # type: ignore[assignment]

    def device_names(self) -> list[str]:
        return [f"GPU {i} (test)" for i in range(self.n)]

    def monitor_keys(self) -> list[int | None]:
        return list(range(self.n))

    def apply_plan(self, plan: Plan) -> None:
        self.plans.append(plan)

    def release_device(self, position: int) -> None:
        self.released.append(position)


def alloc_mb(b: float) -> float:
    return 1000.0 + 50.0 * b


def step(
    chunks: dict[int, int],
    *,
    reserved: dict[int, float] | None = None,
    alloc: bool = True,
    speed: float = 500.0,
) -> StepOutcome:
    peak_alloc = {p: alloc_mb(b) for p, b in chunks.items()}
    res = reserved if reserved is not None else {p: m + 1000.0 for p, m in peak_alloc.items()}
    return StepOutcome(
        loss=torch.zeros(()),
        samples=sum(chunks.values()),
        wall_s=0.005 + max(chunks.values()) / speed,
        device_time_s={p: 0.005 + b / speed for p, b in chunks.items()},
        device_batch=dict(chunks),
        peak_mem_mb=dict(res),  # what the engine reports today: peak *reserved*
        peak_alloc_mb=peak_alloc if alloc else {},
        reserved_mb=dict(res) if alloc else {},
    )


def snap(t: float, ext_mb: float, n: int = 2, util: float = 0.0) -> Snapshot:
    gpus = tuple(
        GpuSample(
            index=i,
            nvml_index=i,
            uuid=f"u{i}",
            name="test",
            util_pct=100.0 * util if i == n - 1 else 0.0,
            mem_used_mb=ext_mb,
            mem_free_mb=TOTAL_MB - ext_mb,
            mem_total_mb=TOTAL_MB,
            processes=(GpuProcess(99, ext_mb, False),),
        )
        for i in range(n)
    )
    return Snapshot(t, HOST, gpus)


def test_model_fits_peak_allocated_not_the_sticky_reserved_high_water_mark() -> None:
    ctl = AllocationController(Engine(2))
    high = {0: 0.0, 1: 0.0}
    for k in range(40):  # chunks move around; the cache keeps the largest one's blocks
        b = [120, 60, 90, 40, 110][k % 5]
        chunks = {0: b, 1: BATCH - b}
        for p, c in chunks.items():
            high[p] = max(high[p], alloc_mb(c) + 300.0)
        ctl.observe(step(chunks, reserved=dict(high)))
    assert ctl.memory.per_sample_mb() == pytest.approx(50.0, rel=0.05)
    assert ctl.memory.predict(200, primary=False) == pytest.approx(alloc_mb(200), rel=0.05)
    assert ctl.reserve_margin_mb() == pytest.approx(300.0, abs=1.0)


def test_without_allocator_figures_the_model_falls_back_to_peak_mem() -> None:
    ctl = AllocationController(Engine(2))
    for b in (120, 60, 90, 40, 110) * 6:
        ctl.observe(step({0: b, 1: BATCH - b}, alloc=False))
    assert ctl.memory.predict(100, primary=False) == pytest.approx(alloc_mb(100) + 1000.0, rel=0.05)
    assert ctl.reserve_margin_mb() == 0.0


def test_reserve_slack_is_kept_as_margin_when_capping_chunks() -> None:
    # 8000 MB available, 10 % headroom: 7200 MB. Demand 1000 + 50·b, slack 1000 MB:
    # (7200 − 1000 − 1000) / 50 = 104 samples per device; without the margin 124 would fit
    # the 120 of an equal split in one micro-batch.
    ctl = AllocationController(Engine(2))
    t = 0.0
    for b in (120, 60, 90, 40, 110) * 6:
        ctl.observe(step({0: b, 1: BATCH - b}))
    ctl.tick(t, 30, snap(t, ext_mb=TOTAL_MB - 8000.0))
    assert ctl.reserve_margin_mb() == pytest.approx(1000.0)
    assert ctl.plan.micro_batches == 2
    assert max(max(c) for c in ctl.plan.layout(BATCH)) <= 104


def drive(ctl: AllocationController, t0: float, t1: float, util: float) -> None:
    t = t0
    while t < t1:
        chunks = {p: c for p, c in enumerate(ctl.plan.chunks(BATCH)) if c > 0}
        speeds = {0: 500.0, 1: 500.0, 2: 500.0 * (1.0 - util)}
        o = step(chunks)
        o.device_time_s = {p: 0.005 + b / speeds[p] for p, b in chunks.items()}
        o.wall_s = max(o.device_time_s.values())
        ctl.observe(o)
        t += 0.5
        ctl.tick(t, int(2 * t), snap(t, ext_mb=0.0, n=3, util=util))


def test_a_device_left_out_gives_its_cached_memory_back() -> None:
    eng = Engine(3)
    ctl = AllocationController(eng)
    drive(ctl, 0.0, 4.0, util=0.0)
    assert ctl.plan.devices == (0, 1, 2) and eng.released == []
    drive(ctl, 4.0, 12.0, util=0.99)
    assert 2 not in ctl.plan.devices
    assert eng.released == [2]


def test_a_failed_device_gives_its_cached_memory_back() -> None:
    eng = Engine(3)
    ctl = AllocationController(eng)
    drive(ctl, 0.0, 4.0, util=0.0)
    ctl.on_device_failure(DeviceFailure("gone", device=1), 4.0, 8)
    assert eng.released == [1]


def test_an_engine_without_the_hook_is_fine() -> None:
    eng = Engine(3, release=False)
    ctl = AllocationController(eng)
    drive(ctl, 0.0, 4.0, util=0.0)
    ctl.on_device_failure(DeviceFailure("gone", device=1), 4.0, 8)
    assert 1 not in ctl.plan.devices
