"""RunReport: JSON round trip, CSV timeline, readable HTML."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from conftest import ce_step

import adaptive_nb
from adaptive_nb import Event, RunInfo, RunReport, TickRecord


def sample_report(simulated: bool = False) -> RunReport:
    info = RunInfo("abc", 10, None, "adaptive", ["GPU 0", "GPU 1"], simulated, 64, 0.0)
    timeline = [
        TickRecord(
            t=float(i),
            step=i * 5,
            samples_per_s=100.0 + i,
            loss=1.0 / (i + 1),
            devices=["GPU 0", "GPU 1"],
            shares={"GPU 0": 0.6, "GPU 1": 0.4},
            util_pct={"GPU 0": 90.0, "GPU 1": 40.0 + i},
            mem_used_mb={"GPU 0": 1000.0, "GPU 1": 800.0},
        )
        for i in range(4)
    ]
    events = [
        Event(0.0, "start", "training on GPU 0, GPU 1", 0),
        Event(2.0, "reallocate", "GPU 1: external job at 60% → share 0.50 → 0.40 <b>", 10),
    ]
    summary: dict[str, Any] = {
        "ended": "completed",
        "steps": 20,
        "samples": 1280,
        "wall_s": 4.0,
        "samples_per_s": 320.0,
        "devices": ["GPU 0", "GPU 1"],
        "reallocations": 1,
        "oom_recovered": 0,
        "prediction_mape_pct": 7.1,
        "utilisation": {"GPU 0": {"mean_pct": 90.0, "peak_pct": 95.0, "peak_mem_mb": 1000.0}},
        "events": [e.to_dict() for e in events],
    }
    return RunReport(info=info, summary=summary, timeline=timeline, events=events)


def test_json_round_trip(tmp_path: Path) -> None:
    report = sample_report()
    path = tmp_path / "r.json"
    report.to_json(path)
    back = RunReport.from_json(path)
    # the loaded report equals the original, not merely the file it was read from
    assert back.summary == report.summary
    assert back.timeline == report.timeline
    assert back.events == report.events
    assert back.info == report.info
    assert json.loads(path.read_text())["summary"]["prediction_mape_pct"] == 7.1
    from_text = RunReport.from_json(report.to_json())
    assert from_text.summary == report.summary and from_text.timeline == report.timeline


def test_csv_has_one_row_per_tick_with_device_columns(tmp_path: Path) -> None:
    path = tmp_path / "t.csv"
    sample_report().to_csv(path)
    rows = list(csv.DictReader(path.open()))
    assert len(rows) == 4
    assert float(rows[2]["util_pct:GPU 1"]) == 42.0
    assert float(rows[0]["shares:GPU 0"]) == 0.6
    assert rows[3]["step"] == "15"


def test_html_is_a_readable_report_not_a_dict_dump() -> None:
    html = sample_report()._repr_html_()
    assert "<table" in html and "Throughput (samples/s)" in html
    assert "7.1 %" in html  # prediction error shown as a percentage
    assert "external job at 60%" in html
    assert "0.40 &lt;b&gt;" in html  # event text is escaped
    assert "<svg" in html  # throughput sparkline
    assert "SIMULATED" not in html
    assert "SIMULATED" in sample_report(simulated=True)._repr_html_()
    assert "(simulated)" in repr(sample_report(simulated=True))


def test_a_real_run_report_exports(tmp_path: Path, tiny: Any) -> None:
    model, opt, data = tiny
    report = adaptive_nb.train(ce_step, model=model, optimizer=opt, data=data, steps=6)
    for key in (
        "steps",
        "samples",
        "wall_s",
        "samples_per_s",
        "devices",
        "reallocations",
        "oom_recovered",
        "events",
        "utilisation",
        "controller_overhead_pct",
    ):
        assert key in report.summary, key
    report.to_csv(tmp_path / "t.csv")
    assert len(list(csv.DictReader((tmp_path / "t.csv").open()))) == len(report.timeline)
    again = RunReport.from_json(report.to_json(tmp_path / "r.json"))
    assert again.summary == report.summary
    assert again.summary["steps"] == 6
    assert again.timeline == report.timeline
    assert again.events == report.events
    assert again.info == report.info
