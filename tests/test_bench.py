"""Benchmark goals on the shipped scenarios (virtual time, deterministic per seed) and the
command line. The adaptive and static runs go through the real training loop
(``adaptive_nb.run.loop.Run``) on the model-free simulated engine; the oracle is exact
(``tests/test_oracle.py``).

Goals (from the simulator-v2 issue): adaptive / oracle >= 0.96 on today's kinds of fleet
(timing on the planner's own alpha + b/speed line, NVML utilisation telling the truth),
>= 0.95 where the truth departs from the planner's model (curves, slowdowns NVML does not
show, forward fractions), >= 0.85 with flapping load or monitor lag; never below static
(within the 2 % this file has always allowed for noise); no failed adaptive run; every
out-of-memory recovered. (They hold because the engine measures backward per device; an
engine that estimated it as 2 x forward would miss two of them: ``--backward-estimate``.)
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from adaptive_nb.bench.__main__ import main
from adaptive_nb.bench.runner import compare
from adaptive_nb.sim.scenario import load_scenario

ROOT = Path(__file__).resolve().parents[1]
SCENARIOS = sorted((ROOT / "benchmarks" / "scenarios").glob("*.json"))
REQUIRED = {
    "homogeneous_idle",
    "mixed_generations",
    "job_lands",
    "flapping",
    "memory_squeeze",
    "device_failure",
    "single_gpu",
    "curves_mixed_generations",
    "time_sliced_cotenant",
    "bandwidth_cotenant",
    "memory_bursts_lag",
    "forward_fraction_mix",
    "sixteen_gpu",
    "everything_eight_gpu",
}
TODAYS_KINDS = 0.96
MODEL_DEPARTS = 0.95
FLAPPING_OR_LAG = 0.85
FLOOR = {
    "homogeneous_idle": TODAYS_KINDS,
    "mixed_generations": TODAYS_KINDS,
    "job_lands": TODAYS_KINDS,
    "memory_squeeze": TODAYS_KINDS,
    "device_failure": TODAYS_KINDS,
    "single_gpu": TODAYS_KINDS,
    "eight_gpu_mixed": TODAYS_KINDS,
    "twelve_gpu_greedy": TODAYS_KINDS,
    "curves_mixed_generations": MODEL_DEPARTS,
    "time_sliced_cotenant": MODEL_DEPARTS,
    "bandwidth_cotenant": MODEL_DEPARTS,
    "forward_fraction_mix": MODEL_DEPARTS,
    "sixteen_gpu": MODEL_DEPARTS,
    "flapping": FLAPPING_OR_LAG,
    "memory_bursts_lag": FLAPPING_OR_LAG,
    "everything_eight_gpu": FLAPPING_OR_LAG,
}

_cache: dict[str, dict[str, Any]] = {}


def result(path: Path) -> dict[str, Any]:
    if path.stem not in _cache:
        _cache[path.stem] = compare(load_scenario(path))
    return _cache[path.stem]


def test_required_scenarios_are_shipped_and_every_one_has_a_goal() -> None:
    stems = {p.stem for p in SCENARIOS}
    assert stems >= REQUIRED
    assert stems <= set(FLOOR), f"give {sorted(stems - set(FLOOR))} a goal class in FLOOR"


@pytest.mark.parametrize("path", SCENARIOS, ids=[p.stem for p in SCENARIOS])
def test_no_failed_adaptive_run_and_every_oom_recovered(path: Path) -> None:
    r = result(path)
    a = r["adaptive"]
    assert not a["failed"], a["reason"]
    assert a["steps"] == load_scenario(path).steps
    assert a["oom"] == a["oom_recovered"]
    assert not r["oracle"]["failed"], r["oracle"]["reason"]
    assert a["prediction_mape_pct"] is not None and a["prediction_mape_pct"] < 10.0


@pytest.mark.parametrize("path", SCENARIOS, ids=[p.stem for p in SCENARIOS])
def test_adaptive_vs_oracle(path: Path) -> None:
    assert result(path)["ratio_vs_oracle"] >= FLOOR[path.stem]


@pytest.mark.parametrize("path", SCENARIOS, ids=[p.stem for p in SCENARIOS])
def test_never_below_static(path: Path) -> None:
    assert result(path)["ratio_vs_static"] >= 0.98


def test_adaptive_beats_static_where_it_should() -> None:
    by = {p.stem: result(p) for p in SCENARIOS if p.stem in REQUIRED}
    assert by["mixed_generations"]["ratio_vs_static"] > 1.3
    assert by["curves_mixed_generations"]["ratio_vs_static"] > 1.3
    assert by["bandwidth_cotenant"]["ratio_vs_static"] > 1.3
    assert by["job_lands"]["ratio_vs_static"] > 1.5
    assert by["memory_squeeze"]["static"]["failed"] and by["device_failure"]["static"]["failed"]
    assert by["memory_squeeze"]["adaptive"]["oom"] >= 1


def test_lagging_monitor_costs_out_of_memory_errors_that_are_recovered() -> None:
    r = result(ROOT / "benchmarks" / "scenarios" / "memory_bursts_lag.json")
    assert r["static"]["failed"] and "out of memory" in r["static"]["reason"]
    assert r["adaptive"]["oom"] >= 1 and r["adaptive"]["oom"] == r["adaptive"]["oom_recovered"]


def test_cli_json_last_line(capsys: pytest.CaptureFixture[str]) -> None:
    path = ROOT / "benchmarks" / "scenarios" / "single_gpu.json"
    assert main([str(path), "--json"]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    rec = json.loads(last)
    assert rec["scenario"] == "single_gpu"
    for policy in ("adaptive", "static", "oracle"):
        assert {"samples_per_s", "failed", "oom"} <= set(rec[policy])
    assert {"ratio_vs_oracle", "ratio_vs_static"} <= set(rec)
    assert rec["oracle"]["method"].startswith("exact")


def test_cli_can_simulate_the_estimated_backward(capsys: pytest.CaptureFixture[str]) -> None:
    path = ROOT / "benchmarks" / "scenarios" / "single_gpu.json"
    assert main([str(path), "--json", "--backward-estimate", "2"]) == 0
    rec = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert rec["engine_backward"] == "estimated as 2 x forward"


def test_cli_markdown_names_the_oracle_method(capsys: pytest.CaptureFixture[str]) -> None:
    path = ROOT / "benchmarks" / "scenarios" / "single_gpu.json"
    assert main([str(path), "--markdown"]) == 0
    out = capsys.readouterr().out
    assert "| single_gpu |" in out and "oracle: exact" in out


def test_cli_rejects_a_bad_scenario(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text('{"name": "x"}')
    proc = subprocess.run(
        [sys.executable, "-m", "adaptive_nb.bench", str(bad)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=False,
    )
    assert proc.returncode == 2 and "global_batch" in proc.stderr
