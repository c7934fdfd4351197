"""The dashboard's bqplot figures and a helper that sends only what changed.

Each ``update_*`` method takes plain Python data (already bounded by the ring buffers)
and sets the marks' traits inside ``hold_sync`` so one figure update is one message per
mark; unchanged values are not sent at all.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import bqplot as bq
import ipywidgets as widgets
import numpy as np

__all__ = ["PALETTE", "DashboardFigures", "TraitSync", "device_colours"]

PALETTE = (
    "#4c78a8",
    "#f58518",
    "#54a24b",
    "#e45756",
    "#72b7b2",
    "#b279a2",
    "#eeca3b",
    "#9d755d",
)
MEM_COLOURS = ("#4c78a8", "#f58518", "#e5e7eb")  # this run, other processes, free
MEM_LABELS = ("this run", "other processes", "free")
FIG_MARGIN = {"top": 36, "bottom": 36, "left": 56, "right": 56}
TITLE_STYLE = {"font-size": "14px", "font-weight": "600"}


def device_colours(n: int) -> list[str]:
    return [PALETTE[i % len(PALETTE)] for i in range(n)]


class TraitSync:
    """Sets widget traits, skipping values equal to the last ones sent, batching the
    rest of one widget in a single ``hold_sync`` message. Counts messages it causes."""

    def __init__(self) -> None:
        self._last: dict[tuple[int, str], Any] = {}
        self.updates = 0  # widgets updated (≈ comm messages)

    @staticmethod
    def _same(a: Any, b: Any) -> bool:
        if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
            a_arr, b_arr = np.asarray(a), np.asarray(b)
            return a_arr.shape == b_arr.shape and bool(
                np.array_equal(a_arr, b_arr, equal_nan=a_arr.dtype.kind == "f")
            )
        if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
            return True
        return bool(a == b)

    def set(self, widget: widgets.Widget, **values: Any) -> bool:
        changed = {}
        for name, value in values.items():
            key = (id(widget), name)
            if key in self._last and self._same(self._last[key], value):
                continue
            changed[name] = value
        if not changed:
            return False
        if len(changed) == 1:
            ((name, value),) = changed.items()
            setattr(widget, name, value)
        else:
            with widget.hold_sync():
                for name, value in changed.items():
                    setattr(widget, name, value)
        for name, value in changed.items():
            self._last[(id(widget), name)] = value
        self.updates += 1
        return True


def _as_array(values: Sequence[float] | Sequence[Sequence[float]]) -> np.ndarray:
    return np.asarray(values, dtype=float)


def _time_axis(scale: bq.Scale) -> bq.Axis:
    return bq.Axis(scale=scale, label="time (s)", grid_lines="dashed", num_ticks=6)


def _figure(title: str, marks: list[bq.Mark], axes: list[bq.Axis], legend: bool) -> bq.Figure:
    return bq.Figure(
        title=title,
        marks=marks,
        axes=axes,
        fig_margin=dict(FIG_MARGIN),
        title_style=dict(TITLE_STYLE),
        legend_location="top-left",
        legend_style={"stroke-width": 0, "fill": "white", "fill-opacity": 0.7},
        animation_duration=0,
        layout=widgets.Layout(width="100%", height="250px", min_width="300px"),
        background_style={"fill": "white"},
    )


class DashboardFigures:
    """Utilisation, memory, throughput/loss and batch-share figures."""

    def __init__(self, device_names: Sequence[str], *, show_training: bool = True) -> None:
        names = list(device_names) or ["cpu"]
        self.sync = TraitSync()
        self.show_training = show_training

        # utilisation over time, one line per device
        ux, uy = bq.LinearScale(), bq.LinearScale(min=0.0, max=100.0)
        self.util_lines = bq.Lines(
            x=np.zeros(0),
            y=np.zeros((len(names), 0)),
            labels=names,
            colors=device_colours(len(names)),
            display_legend=True,
            stroke_width=2,
            scales={"x": ux, "y": uy},
        )
        self.util = _figure(
            "Utilisation per device (%)",
            [self.util_lines],
            [_time_axis(ux), bq.Axis(scale=uy, side="left", num_ticks=5)],
            legend=True,
        )

        # memory: this run / other processes / free, stacked per device
        mx, my = bq.OrdinalScale(), bq.LinearScale(min=0.0)
        self.mem_bars = bq.Bars(
            x=names,
            y=np.zeros((3, len(names))),
            type="stacked",
            colors=list(MEM_COLOURS),
            labels=list(MEM_LABELS),
            display_legend=True,
            padding=0.35,
            stroke="white",
            scales={"x": mx, "y": my},
            tooltip=bq.Tooltip(fields=["x", "y"], formats=["", ".2f"], labels=["", "GiB"]),
        )
        self.memory = _figure(
            "Memory per device (GiB)",
            [self.mem_bars],
            [
                bq.Axis(scale=mx),
                bq.Axis(scale=my, side="left", num_ticks=5, grid_lines="dashed"),
            ],
            legend=True,
        )
        self.memory.legend_location = "top-right"

        self.throughput: bq.Figure | None = None
        self.shares: bq.Figure | None = None
        if show_training:
            self._build_training(names)

    def _build_training(self, names: list[str]) -> None:
        # throughput (left axis) and loss (right axis) over time
        tx, ty, ly = bq.LinearScale(), bq.LinearScale(min=0.0), bq.LinearScale()
        self.tput_line = bq.Lines(
            x=np.zeros(0),
            y=np.zeros(0),
            colors=[PALETTE[0]],
            labels=["samples/s"],
            display_legend=True,
            stroke_width=2,
            scales={"x": tx, "y": ty},
        )
        self.loss_line = bq.Lines(
            x=np.zeros(0),
            y=np.zeros(0),
            colors=[PALETTE[3]],
            labels=["loss"],
            display_legend=True,
            stroke_width=1.5,
            scales={"x": tx, "y": ly},
        )
        self.throughput = _figure(
            "Throughput and loss",
            [self.tput_line, self.loss_line],
            [
                _time_axis(tx),
                bq.Axis(
                    scale=ty,
                    side="left",
                    label="samples/s",
                    num_ticks=5,
                    color=PALETTE[0],
                    label_color=PALETTE[0],
                ),
                bq.Axis(
                    scale=ly,
                    side="right",
                    label="loss",
                    num_ticks=5,
                    color=PALETTE[3],
                    label_color=PALETTE[3],
                ),
            ],
            legend=True,
        )
        self.throughput.legend_location = "top-right"

        # current share of the global batch per device
        sx, sy = bq.OrdinalScale(), bq.LinearScale(min=0.0, max=1.0)
        self.share_bars = bq.Bars(
            x=names,
            y=np.zeros(len(names)),
            colors=device_colours(len(names)),
            padding=0.35,
            label_display=True,
            label_display_format=".2f",
            scales={"x": sx, "y": sy},
        )
        self.shares = _figure(
            "Share of the global batch",
            [self.share_bars],
            [
                bq.Axis(scale=sx),
                bq.Axis(scale=sy, side="left", num_ticks=5, grid_lines="dashed"),
            ],
            legend=False,
        )

    def all(self) -> list[bq.Figure]:
        if self.throughput is not None and self.shares is not None:
            return [self.util, self.throughput, self.memory, self.shares]
        return [self.util, self.memory]

    # -- updates ------------------------------------------------------------------------
    def update_util(
        self, x: Sequence[float], names: Sequence[str], ys: Sequence[Sequence[float]]
    ) -> None:
        if not names or len(x) < 2:  # a line needs two points (and bqplot squeezes 1×1)
            return
        self.sync.set(
            self.util_lines,
            x=_as_array(x),
            y=_as_array(ys).reshape(len(names), len(x)),
            labels=list(names),
            colors=device_colours(len(names)),
        )

    def update_memory(
        self,
        names: Sequence[str],
        used_mb: Mapping[str, float],
        other_mb: Mapping[str, float],
        total_mb: Mapping[str, float],
    ) -> None:
        shown = [n for n in names if n in total_mb or n in used_mb]
        if not shown:
            return
        gib = 1.0 / 1024.0
        run = [used_mb.get(n, 0.0) * gib for n in shown]
        other = [other_mb.get(n, 0.0) * gib for n in shown]
        free = [
            max(0.0, total_mb.get(n, 0.0) * gib - r - o)
            for n, r, o in zip(shown, run, other, strict=True)
        ]
        self.sync.set(self.mem_bars, x=list(shown), y=_as_array([run, other, free]))

    def update_throughput(
        self, x: Sequence[float], samples_per_s: Sequence[float], loss: Sequence[float]
    ) -> None:
        if len(x) < 2 or self.throughput is None:
            return
        self.sync.set(self.tput_line, x=_as_array(x), y=_as_array(samples_per_s))
        if any(math.isfinite(v) for v in loss):
            self.sync.set(self.loss_line, x=_as_array(x), y=_as_array(loss))

    def update_shares(self, names: Sequence[str], shares: Mapping[str, float]) -> None:
        shown = [n for n in names if n in shares] or list(shares)
        if not shown or self.shares is None:
            return
        self.sync.set(
            self.share_bars,
            x=list(shown),
            y=_as_array([shares.get(n, 0.0) for n in shown]),
            colors=device_colours(len(shown)),
        )
