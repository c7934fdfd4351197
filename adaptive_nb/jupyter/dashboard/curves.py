"""The dashboard's training curves: learning rate and evaluation metrics per optimizer step.

Recorded from what the run already sends: ``Progress.lr`` (a few times a second, so a
live curve samples the schedule) and the ``eval`` events, whose detail carries each
metric to 4 significant digits. When the run ends, both are replaced by the report's
exact series (``RunReport.lr`` has every step's learning rate, ``RunReport.evaluations``
every metric). The x axis is the optimizer step: schedules and evaluations are defined
per step, not per second.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import bqplot as bq
import ipywidgets as widgets
import numpy as np

from .buffers import MultiSeries, Series
from .figures import PALETTE, TraitSync, _figure, _finite_range, _panel, legend_html, nice_ticks

__all__ = ["TrainingCurves"]

LR_COLOUR = PALETTE[4]
EVAL_COLOURS = (PALETTE[5], PALETTE[2], PALETTE[6], PALETTE[7], PALETTE[1])


class TrainingCurves:
    """Recorded lr/eval series (call under the dashboard's lock) and their figure
    (update only from the dashboard's flush)."""

    def __init__(self, sync: TraitSync, max_points: int = 300) -> None:
        self.sync = sync
        self.max_points = max_points
        self.lr = Series(max_points)
        self.evals = MultiSeries(max_points)
        self._last_lr_step = -1
        self._build()

    # -- recording ------------------------------------------------------------------
    def record_lr(self, step: int, lr: float | None) -> None:
        if lr is not None and step > self._last_lr_step:
            self._last_lr_step = step
            self.lr.append(float(step), lr)

    def record_eval(self, step: int, metrics: Mapping[str, float] | None) -> None:
        if metrics:
            self.evals.append(float(step), {str(k): float(v) for k, v in metrics.items()})

    def record_report(self, lr: Sequence[float], evaluations: Sequence[Mapping[str, Any]]) -> None:
        """Replace the live samples by the report's exact per-step series."""
        if lr:
            self.lr = Series(self.max_points)
            for k, value in enumerate(lr, start=1):
                self.lr.append(float(k), value)
            self._last_lr_step = len(lr)
        if evaluations:
            self.evals = MultiSeries(self.max_points)
            for ev in evaluations:
                metrics = {str(k): float(v) for k, v in dict(ev.get("metrics", {})).items()}
                self.evals.append(float(ev.get("step", 0)), metrics)

    def state(self) -> dict[str, Any]:
        ex, eys = self.evals.data()
        return {"lr": self.lr.data(), "evals": (ex, self.evals.names, eys)}

    # -- figure ---------------------------------------------------------------------
    def _build(self) -> None:
        sx, ly, ey = bq.LinearScale(), bq.LinearScale(), bq.LinearScale()
        self.lr_line = bq.Lines(
            x=np.zeros(0),
            y=np.zeros(0),
            colors=[LR_COLOUR],
            labels=["learning rate"],
            stroke_width=2,
            scales={"x": sx, "y": ly},
        )
        self.eval_lines = bq.Lines(
            x=np.zeros(0),
            y=np.zeros((1, 0)),
            colors=[EVAL_COLOURS[0]],
            labels=["eval"],
            stroke_width=2,
            marker="circle",
            marker_size=24,
            scales={"x": sx, "y": ey},
        )
        self.step_axis = bq.Axis(
            scale=sx, label="optimizer step", grid_lines="dashed", label_offset="32px"
        )
        self.lr_axis = bq.Axis(
            scale=ly,
            side="left",
            label="learning rate",
            tick_format="~g",
            label_offset="40px",
            grid_lines="dashed",
            color=LR_COLOUR,
            label_color=LR_COLOUR,
        )
        self.eval_axis = bq.Axis(
            scale=ey, side="right", label="evaluation", tick_format="~g", label_offset="40px"
        )
        self.figure = _figure(
            "Learning rate and evaluation",
            [self.lr_line, self.eval_lines],
            [self.step_axis, self.lr_axis, self.eval_axis],
        )
        self.legend = widgets.HTML(self._legend([]))
        self.panel = _panel(self.figure, self.legend)

    @staticmethod
    def _legend(metrics: Sequence[str]) -> str:
        items = [("learning rate (left)", LR_COLOUR)]
        items += [
            (f"{m} (right)", EVAL_COLOURS[i % len(EVAL_COLOURS)]) for i, m in enumerate(metrics)
        ]
        if not metrics:
            items.append(("evaluation metrics (right, with --eval)", "#d1d5db"))
        return legend_html(items, line=True)

    def _ticks(self, axis: bq.Axis, values: Sequence[float]) -> None:
        ticks = nice_ticks(*_finite_range(values))
        if len(ticks) >= 2:
            self.sync.set(axis, tick_values=np.asarray(ticks, dtype=float))

    def update(self, state: Mapping[str, Any]) -> None:
        lx, ly = state["lr"]
        ex, names, eys = state["evals"]
        xs: list[float] = []
        if len(lx) >= 1 and any(math.isfinite(v) for v in ly):
            self.sync.set(self.lr_line, x=np.asarray(lx, float), y=np.asarray(ly, float))
            self._ticks(self.lr_axis, ly)
            xs += lx
        if ex and names:
            self.sync.set(
                self.eval_lines,
                x=np.asarray(ex, float),
                y=_lines_y(eys, len(ex)),
                labels=list(names),
                colors=[EVAL_COLOURS[i % len(EVAL_COLOURS)] for i in range(len(names))],
            )
            self._ticks(self.eval_axis, [v for ys in eys for v in ys])
            xs += ex
        self.sync.set(self.legend, value=self._legend(names))
        if xs:
            self._ticks(self.step_axis, xs)


def _lines_y(ys: Sequence[Sequence[float]], n: int) -> np.ndarray:
    """One line's y as a vector (bqplot squeezes a 1 x n matrix), several as a matrix."""
    arr = np.asarray(ys, dtype=float).reshape(len(ys), n)
    return arr[0] if len(ys) == 1 else arr
