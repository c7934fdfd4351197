"""Simulator v2: the scenario schema's new fields (``curve``, ``forward_fraction``,
``slowdown``, ``monitor_lag_s``), their validation (errors name the file, the field path
and the value) and their semantics in the fleet, the engine's reports and the simulated
NVML; determinism per seed; the benchmark through the real loop."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from adaptive_nb.bench.runner import run_oracle, run_policy
from adaptive_nb.errors import DeviceFailure, OutOfMemory, UsageError
from adaptive_nb.events import EventKind
from adaptive_nb.sim import SimSnapshots, SimulatedEngine, load_scenario
from adaptive_nb.sim.fleet import Fleet
from adaptive_nb.sim.scenario import parse_scenario

CURVE = [[8, 20.0], [32, 50.0], [64, 90.0]]


def spec(**over: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "name": "v2",
        "global_batch": 64,
        "steps": 40,
        "seed": 5,
        "noise": 0.0,
        "devices": [
            {"name": "curved", "memory_gb": 16, "curve": CURVE},
            {"name": "linear", "memory_gb": 16, "samples_per_s": 1000, "alpha_ms": 4},
        ],
        "job": {"mem_base_gb": 1.0, "mem_per_sample_gb": 0.1},
        "comm": {"alpha_ms": 2, "per_device_ms": 3},
        "events": [],
    }
    base.update(over)
    return base


def dev(**over: Any) -> dict[str, Any]:
    return {"name": "X", "memory_gb": 16, **over}


def write(tmp_path: Path, data: dict[str, Any]) -> Path:
    p = tmp_path / "scenario.json"
    p.write_text(json.dumps(data))
    return p


# -- validation ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("change", "field", "value"),
    [
        (
            {"devices": [dev(curve=CURVE, samples_per_s=500)]},
            "devices[0].samples_per_s",
            "500",
        ),
        ({"devices": [dev(curve=CURVE, alpha_ms=3)]}, "devices[0].alpha_ms", "3"),
        ({"devices": [dev()]}, "devices[0].samples_per_s", "devices[0].curve"),
        ({"devices": [dev(curve=[[8, 20], [8, 30]])]}, "devices[0].curve[1]", "[8, 30]"),
        (
            {"devices": [dev(curve=[[8, 20], [16, 30], [32, 25]])]},
            "devices[0].curve[2]",
            "[32, 25]",
        ),
        ({"devices": [dev(curve=[[0.5, 20], [8, 30]])]}, "devices[0].curve[0][0]", "0.5"),
        ({"devices": [dev(curve=[[1, 0], [8, 30]])]}, "devices[0].curve[0][1]", "0"),
        ({"devices": [dev(curve=[[1, 10]])]}, "devices[0].curve", "[[1, 10]]"),
        ({"devices": [dev(curve=[[1, 10], [2]])]}, "devices[0].curve[1]", "[2]"),
        (
            {"devices": [dev(samples_per_s=1, forward_fraction=1.0)]},
            "devices[0].forward_fraction",
            "1.0",
        ),
        (
            {"events": [{"at_s": 1, "device": 0, "external_util": 0.5, "slowdown": 0.8}]},
            "events[0].slowdown",
            "0.8",
        ),
        (
            {"events": [{"at_s": 1, "device": 0, "fail": True, "slowdown": 2}]},
            "events[0].slowdown",
            "2",
        ),
        ({"monitor_lag_s": -1}, "monitor_lag_s", "-1"),
        ({"monitor_lag_s": "2s"}, "monitor_lag_s", "'2s'"),
        ({"monitor_lag_s": math.nan}, "monitor_lag_s", "nan"),
    ],
)
def test_errors_name_the_file_the_field_path_and_the_value(
    tmp_path: Path, change: dict[str, Any], field: str, value: str
) -> None:
    path = write(tmp_path, spec(**change))
    with pytest.raises(UsageError) as err:
        load_scenario(path)
    msg = str(err.value)
    assert str(path) in msg and f"`{field}" in msg and value in msg, msg


def test_v2_fields_are_optional_and_parsed() -> None:
    sc = parse_scenario(
        spec(
            monitor_lag_s=2.5,
            events=[{"at_s": 1, "device": 1, "slowdown": 1.5}],  # invisible to NVML
        )
    )
    assert sc.monitor_lag_s == 2.5
    assert sc.devices[0].curve == ((8.0, 20.0), (32.0, 50.0), (64.0, 90.0))
    assert sc.devices[0].samples_per_s is None
    assert sc.devices[1].forward_fraction == pytest.approx(1 / 3)
    assert sc.loads[0].slowdown == 1.5 and sc.loads[0].external_util == 0.0
    old = parse_scenario(spec(devices=[dev(samples_per_s=100)]))
    assert old.monitor_lag_s == 0.0 and old.devices[0].curve is None


# -- curve --------------------------------------------------------------------------------
def test_curve_is_flat_below_the_first_point_linear_between_and_extended_beyond() -> None:
    d = parse_scenario(spec()).devices[0]
    assert d.idle_ms(1) == 20.0 and d.idle_ms(8) == 20.0
    assert d.idle_ms(20) == pytest.approx(35.0)  # halfway from (8, 20) to (32, 50)
    assert d.idle_ms(32) == 50.0 and d.idle_ms(48) == pytest.approx(70.0)
    assert d.idle_ms(64) == 90.0
    assert d.idle_ms(96) == pytest.approx(130.0)  # last segment's slope, 40 ms / 32 samples


def test_step_time_is_the_slowest_device_plus_primary_extra_plus_communication() -> None:
    sc = parse_scenario(spec(primary_extra_ms=7))
    fleet = Fleet(sc)
    out = fleet.run([[20, 44]], 0, ["a", "b"])
    curved = 35.0 + 7.0  # primary
    linear = 4.0 + 44.0
    assert out.wall_s == pytest.approx((max(curved, linear) + 2 + 3) / 1000)
    two = fleet.run([[20, 44], [20, 0]], 0, ["a", "b"])  # a micro-batch costs a full step
    assert two.wall_s == pytest.approx(out.wall_s + (curved + 2) / 1000)


# -- reported utilisation vs true slowdown -------------------------------------------------
def _engine(tmp_path: Path, data: dict[str, Any]) -> tuple[SimulatedEngine, SimSnapshots]:
    engine = SimulatedEngine(load_scenario(write(tmp_path, data)), compute=False)
    return engine, SimSnapshots(engine.fleet, real_host=False)


def test_nvml_reports_the_utilisation_while_we_pay_the_slowdown(tmp_path: Path) -> None:
    events = [
        {"at_s": 0, "device": 1, "external_util": 0.99, "slowdown": 1.25, "external_mem_gb": 2},
        {"at_s": 0, "device": 1, "external_util": 0.5, "external_mem_gb": 1},
    ]
    engine, snaps = _engine(tmp_path, spec(events=events))
    st = engine.fleet.state(1)
    assert st.slowdown == pytest.approx(1.25 * 2.0)  # independent co-tenants multiply
    assert st.util == pytest.approx(1 - 0.01 * 0.5) and st.ext_mem_gb == pytest.approx(3.0)
    snap = snaps.latest()
    assert snap is not None
    g = snap.gpus[1]
    assert g.util_pct == pytest.approx(99.5) and g.external_mem_mb == pytest.approx(3 * 1024)
    out = engine.fleet.run([[0, 1], [0, 0]][:1], 1, ["a", "b"])
    assert out.true_time_s[1] == pytest.approx((4 + 1) * 2.5 / 1000)


def test_without_slowdown_fields_the_multiplier_is_one_over_free_share(tmp_path: Path) -> None:
    events = [
        {"at_s": 0, "device": 1, "external_util": 0.5},
        {"at_s": 0, "device": 1, "external_util": 0.2},
    ]
    engine, _ = _engine(tmp_path, spec(events=events))
    st = engine.fleet.state(1)
    assert st.util == pytest.approx(0.6)
    assert st.slowdown == pytest.approx(1 / (1 - st.util))


# -- forward fraction ------------------------------------------------------------------------
@pytest.mark.parametrize("backward_factor", [2.0, None], ids=["estimated", "measured"])
@pytest.mark.parametrize("fraction", [None, 0.2, 0.5])
def test_engine_reports_what_the_real_engine_measures(
    tmp_path: Path,
    fraction: float | None,
    backward_factor: float | None,
) -> None:
    """Measuring backward (as the real engine does), the simulated engine reports the true
    compute; simulating an engine that estimates backward as F x forward, it reports
    ``forward_fraction · compute · (1 + F)``."""
    d = dev(samples_per_s=1000, alpha_ms=4)
    if fraction is not None:
        d["forward_fraction"] = fraction
    engine, _ = _engine(tmp_path, spec(devices=[d, dev(samples_per_s=1000)], primary_extra_ms=5))
    engine.fleet.backward_factor = backward_factor
    out = engine.simulate_step(64)
    true_compute = 4 + 32  # ms, device 0 (primary) gets 32 of 64
    f = 1 / 3 if fraction is None else fraction
    factor = 1.0 if backward_factor is None else f * (1 + backward_factor)
    assert out.device_time_s[0] == pytest.approx((factor * true_compute + 5) / 1000)
    assert out.wall_s == pytest.approx((true_compute + 5 + 2 + 3) / 1000)
    phases = out.device_phase_s[0]
    assert phases["forward"] == pytest.approx(f * true_compute / 1000)
    assert phases["loss"] == pytest.approx(5 / 1000)
    assert sum(phases.values()) == pytest.approx(out.device_time_s[0])
    if fraction is None:  # the default reproduces the true time, as before v2
        assert out.device_time_s[0] == pytest.approx((true_compute + 5) / 1000)


# -- monitor lag ---------------------------------------------------------------------------
def test_lagging_monitor_shows_the_past_while_the_truth_acts_at_once(tmp_path: Path) -> None:
    events = [
        {"at_s": 1.0, "device": 1, "external_mem_gb": 14},
        {"at_s": 1.5, "device": 0, "fail": True},
    ]
    engine, snaps = _engine(tmp_path, spec(monitor_lag_s=2.0, events=events))
    engine.simulate_step(64)  # at t = 0: fits
    snap = snaps.latest()
    assert snap is not None and snap.gpus[1].self_mem_mb == 0.0  # our step is not seen yet
    engine.fleet.clock.advance(1.2 - engine.clock())
    with pytest.raises(OutOfMemory):  # the burst acts at once ...
        engine.simulate_step(64)
    snap = snaps.latest()
    assert snap is not None and snap.gpus[1].external_mem_mb == 0.0  # ... NVML shows t = 0
    engine.fleet.clock.advance(2.1 - engine.clock())
    snap = snaps.latest()
    assert snap is not None and snap.gpus[1].self_mem_mb > 0  # our first step, 2 s later
    engine.fleet.clock.advance(0.5)  # t = 2.6: the monitor sees t = 0.6
    with pytest.raises(DeviceFailure):
        engine.simulate_step(64)
    snap = snaps.latest()
    assert snap is not None and len(snap.gpus) == 2 and not snap.faults
    engine.fleet.clock.advance(1.0)  # t = 3.6: sees t = 1.6, after the failure and the burst
    snap = snaps.latest()
    assert snap is not None and [g.index for g in snap.gpus] == [1]
    assert snap.gpus[0].external_mem_mb == pytest.approx(14 * 1024)


# -- determinism and the real loop ------------------------------------------------------------
def _lively() -> dict[str, Any]:
    return spec(
        noise=0.03,
        steps=120,
        monitor_lag_s=1.0,
        events=[
            {"at_s": 0.5, "device": 1, "external_util": 0.9, "slowdown": 1.3},
            {"at_s": 1.5, "until_s": 2.5, "device": 0, "external_mem_gb": 14.5},
        ],
    )


def test_deterministic_per_seed() -> None:
    sc = parse_scenario(_lively())
    a, b = run_policy(sc, "adaptive"), run_policy(sc, "adaptive")
    assert a.samples_per_s == b.samples_per_s and a.events == b.events and a.trace == b.trace
    assert run_oracle(sc).samples_per_s == run_oracle(sc).samples_per_s
    other = run_policy(parse_scenario({**_lively(), "seed": 6}), "adaptive")
    assert other.samples_per_s != a.samples_per_s


def test_benchmark_runs_the_real_loop_and_loses_no_batch() -> None:
    sc = parse_scenario(_lively())
    r = run_policy(sc, "adaptive")
    kinds = [e.kind for e in r.events]
    assert kinds[0] == EventKind.START and kinds[-1] == EventKind.END  # the loop's own events
    assert not r.failed and r.ended == "completed" and r.steps == sc.steps
    assert r.oom >= 1 and r.oom == r.oom_recovered
    assert r.trace[-1][1] == sc.steps * sc.global_batch  # every batch exactly once
    assert [n for _, n in r.trace] == [sc.global_batch * (k + 1) for k in range(sc.steps)]
    static = run_policy(sc, "static")
    assert static.failed and "out of memory" in static.reason
    assert static.steps < sc.steps
