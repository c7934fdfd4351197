"""bqplot figures of a finished run's report (``RunReport.plot()``)."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import bqplot as bq
import ipywidgets as widgets
import numpy as np

from ...events import EventKind, TickRecord
from .figures import FIG_MARGIN, PALETTE, TITLE_STYLE, device_colours

__all__ = ["report_figures"]


def _records(timeline: Iterable[Any]) -> list[TickRecord]:
    out: list[TickRecord] = []
    for rec in timeline:
        out.append(rec if isinstance(rec, TickRecord) else TickRecord(**rec))
    return out


def _device_order(records: list[TickRecord], field: str) -> list[str]:
    names: list[str] = []
    for rec in records:
        for name in getattr(rec, field):
            if name not in names:
                names.append(name)
    return names


def _figure(title: str, marks: list[bq.Mark], axes: list[bq.Axis]) -> bq.Figure:
    return bq.Figure(
        title=title,
        marks=marks,
        axes=axes,
        fig_margin=dict(FIG_MARGIN),
        title_style=dict(TITLE_STYLE),
        legend_location="top-right",
        legend_style={"stroke-width": 0, "fill": "white", "fill-opacity": 0.7},
        animation_duration=0,
        layout=widgets.Layout(width="100%", height="260px"),
    )


def _column(records: list[TickRecord], field: str, name: str) -> np.ndarray:
    vals = []
    for rec in records:
        v = getattr(rec, field).get(name)
        vals.append(math.nan if v is None else float(v))
    return np.asarray(vals, dtype=float)


def report_figures(report: Any) -> list[bq.Figure]:
    """Three figures: throughput over time (with loss), utilisation per device over
    time, and the allocation timeline (share of the global batch per device, with the
    reallocation events marked)."""
    records = _records(getattr(report, "timeline", []) or [])
    events = list(getattr(report, "events", []) or [])
    t = np.asarray([r.t for r in records], dtype=float)
    sim = " (simulated)" if getattr(getattr(report, "info", None), "simulated", False) else ""

    # throughput and loss
    tx, ty, ly = bq.LinearScale(), bq.LinearScale(min=0.0), bq.LinearScale()
    tput = bq.Lines(
        x=t,
        y=np.asarray([r.samples_per_s for r in records], dtype=float),
        colors=[PALETTE[0]],
        labels=["samples/s"],
        display_legend=True,
        stroke_width=2,
        scales={"x": tx, "y": ty},
    )
    loss_y = np.asarray([math.nan if r.loss is None else r.loss for r in records], dtype=float)
    marks: list[bq.Mark] = [tput]
    axes = [
        bq.Axis(scale=tx, label="time (s)", grid_lines="dashed"),
        bq.Axis(scale=ty, side="left", label="samples/s", color=PALETTE[0]),
    ]
    if np.isfinite(loss_y).any():
        marks.append(
            bq.Lines(
                x=t,
                y=loss_y,
                colors=[PALETTE[3]],
                labels=["loss"],
                display_legend=True,
                scales={"x": tx, "y": ly},
            )
        )
        axes.append(bq.Axis(scale=ly, side="right", label="loss", color=PALETTE[3]))
    throughput = _figure(f"Throughput{sim}", marks, axes)

    # utilisation per device
    util_names = _device_order(records, "util_pct")
    ux, uy = bq.LinearScale(), bq.LinearScale(min=0.0, max=100.0)
    util_marks: list[bq.Mark] = []
    if util_names:
        util_marks.append(
            bq.Lines(
                x=t,
                y=np.vstack([_column(records, "util_pct", n) for n in util_names]),
                labels=util_names,
                colors=device_colours(len(util_names)),
                display_legend=True,
                stroke_width=2,
                scales={"x": ux, "y": uy},
            )
        )
    utilisation = _figure(
        f"Utilisation per device (%){sim}",
        util_marks,
        [
            bq.Axis(scale=ux, label="time (s)", grid_lines="dashed"),
            bq.Axis(scale=uy, side="left"),
        ],
    )

    # allocation timeline: shares per device, step-wise, reallocations marked
    share_names = _device_order(records, "shares")
    ax, ay = bq.LinearScale(), bq.LinearScale(min=0.0, max=1.0)
    alloc_marks: list[bq.Mark] = []
    if share_names:
        alloc_marks.append(
            bq.Lines(
                x=t,
                y=np.vstack([_column(records, "shares", n) for n in share_names]),
                labels=share_names,
                colors=device_colours(len(share_names)),
                display_legend=True,
                interpolation="step-after",
                stroke_width=2,
                scales={"x": ax, "y": ay},
            )
        )
    moves = [
        e
        for e in events
        if e.kind
        in (EventKind.REALLOCATE, EventKind.DEVICES, EventKind.DEVICE_DROPPED, EventKind.OOM)
    ]
    if moves:
        alloc_marks.append(
            bq.Scatter(
                x=np.asarray([e.t for e in moves], dtype=float),
                y=np.full(len(moves), 0.98),
                marker="triangle-down",
                colors=["#374151"],
                default_size=40,
                labels=["reallocation"],
                display_legend=True,
                tooltip=bq.Tooltip(fields=["x"], formats=[".1f"], labels=["t (s)"]),
                scales={"x": ax, "y": ay},
            )
        )
    allocation = _figure(
        f"Allocation timeline: share of the global batch{sim}",
        alloc_marks,
        [
            bq.Axis(scale=ax, label="time (s)", grid_lines="dashed"),
            bq.Axis(scale=ay, side="left"),
        ],
    )
    return [throughput, utilisation, allocation]
