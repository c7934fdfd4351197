"""The benchmark's oracle against brute force: every primary, micro-batch count and
integer split over every subset of devices, on small random fleets (curves, slowdowns,
memory limits, failures, communication costs), and on hand-made cases where leaving a
device out or splitting into micro-batches is what wins."""

from __future__ import annotations

import itertools
import math
import random
from typing import Any

import pytest

from adaptive_nb.bench.oracle import evaluate_layout, oracle_plan
from adaptive_nb.sim.fleet import DeviceState, Fleet
from adaptive_nb.sim.scenario import parse_scenario


def _sizes(batch: int, m: int) -> list[int]:
    base, rem = divmod(batch, m)
    return [base + (1 if j < rem else 0) for j in range(m)]


def brute_force(fleet: Fleet, states: tuple[DeviceState, ...], batch: int) -> float:
    """Fastest noise-free step (seconds) by enumerating everything."""
    n = fleet.n

    def micro(p: int, s: int) -> float:
        best = math.inf
        for split in itertools.product(range(s + 1), repeat=n):
            if sum(split) != s or split[p] == 0:
                continue
            used = [i for i in range(n) if split[i] > 0]
            ok = all(
                not states[i].failed
                and fleet.need_gb(split[i], i == p) <= fleet.available_gb(i, states[i])
                for i in used
            )
            if ok:
                worst = max(fleet.true_ms(i, split[i], i == p, states[i]) for i in used)
                best = min(best, worst + 1000.0 * fleet.comm_s(len(used)))
        return best

    best = math.inf
    for p in range(n):
        for m in range(1, batch + 1):
            best = min(best, sum(micro(p, s) for s in _sizes(batch, m)))
    return best / 1000.0


def random_scenario(rng: random.Random) -> dict[str, Any]:
    n = rng.randint(1, 3)
    devices = []
    for _ in range(n):
        d: dict[str, Any] = {"name": "G", "memory_gb": rng.choice([1.3, 1.6, 2.2, 9.0])}
        if rng.random() < 0.5:
            b, ms, pts = 1.0, rng.uniform(1, 20), []
            for _ in range(rng.randint(2, 4)):
                pts.append([b, ms])
                b += rng.randint(1, 3)
                ms += rng.choice([0.0, rng.uniform(0, 5), rng.uniform(10, 60)])
            d["curve"] = pts
        else:
            d["samples_per_s"] = rng.uniform(50, 2000)
            d["alpha_ms"] = rng.uniform(0, 10)
        devices.append(d)
    events: list[dict[str, Any]] = []
    for _ in range(rng.randint(0, 2)):
        e: dict[str, Any] = {"at_s": 0, "device": rng.randrange(n)}
        kind = rng.random()
        if kind < 0.15:
            e["fail"] = True
        else:
            e["external_util"] = rng.choice([0.0, 0.3, 0.9])
            e["external_mem_gb"] = rng.choice([0.0, 0.2])
            if rng.random() < 0.5:
                e["slowdown"] = rng.uniform(1.0, 3.0)
            if e["external_util"] == 0 and e["external_mem_gb"] == 0 and "slowdown" not in e:
                e["slowdown"] = 2.0
        events.append(e)
    return {
        "name": "random",
        "global_batch": rng.randint(1, 7),
        "steps": 1,
        "devices": devices,
        "job": {"mem_base_gb": 1.0, "mem_per_sample_gb": 0.1},
        "comm": {"alpha_ms": rng.uniform(0, 5), "per_device_ms": rng.choice([0, 2, 30])},
        "primary_extra_ms": rng.choice([0, 3]),
        "primary_extra_gb": rng.choice([0, 0.2]),
        "events": events,
    }


def check(spec: dict[str, Any]) -> float:
    fleet = Fleet(parse_scenario(spec))
    states = tuple(fleet.state(i) for i in range(fleet.n))
    batch = spec["global_batch"]
    expected = brute_force(fleet, states, batch)
    plan = oracle_plan(fleet, states, batch)
    if math.isinf(expected):
        assert plan is None
        return expected
    assert plan is not None
    assert all(sum(chunks) for chunks in plan.layout)
    assert sum(sum(chunks) for chunks in plan.layout) == batch
    assert sorted(map(sum, plan.layout), reverse=True) == _sizes(batch, len(plan.layout))
    assert evaluate_layout(fleet, states, plan.layout, plan.primary) == pytest.approx(plan.step_s)
    assert plan.step_s == pytest.approx(expected, rel=1e-9)
    return expected


@pytest.mark.parametrize("seed", range(60))
def test_matches_brute_force_on_random_small_fleets(seed: int) -> None:
    check(random_scenario(random.Random(seed)))


def _two(**over: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "name": "two",
        "global_batch": 6,
        "steps": 1,
        "devices": [
            {"name": "fast", "memory_gb": 40, "samples_per_s": 1000},
            {"name": "slow", "memory_gb": 40, "samples_per_s": 100},
        ],
        "job": {"mem_base_gb": 1.0, "mem_per_sample_gb": 0.1},
    }
    spec.update(over)
    return spec


def test_leaves_a_device_out_when_communication_costs_more_than_it_gives() -> None:
    spec = _two(comm={"alpha_ms": 1, "per_device_ms": 50})
    assert check(spec) == pytest.approx(0.007)  # 6 ms on the fast GPU + 1 ms, alone
    fleet = Fleet(parse_scenario(spec))
    plan = oracle_plan(fleet, tuple(fleet.state(i) for i in range(2)), 6)
    assert plan is not None and plan.layout == ((6, 0),)


def test_splits_into_micro_batches_when_a_curve_is_superlinear() -> None:
    # 2 samples cost 1 ms, 4 cost 100 ms: two micro-batches of 2 beat one of 4
    dev = {"name": "cliff", "memory_gb": 40, "curve": [[1, 1], [2, 1], [4, 100]]}
    spec = _two(global_batch=4, devices=[dev])
    assert check(spec) == pytest.approx(0.002)


def test_respects_true_memory_and_failures() -> None:
    devices = [
        {"name": "small", "memory_gb": 1.35, "samples_per_s": 1000},  # holds 3 samples
        {"name": "gone", "memory_gb": 40, "samples_per_s": 1000},
    ]
    spec = _two(devices=devices, events=[{"at_s": 0, "device": 1, "fail": True}])
    assert check(spec) == pytest.approx(0.006)  # two micro-batches of 3 on device 0
    fleet = Fleet(parse_scenario(spec))
    plan = oracle_plan(fleet, tuple(fleet.state(i) for i in range(2)), 6)
    assert plan is not None and plan.layout == ((3, 0), (3, 0))


def test_nothing_fits_gives_none() -> None:
    spec = _two(devices=[{"name": "tiny", "memory_gb": 1.05, "samples_per_s": 10}])
    fleet = Fleet(parse_scenario(spec))
    assert oracle_plan(fleet, (fleet.state(0),), 6) is None


def test_sixteen_devices_beat_or_equal_every_simple_plan() -> None:
    """Beyond brute force's reach the method is the same; it must still be at least as
    good as the equal split and as every single device."""
    rng = random.Random(7)
    devices = [
        {"name": f"g{i}", "memory_gb": 24, "samples_per_s": rng.uniform(300, 900), "alpha_ms": 8}
        for i in range(16)
    ]
    spec = _two(global_batch=1024, devices=devices, comm={"alpha_ms": 4, "per_device_ms": 2})
    fleet = Fleet(parse_scenario(spec))
    states = tuple(fleet.state(i) for i in range(16))
    plan = oracle_plan(fleet, states, 1024)
    assert plan is not None
    equal = [_sizes(1024, 16)]
    assert plan.step_s <= evaluate_layout(fleet, states, equal, 0) + 1e-12
    for i in range(16):
        alone = [[1024 if j == i else 0 for j in range(16)]]
        assert plan.step_s <= evaluate_layout(fleet, states, alone, i) + 1e-12
