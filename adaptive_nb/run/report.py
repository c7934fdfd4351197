"""RunReport: the evaluation of one training run (summary, timeline, events), with
exports (JSON, CSV) and a readable HTML rendering for notebooks."""

from __future__ import annotations

import csv
import html
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..events import Event, RunInfo, TickRecord
from .plugins import report_plotter

__all__ = ["RunReport"]


@dataclass
class RunReport:
    """What a run did. ``summary`` holds the headline figures; ``timeline`` one record per
    control tick; ``events`` every decision and incident in order. Per optimizer step:
    ``lr[k]``, the learning rate step ``k + 1`` was applied with, and (with gradient
    clipping) ``grad_norm[k]``, its total gradient norm before clipping (None: not finite,
    the step was skipped); ``evaluations``: ``{"step", "epoch", "metrics"}`` per
    evaluation."""

    info: RunInfo
    summary: dict[str, Any]
    timeline: list[TickRecord] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)
    lr: list[float] = field(default_factory=list)
    grad_norm: list[float | None] = field(default_factory=list)
    evaluations: list[dict[str, Any]] = field(default_factory=list)

    # -- exports ------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "info": dict(self.info.__dict__),
            "summary": self.summary,
            "timeline": [r.to_dict() for r in self.timeline],
            "events": [e.to_dict() for e in self.events],
            "lr": list(self.lr),
            "grad_norm": list(self.grad_norm),
            "evaluations": [dict(e) for e in self.evaluations],
        }

    def to_json(self, path: str | Path | None = None) -> str:
        """Return the report as JSON; also write it to ``path`` when given."""
        text = json.dumps(self.to_dict(), indent=2, default=_json_default)
        if path is not None:
            Path(path).write_text(text, encoding="utf-8")
        return text

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunReport:
        return cls(
            info=RunInfo(**data["info"]),
            summary=dict(data["summary"]),
            timeline=[TickRecord(**r) for r in data.get("timeline", [])],
            events=[Event(**e) for e in data.get("events", [])],
            lr=list(data.get("lr", [])),
            grad_norm=list(data.get("grad_norm", [])),
            evaluations=[dict(e) for e in data.get("evaluations", [])],
        )

    @classmethod
    def from_json(cls, path_or_text: str | Path) -> RunReport:
        """Load a report written by :meth:`to_json` (a path or the JSON text itself)."""
        text = str(path_or_text)
        if not text.lstrip().startswith("{"):
            text = Path(path_or_text).read_text(encoding="utf-8")
        return cls.from_dict(json.loads(text))

    def timeline_rows(self) -> list[dict[str, Any]]:
        """The timeline flattened to one dict per tick (``util_pct[GPU 0]`` → column
        ``util_pct:GPU 0``), as written by :meth:`to_csv`."""
        rows: list[dict[str, Any]] = []
        for rec in self.timeline:
            row: dict[str, Any] = {}
            for key, value in rec.to_dict().items():
                if isinstance(value, dict):
                    for name, v in value.items():
                        row[f"{key}:{name}"] = v
                elif isinstance(value, list):
                    row[key] = "|".join(str(v) for v in value)
                else:
                    row[key] = value
            rows.append(row)
        return rows

    def to_csv(self, path: str | Path) -> None:
        """Write the timeline as CSV (one row per control tick)."""
        rows = self.timeline_rows()
        columns: list[str] = []
        for row in rows:
            columns.extend(k for k in row if k not in columns)
        with open(path, "w", newline="", encoding="utf-8") as fh:
            writer = csv.DictWriter(fh, fieldnames=columns or ["t"])
            writer.writeheader()
            writer.writerows(rows)

    # -- display ------------------------------------------------------------------------
    def plot(self) -> list[Any]:
        """bqplot figures of this report (needs ipywidgets/bqplot, i.e. a notebook); drawn
        by the plotter the notebook front-end registers (:mod:`adaptive_nb.run.plugins`)."""
        return report_plotter()(self)

    def __repr__(self) -> str:
        s = self.summary
        sim = " (simulated)" if self.info.simulated else ""
        return (
            f"RunReport{sim}: {s.get('steps')} steps, {s.get('samples')} samples in "
            f"{_fmt_s(s.get('wall_s'))} ({_fmt_num(s.get('samples_per_s'))} samples/s), "
            f"{s.get('reallocations', 0)} reallocations, "
            f"{s.get('oom_recovered', 0)} OOM recovered, ended: {s.get('ended')}"
        )

    def _repr_html_(self) -> str:
        return render_html(self)


def _json_default(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)


def _fmt_num(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        if abs(value) >= 100:
            return f"{value:,.0f}"
        return f"{value:.3g}"
    return str(value)


def _fmt_s(value: Any) -> str:
    if value is None:
        return "–"
    v = float(value)
    if v < 60:
        return f"{v:.1f} s"
    m, s = divmod(round(v), 60)
    if m < 60:
        return f"{m} min {s:02d} s"
    h, m = divmod(m, 60)
    return f"{h} h {m:02d} min"


_SUMMARY_ROWS: tuple[tuple[str, str], ...] = (
    ("ended", "Ended"),
    ("steps", "Steps"),
    ("samples", "Samples"),
    ("wall_s", "Wall time"),
    ("paused_s", "Paused"),
    ("samples_per_s", "Throughput (samples/s)"),
    ("final_loss", "Final loss"),
    ("lr_final", "Learning rate at the end"),
    ("grad_norm_max", "Largest gradient norm (before clipping)"),
    ("grad_norm_last", "Last gradient norm (before clipping)"),
    ("nonfinite_skipped_steps", "Steps skipped: non-finite gradients"),
    ("amp_skipped_steps", "Steps skipped by the fp16 GradScaler"),
    ("precision", "Precision"),
    ("accumulate", "Batches per optimizer step"),
    ("eval_s", "Evaluation time (not in throughput)"),
    ("resumed_from_step", "Resumed from step"),
    ("last_checkpoint", "Last checkpoint"),
    ("devices", "Devices at the end"),
    ("policy", "Policy"),
    ("reallocations", "Reallocations"),
    ("oom_recovered", "OOM recovered"),
    ("threads", "CPU threads at the end"),
    ("prediction_mape_pct", "Step-time prediction error (MAPE, %)"),
    ("static_samples_per_s_predicted", "Static equal split, predicted (samples/s)"),
    ("speedup_vs_static_predicted", "Speed-up vs static split (predicted)"),
    ("static_split_would_oom_ticks", "Ticks at which the equal split would run out of memory"),
    ("controller_overhead_pct", "adaptive_nb overhead (% of step time)"),
)


def _sparkline(values: list[float], width: int = 320, height: int = 48) -> str:
    pts = [v for v in values if v is not None and math.isfinite(v)]
    if len(pts) < 2:
        return ""
    lo, hi = min(pts), max(pts)
    span = hi - lo or 1.0
    step = width / (len(pts) - 1)
    coords = " ".join(
        f"{i * step:.1f},{height - 4 - (v - lo) / span * (height - 8):.1f}"
        for i, v in enumerate(pts)
    )
    return (
        f'<svg width="{width}" height="{height}" role="img" aria-label="throughput over time">'
        f'<polyline fill="none" stroke="#1f77b4" stroke-width="2" points="{coords}"/></svg>'
        f"<div style='font-size:11px;color:#666'>{len(pts)} control ticks · min "
        f"{_fmt_num(lo)} · max {_fmt_num(hi)} samples/s</div>"
    )


def _evaluations_html(report: RunReport, last: int = 20) -> str:
    """The last evaluations as a table: step, epoch, one column per metric."""
    if not report.evaluations:
        return ""
    shown = report.evaluations[-last:]
    names: list[str] = []
    for ev in shown:
        names.extend(k for k in ev.get("metrics", {}) if k not in names)
    esc = html.escape
    head = "".join(f"<th>{esc(n)}</th>" for n in names)
    body = "".join(
        f"<tr><td>{ev.get('step')}</td><td>{ev.get('epoch')}</td>"
        + "".join(f"<td>{_fmt_num(ev.get('metrics', {}).get(n))}</td>" for n in names)
        + "</tr>"
        for ev in shown
    )
    return (
        f"<h4 style='margin:8px 0 4px'>Evaluations ({len(report.evaluations)})</h4>"
        f"<table><tr><th>step</th><th>epoch</th>{head}</tr>{body}</table>"
    )


def render_html(report: RunReport) -> str:
    """The report as a self-contained HTML block (summary table, utilisation, events)."""
    s = report.summary
    esc = html.escape
    sim_badge = (
        '<span style="background:#b35c00;color:#fff;padding:1px 6px;border-radius:3px;'
        'font-size:11px;margin-left:6px">SIMULATED devices</span>'
        if report.info.simulated
        else ""
    )
    rows = []
    for key, label in _SUMMARY_ROWS:
        if key not in s or s[key] is None:
            continue
        value = s[key]
        skip_zero = ("nonfinite_skipped_steps", "amp_skipped_steps", "eval_s", "resumed_from_step")
        if key in skip_zero and not value:
            continue
        if key in ("precision", "accumulate") and value in ("fp32", 1):
            continue
        if key in ("wall_s", "paused_s", "eval_s"):
            if key == "paused_s" and not value:
                continue
            text = _fmt_s(value)
        elif key == "devices":
            text = ", ".join(str(d) for d in value)
        elif key == "prediction_mape_pct":
            text = f"{float(value):.1f} %"
        elif key == "speedup_vs_static_predicted":
            text = f"{float(value):.2f}×"
        else:
            text = _fmt_num(value)
        rows.append(f"<tr><th style='text-align:left'>{esc(label)}</th><td>{esc(text)}</td></tr>")

    util_rows = []
    for name, stats in (s.get("utilisation") or {}).items():
        util_rows.append(
            f"<tr><td>{esc(str(name))}</td><td>{_fmt_num(stats.get('mean_pct'))}</td>"
            f"<td>{_fmt_num(stats.get('peak_pct'))}</td>"
            f"<td>{_fmt_num(stats.get('peak_mem_mb'))}</td></tr>"
        )
    util_html = (
        "<h4 style='margin:8px 0 4px'>Utilisation</h4><table><tr><th>device</th>"
        "<th>mean %</th><th>peak %</th><th>peak memory (MB)</th></tr>"
        + "".join(util_rows)
        + "</table>"
        if util_rows
        else ""
    )

    spark = _sparkline([r.samples_per_s for r in report.timeline])
    spark_html = (
        f"<h4 style='margin:8px 0 4px'>Throughput over time (samples/s)</h4>{spark}"
        if spark
        else ""
    )

    ev_rows = []
    for ev in report.events[-200:]:
        ev_rows.append(
            f"<tr><td>{ev.t:.1f} s</td><td>{ev.step}</td><td>{esc(ev.kind)}</td>"
            f"<td style='text-align:left'>{esc(ev.detail)}</td></tr>"
        )
    hidden = len(report.events) - len(ev_rows)
    more = f"<p>({hidden} earlier events not shown)</p>" if hidden > 0 else ""
    events_html = (
        "<details open><summary><b>Events</b> "
        f"({len(report.events)})</summary>{more}<table><tr><th>time</th><th>step</th>"
        "<th>kind</th><th style='text-align:left'>detail</th></tr>"
        + "".join(ev_rows)
        + "</table></details>"
    )
    return (
        "<div class='adaptive-nb-report' style='font-family:var(--jp-ui-font-family,sans-serif)'>"
        f"<h3 style='margin:4px 0'>adaptive_nb run report{sim_badge}</h3>"
        f"<table>{''.join(rows)}</table>{util_html}{spark_html}"
        f"{_evaluations_html(report)}{events_html}</div>"
    )
