"""``benchmarks/plot_sim.py`` renders the benchmark's JSON as an SVG bar chart (a tiny fixed
input here, not the whole benchmark)."""

from __future__ import annotations

import importlib.util
import json
import xml.etree.ElementTree as ET
from pathlib import Path
from types import ModuleType
from typing import Any

import test_bench

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "plot_sim.py"
SVG = "{http://www.w3.org/2000/svg}"


def _plot_sim() -> ModuleType:
    spec = importlib.util.spec_from_file_location("plot_sim", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _record(name: str, adaptive: float, static: float, oracle: float, failed: bool) -> Any:
    return {
        "scenario": name,
        "simulated": True,
        "adaptive": {"samples_per_s": adaptive, "failed": False},
        "static": {"samples_per_s": static, "failed": failed},
        "oracle": {"samples_per_s": oracle, "failed": False},
    }


RECORDS = [
    _record("homogeneous_idle", 1761.6, 1761.6, 1769.6, False),
    _record("eight_gpu_mixed", 3390.2, 2444.3, 3505.2, True),
    _record("not_in_goals", 50.0, 25.0, 100.0, False),
]


def _bars(root: ET.Element, series: str) -> list[ET.Element]:
    return [r for r in root.iter(f"{SVG}rect") if r.get("class") == f"bar {series}"]


def test_one_bar_per_series_per_scenario_as_a_fraction_of_the_oracle(tmp_path: Path) -> None:
    plot = _plot_sim()
    lines = ["homogeneous_idle (simulated): adaptive ..."] + [json.dumps(r) for r in RECORDS]
    records = plot.load_records(lines)  # the human-readable line is skipped
    assert [r["scenario"] for r in records] == [r["scenario"] for r in RECORDS]
    root = ET.fromstring(plot.render_svg(records))
    adaptive, static = _bars(root, "adaptive"), _bars(root, "static")
    assert len(adaptive) == len(static) == len(RECORDS)
    # bar heights are proportional to samples/s / oracle samples/s
    h = [float(b.get("height", "nan")) for b in adaptive]
    assert abs(h[2] / h[0] - 0.5 / (1761.6 / 1769.6)) < 1e-2
    # only the failed static run is hatched and labelled
    assert [b.get("fill") == "url(#hatch)" for b in static] == [False, True, False]
    texts = ["".join(t.itertext()) for t in root.iter(f"{SVG}text")]
    assert texts.count("failed") == 1
    assert any("Simulated" in t for t in texts)
    # a goal line for each scenario that has a goal class, none for the one that has not
    goals = [ln for ln in root.iter(f"{SVG}line") if ln.get("class") == "goal"]
    assert len(goals) == 2


def test_goal_classes_match_the_benchmark_tests() -> None:
    assert _plot_sim().GOALS == test_bench.FLOOR


def test_main_writes_the_svg_from_a_json_file(tmp_path: Path) -> None:
    src = tmp_path / "bench.jsonl"
    src.write_text("\n".join(json.dumps(r) for r in RECORDS) + "\n")
    out = tmp_path / "chart.svg"
    assert _plot_sim().main(["--from-json", str(src), "--out", str(out)]) == 0
    assert len(_bars(ET.parse(out).getroot(), "static")) == len(RECORDS)
