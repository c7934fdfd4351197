"""The dashboard's bqplot figures and a helper that sends only what changed.

Each ``update_*`` method takes plain Python data (already bounded by the ring buffers)
and sets the marks' traits inside ``hold_sync`` so one figure update is one message per
mark; unchanged values are not sent at all.
"""

from __future__ import annotations

import html
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import bqplot as bq
import ipywidgets as widgets
import numpy as np

__all__ = [
    "PALETTE",
    "DashboardFigures",
    "TraitSync",
    "device_colours",
    "legend_html",
    "nice_ticks",
]

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
FIG_MARGIN = {"top": 38, "bottom": 40, "left": 52, "right": 52}
PCT_TICKS = [0.0, 25.0, 50.0, 75.0, 100.0]
SHARE_TICKS = [0.0, 0.25, 0.5, 0.75, 1.0]
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
    return bq.Axis(scale=scale, label="time (s)", grid_lines="dashed", label_offset="32px")


def nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """About ``n`` round tick values covering ``[lo, hi]`` (1, 2, 2.5 or 5 × 10^k apart)."""
    if not (math.isfinite(lo) and math.isfinite(hi)) or hi <= lo:
        return [lo] if math.isfinite(lo) else []
    raw = (hi - lo) / max(1, n)
    mag = 10.0 ** math.floor(math.log10(raw))
    step = min((m * mag for m in (1.0, 2.0, 2.5, 5.0, 10.0)), key=lambda c: abs(math.log(c / raw)))
    start = math.ceil(lo / step - 1e-9) * step
    ticks = []
    v = start
    while v <= hi + step * 1e-9:
        ticks.append(round(v, 12))
        v += step
    return ticks


_GPU_NAME = re.compile(r"^(?:sim )?(GPU \S+)")


def short_names(names: Sequence[str]) -> list[str]:
    """Axis labels for device names: ``"sim GPU 2 (RTX 3090)"`` → ``"GPU 2"``; other
    names are cut to 14 characters. Falls back to the full names if labels would clash."""
    out = []
    for name in names:
        m = _GPU_NAME.match(name)
        label = m.group(1) if m else name
        out.append(label if len(label) <= 14 else label[:13] + "…")
    return out if len(set(out)) == len(out) else list(names)


def _finite_range(values: Sequence[float]) -> tuple[float, float]:
    arr = np.asarray(values, dtype=float)
    arr = arr[np.isfinite(arr)]
    if arr.size == 0:
        return math.nan, math.nan
    return float(arr.min()), float(arr.max())


def _figure(title: str, marks: list[bq.Mark], axes: list[bq.Axis]) -> bq.Figure:
    return bq.Figure(
        title=title,
        marks=marks,
        axes=axes,
        fig_margin=dict(FIG_MARGIN),
        title_style=dict(TITLE_STYLE),
        padding_y=0.0,
        animation_duration=0,
        layout=widgets.Layout(width="100%", height="240px", min_width="300px"),
        background_style={"fill": "white"},
    )


def legend_html(items: Sequence[tuple[str, str]], *, line: bool = False) -> str:
    """A one-line legend: ``[(label, colour), ...]`` as swatches (short lines for
    ``line=True``)."""
    height = "3px" if line else "10px"
    parts = [
        f"<span style='white-space:nowrap;margin-right:14px'><span style='display:inline-block;"
        f"width:14px;height:{height};background:{c};vertical-align:middle;margin-right:5px;"
        f"border:{'0' if line else '1px solid #d1d5db'}'></span>{html.escape(label)}</span>"
        for label, c in items
    ]
    return f"<div style='font-size:12px;text-align:center;color:#374151'>{''.join(parts)}</div>"


def _panel(figure: bq.Figure, legend: widgets.HTML) -> widgets.VBox:
    return widgets.VBox([figure, legend], layout=widgets.Layout(min_width="300px"))


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
            stroke_width=2,
            scales={"x": ux, "y": uy},
        )
        self.util_time_axis = _time_axis(ux)
        self.util = _figure(
            "Utilisation per device (%)",
            [self.util_lines],
            [
                self.util_time_axis,
                bq.Axis(scale=uy, side="left", tick_values=PCT_TICKS, grid_lines="dashed"),
            ],
        )
        self.util_legend = widgets.HTML(self._device_legend(names))

        # memory: this run / other processes / free, stacked per device
        mx, my = bq.OrdinalScale(), bq.LinearScale(min=0.0)
        self.mem_bars = bq.Bars(
            x=short_names(names),
            y=np.zeros((3, len(names))),
            type="stacked",
            colors=list(MEM_COLOURS),
            labels=list(MEM_LABELS),
            padding=0.35,
            stroke="white",
            scales={"x": mx, "y": my},
            tooltip=bq.Tooltip(fields=["x", "y"], formats=["", ".2f"], labels=["", "GiB"]),
        )
        self.mem_axis = bq.Axis(scale=my, side="left", grid_lines="dashed", tick_format="~g")
        self.memory = _figure(
            "Memory per device (GiB)", [self.mem_bars], [bq.Axis(scale=mx), self.mem_axis]
        )
        self.memory_legend = widgets.HTML(
            legend_html(list(zip(MEM_LABELS, MEM_COLOURS, strict=True)))
        )

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
            stroke_width=2,
            scales={"x": tx, "y": ty},
        )
        self.loss_line = bq.Lines(
            x=np.zeros(0),
            y=np.zeros(0),
            colors=[PALETTE[3]],
            labels=["loss"],
            stroke_width=1.5,
            scales={"x": tx, "y": ly},
        )
        self.tput_time_axis = _time_axis(tx)
        self.tput_axis = bq.Axis(
            scale=ty,
            side="left",
            label="samples/s",
            tick_format="~s",
            label_offset="40px",
            grid_lines="dashed",
            color=PALETTE[0],
            label_color=PALETTE[0],
        )
        self.loss_axis = bq.Axis(
            scale=ly,
            side="right",
            label="loss",
            tick_format="~g",
            label_offset="40px",
            grid_lines="none",
            color=PALETTE[3],
            label_color=PALETTE[3],
        )
        self.throughput = _figure(
            "Throughput and loss",
            [self.tput_line, self.loss_line],
            [
                self.tput_time_axis,
                self.tput_axis,
                self.loss_axis,
            ],
        )
        self.throughput_legend = widgets.HTML(
            legend_html([("samples/s (left)", PALETTE[0]), ("loss (right)", PALETTE[3])], line=True)
        )

        # current share of the global batch per device
        sx, sy = bq.OrdinalScale(), bq.LinearScale(min=0.0, max=1.08)
        self.share_bars = bq.Bars(
            x=short_names(names),
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
                bq.Axis(scale=sy, side="left", tick_values=SHARE_TICKS, grid_lines="dashed"),
            ],
        )
        self.shares_legend = widgets.HTML(self._shares_caption(names))

    def all(self) -> list[bq.Figure]:
        """The figures, in display order."""
        if self.throughput is not None and self.shares is not None:
            return [self.util, self.throughput, self.memory, self.shares]
        return [self.util, self.memory]

    def panels(self) -> list[widgets.VBox]:
        """Each figure with its legend below it, in display order."""
        out = [_panel(self.util, self.util_legend)]
        if self.throughput is not None:
            out.append(_panel(self.throughput, self.throughput_legend))
        out.append(_panel(self.memory, self.memory_legend))
        if self.shares is not None:
            out.append(_panel(self.shares, self.shares_legend))
        return out

    @staticmethod
    def _shares_caption(names: Sequence[str]) -> str:
        return (
            "<div style='font-size:12px;text-align:center;color:#6b7280'>"
            "fraction of each global batch computed on each device</div>"
        )

    @staticmethod
    def _device_legend(names: Sequence[str]) -> str:
        return legend_html(list(zip(names, device_colours(len(names)), strict=True)), line=True)

    # -- updates ------------------------------------------------------------------------
    def _ticks(self, axis: bq.Axis, lo: float, hi: float) -> None:
        ticks = nice_ticks(lo, hi)
        if len(ticks) >= 2:
            self.sync.set(axis, tick_values=_as_array(ticks))

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
        self.sync.set(self.util_legend, value=self._device_legend(names))
        self._ticks(self.util_time_axis, *_finite_range(x))

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
        self.sync.set(self.mem_bars, x=short_names(shown), y=_as_array([run, other, free]))
        top = max(r + o + f for r, o, f in zip(run, other, free, strict=True))
        self._ticks(self.mem_axis, 0.0, top)

    def update_throughput(
        self, x: Sequence[float], samples_per_s: Sequence[float], loss: Sequence[float]
    ) -> None:
        if len(x) < 2 or self.throughput is None:
            return
        self.sync.set(self.tput_line, x=_as_array(x), y=_as_array(samples_per_s))
        self._ticks(self.tput_time_axis, *_finite_range(x))
        self._ticks(self.tput_axis, 0.0, _finite_range(samples_per_s)[1])
        if any(math.isfinite(v) for v in loss):
            self.sync.set(self.loss_line, x=_as_array(x), y=_as_array(loss))
            self._ticks(self.loss_axis, *_finite_range(loss))

    def update_shares(self, names: Sequence[str], shares: Mapping[str, float]) -> None:
        shown = [n for n in names if n in shares] or list(shares)
        if not shown or self.shares is None:
            return
        self.sync.set(
            self.share_bars,
            x=short_names(shown),
            y=_as_array([shares.get(n, 0.0) for n in shown]),
            colors=device_colours(len(shown)),
        )
        self.sync.set(self.shares_legend, value=self._shares_caption(shown))
