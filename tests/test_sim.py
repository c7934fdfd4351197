"""Simulated fleet: scenario validation, determinism, failures, OOM recovery with real
compute (same parameters as a clean run), simulated NVML, labels."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import adaptive_nb
from adaptive_nb.bench.runner import run_policy
from adaptive_nb.errors import UsageError
from adaptive_nb.events import EventKind
from adaptive_nb.sim import SimSnapshots, SimulatedEngine, build_sim_run, load_scenario
from adaptive_nb.sim.scenario import parse_scenario

SCENARIOS = Path(__file__).resolve().parents[1] / "benchmarks" / "scenarios"


def scenario(**over: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "name": "two",
        "global_batch": 64,
        "steps": 50,
        "seed": 3,
        "noise": 0.02,
        "devices": [
            {"name": "RTX 3090", "memory_gb": 16, "samples_per_s": 500, "alpha_ms": 5},
            {"name": "V100 16GB", "memory_gb": 16, "samples_per_s": 350, "alpha_ms": 5},
        ],
        "job": {"mem_base_gb": 1.0, "mem_per_sample_gb": 0.1},
        "comm": {"alpha_ms": 2, "per_device_ms": 3},
        "events": [],
    }
    base.update(over)
    return base


def write(tmp_path: Path, data: dict[str, Any], name: str = "s.json") -> Path:
    p = tmp_path / name
    p.write_text(json.dumps(data))
    return p


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"global_batch": 0}, "global_batch"),
        ({"global_batch": 1.5}, "global_batch"),
        ({"noise": 0.9}, "noise"),
        ({"devices": []}, "devices"),
        ({"devices": [{"name": "X", "memory_gb": -1, "samples_per_s": 1}]}, "devices[0].memory_gb"),
        (
            {"devices": [{"name": "X", "memory_gb": 8, "samples_per_s": "fast"}]},
            "devices[0].samples_per_s",
        ),
        (
            {"devices": [{"name": "X", "memory_gb": 8, "samples_per_s": 1, "speed": 2}]},
            "devices[0].speed",
        ),
        ({"job": {"mem_base_gb": 1}}, "job.mem_per_sample_gb"),
        ({"events": [{"at_s": 1, "device": 5, "fail": True}]}, "events[0].device"),
        (
            {"events": [{"at_s": 5, "until_s": 2, "device": 0, "external_util": 0.5}]},
            "events[0].until_s",
        ),
        ({"events": [{"at_s": 1, "device": 0, "external_util": 1.0}]}, "events[0].external_util"),
        ({"events": [{"at_s": 1, "device": 0}]}, "events[0]"),
        ({"colour": "red"}, "scenario.colour"),
    ],
)
def test_validation_names_the_bad_field_and_the_path(
    tmp_path: Path, change: dict[str, Any], field: str
) -> None:
    path = write(tmp_path, scenario(**change))
    with pytest.raises(UsageError) as err:
        load_scenario(path)
    assert f"`{field}" in str(err.value) and str(path) in str(err.value)


def test_missing_file_and_bad_json(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="not found"):
        load_scenario(tmp_path / "nope.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{ nope")
    with pytest.raises(UsageError, match="not valid JSON"):
        load_scenario(bad)


def test_train_rejects_a_bad_scenario_before_running(tmp_path: Path) -> None:
    path = write(tmp_path, scenario(steps=-1))
    model = nn.Linear(2, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    calls = []

    def step(m: nn.Module, b: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        return m(b).mean()

    with pytest.raises(UsageError, match="steps"):
        adaptive_nb.train(
            step, model=model, optimizer=opt, data=[torch.randn(4, 2)], devices=f"sim:{path}"
        )
    assert not calls


def test_shipped_scenarios_load() -> None:
    paths = sorted(SCENARIOS.glob("*.json"))
    assert len(paths) >= 7
    for p in paths:
        assert load_scenario(p).name == p.stem


def test_deterministic_per_seed() -> None:
    sc = parse_scenario(scenario(events=[{"at_s": 3, "device": 1, "external_util": 0.5}]))
    a = run_policy(sc, "adaptive")
    b = run_policy(sc, "adaptive")
    assert a.samples_per_s == b.samples_per_s and a.events == b.events
    other = run_policy(parse_scenario({**scenario(), "seed": 4}), "adaptive")
    assert other.samples_per_s != a.samples_per_s


def test_device_failure_mid_run() -> None:
    sc = load_scenario(SCENARIOS / "device_failure.json")
    adaptive = run_policy(sc, "adaptive")
    assert not adaptive.failed and adaptive.steps == sc.steps
    dropped = [e for e in adaptive.events if e.kind == EventKind.DEVICE_DROPPED]
    assert len(dropped) == 1 and "sim GPU 2" in dropped[0].detail and dropped[0].t >= 40.0
    static = run_policy(sc, "static")
    assert static.failed and "failure" in static.reason


def test_simulated_oom_is_recovered() -> None:
    sc = load_scenario(SCENARIOS / "memory_squeeze.json")
    r = run_policy(sc, "adaptive")
    assert not r.failed and r.steps == sc.steps
    assert r.oom >= 1 and r.oom_recovered == r.oom
    kinds = [e.kind for e in r.events]
    assert EventKind.OOM in kinds and EventKind.MICROBATCH in kinds


def _train(path: Path, steps: int = 6) -> tuple[nn.Module, Any]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    g = torch.Generator().manual_seed(1)
    data = [
        (
            torch.randn(64, 5, generator=g, dtype=torch.float64),
            torch.randint(0, 3, (64,), generator=g),
        )
        for _ in range(steps)
    ]

    def step(m: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(m(x), y)

    report = adaptive_nb.train(
        step, model=model, optimizer=opt, data=data, devices=f"sim:{path}", control_interval=0.05
    )
    return model, report


def test_oom_retry_gives_the_same_parameters_as_a_clean_run(tmp_path: Path) -> None:
    roomy = write(tmp_path, scenario(), "roomy.json")
    small = [
        {"name": "tiny A", "memory_gb": 4, "samples_per_s": 500, "alpha_ms": 5},
        {"name": "tiny B", "memory_gb": 4, "samples_per_s": 350, "alpha_ms": 5},
    ]
    tight = write(tmp_path, scenario(devices=small), "tight.json")  # 32 samples need 4.2 GB
    clean, clean_report = _train(roomy)
    recovered, report = _train(tight)
    assert clean_report.summary["oom_recovered"] == 0
    assert report.summary["oom_recovered"] >= 1
    assert report.summary["micro_batches"] >= 2  # 64 samples cannot fit 2 × 4 GB at once
    assert report.summary["steps"] == 6
    for a, b in zip(recovered.parameters(), clean.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    oom_events = [e for e in report.events if e.kind == EventKind.OOM]
    assert oom_events and "retrying the same batch" in oom_events[0].detail


def test_everything_says_simulated(tmp_path: Path) -> None:
    path = write(tmp_path, scenario())
    _, report = _train(path, steps=3)
    assert report.summary["simulated"] is True
    assert report.info.simulated is True
    assert all(d.startswith("sim GPU") for d in report.info.devices)
    assert report.info.devices[0] == "sim GPU 0 (RTX 3090)"


def test_build_sim_run_and_nvml_view(tmp_path: Path) -> None:
    data = scenario(
        events=[
            {"at_s": 0, "device": 1, "external_util": 0.5, "external_mem_gb": 3},
            {"at_s": 0.5, "device": 0, "fail": True},
        ]
    )
    engine, _controller, snaps = build_sim_run(
        write(tmp_path, data), policy="adaptive", headroom=0.1, control_interval=2.0
    )
    assert isinstance(engine, SimulatedEngine) and isinstance(snaps, SimSnapshots)
    assert engine.simulated and engine.clock() == 0.0
    snap = snaps.latest()
    assert snap is not None and len(snap.gpus) == 2
    g1 = snap.gpus[1]
    assert g1.simulated and "simulated" in g1.name
    assert g1.util_pct == pytest.approx(50.0)
    assert g1.external_mem_mb == pytest.approx(3 * 1024.0)
    engine.prepare(nn.Linear(2, 1))
    out = engine.simulate_step(64)
    assert out.wall_s > 0 and engine.clock() == pytest.approx(out.wall_s)
    engine.fleet.clock.advance(1.0)
    snap = snaps.latest()
    assert snap is not None and [g.index for g in snap.gpus] == [1]
    assert snap.faults and snap.faults[0].lost
