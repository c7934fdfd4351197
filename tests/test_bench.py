"""Benchmark goals on the shipped scenarios (virtual time, deterministic per seed) and the
command line."""

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
}

_cache: dict[str, dict[str, Any]] = {}


def result(path: Path) -> dict[str, Any]:
    if path.stem not in _cache:
        _cache[path.stem] = compare(load_scenario(path))
    return _cache[path.stem]


def test_required_scenarios_are_shipped() -> None:
    assert {p.stem for p in SCENARIOS} >= REQUIRED


@pytest.mark.parametrize("path", SCENARIOS, ids=[p.stem for p in SCENARIOS])
def test_goals(path: Path) -> None:
    r = result(path)
    a = r["adaptive"]
    assert not a["failed"], a["reason"]
    assert a["oom"] == a["oom_recovered"]
    floor = 0.85 if path.stem == "flapping" else 0.95
    assert r["ratio_vs_oracle"] >= floor
    assert r["ratio_vs_static"] >= 0.98
    assert a["prediction_mape_pct"] is not None and a["prediction_mape_pct"] < 10.0


def test_adaptive_beats_static_where_it_should() -> None:
    by = {p.stem: result(p) for p in SCENARIOS if p.stem in REQUIRED}
    assert by["mixed_generations"]["ratio_vs_static"] > 1.3
    assert by["job_lands"]["ratio_vs_static"] > 1.5
    assert by["memory_squeeze"]["static"]["failed"] and by["device_failure"]["static"]["failed"]
    assert by["memory_squeeze"]["adaptive"]["oom"] >= 1


def test_cli_json_last_line(capsys: pytest.CaptureFixture[str]) -> None:
    path = ROOT / "benchmarks" / "scenarios" / "single_gpu.json"
    assert main([str(path), "--json"]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    rec = json.loads(last)
    assert rec["scenario"] == "single_gpu"
    for policy in ("adaptive", "static", "oracle"):
        assert {"samples_per_s", "failed", "oom"} <= set(rec[policy])
    assert {"ratio_vs_oracle", "ratio_vs_static"} <= set(rec)


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
