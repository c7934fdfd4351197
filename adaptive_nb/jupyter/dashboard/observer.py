"""The live dashboard: an Observer of a training run (or of the resource monitor).

Observer callbacks run on the training thread. They only record data into bounded
buffers (cheap) and, at most ``update_hz`` times a second, push what changed to the
widgets (one ``hold_sync`` message per changed widget). A timer sends the last pending
update so the display is never more than ``1 / update_hz`` seconds stale, also while the
run is paused. Any error while updating widgets is logged once and disables the
dashboard: training never stops because of it.
"""

from __future__ import annotations

import logging
import math
import re
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import ipywidgets as widgets

from ...events import Event, EventKind, Progress, RunInfo, TickRecord
from ...run.control import RunControl
from ...run.observers import BaseObserver
from . import click_delivery
from .buffers import MultiSeries, Series
from .controls import RunControls
from .curves import TrainingCurves
from .figures import DashboardFigures
from .texts import DashboardText
from .texts import completed as _completed
from .throttle import ThrottledFlush

if TYPE_CHECKING:
    from ...monitor.snapshot import Snapshot
    from ...run.report import RunReport

__all__ = ["Dashboard"]

log = logging.getLogger("adaptive_nb.dashboard")

_POLICY_WORD = re.compile(r"\b(adaptive|weights|static)\b")
_CONTROL_KINDS = {EventKind.PAUSE, EventKind.RESUME, EventKind.STOP}


class Dashboard(ThrottledFlush, DashboardText, BaseObserver):
    """Live plots, progress, event log and controls of one run.

    ``Dashboard(control, device_names, simulated, update_hz=4.0)``: pass it to
    ``train(observers=[dashboard], control=control)`` after displaying it. With
    ``control=None`` it shows no controls and no training plots (monitor-only mode, fed
    by :meth:`on_snapshot`).
    """

    def __init__(
        self,
        control: RunControl | None,
        device_names: Sequence[str],
        simulated: bool,
        update_hz: float = 4.0,
        *,
        max_points: int = 300,
        max_events: int = 200,
        policy: str = "adaptive",
        headroom: float = 0.1,
        title: str = "adaptive_nb",
        clock: Callable[[], float] = time.monotonic,
        use_timer: bool = True,
    ) -> None:
        if update_hz <= 0:
            raise ValueError("update_hz must be positive")
        self.control = control
        self.device_names = list(device_names)
        self.simulated = simulated
        self.update_hz = float(update_hz)
        self.min_interval = 1.0 / self.update_hz
        self.monitor_only = control is None
        self.title = title
        self.disabled = False
        self.flushes = 0
        self.flush_s = 0.0  # seconds spent updating widgets (any thread)
        self._clock = clock
        self._use_timer = use_timer
        self._lock = threading.Lock()  # guards recorded data
        self._flush_lock = threading.Lock()  # one widget update at a time
        self._timer: threading.Timer | None = None
        self._last_flush = -math.inf
        self._dirty = False

        # recorded state (under _lock)
        self._info: RunInfo | None = None
        self._progress: Progress | None = None
        self._tick: TickRecord | None = None
        self._util = MultiSeries(max_points)
        self._tput = Series(max_points)
        self._loss = Series(max_points)
        self._events: deque[tuple[Event, int]] = deque(maxlen=max_events)
        self._events_total = 0
        self._paused = False
        self._ended: str | None = None  # None while running, else how it ended
        self._policy = policy
        self._note = ""
        self._monitor_t0: float | None = None
        self._skipped = 0  # optimizer steps skipped for non-finite gradients
        self._background = False  # the run trains on a thread of its own

        self._build(policy, headroom, max_points)

    # -- layout -------------------------------------------------------------------------
    def _build(self, policy: str, headroom: float, max_points: int) -> None:
        self.header = widgets.HTML(self._header_html())
        self.progress_bar = widgets.FloatProgress(
            value=0.0,
            min=0.0,
            max=1.0,
            bar_style="info",
            layout=widgets.Layout(width="38%", min_width="200px"),
        )
        self.stats = widgets.HTML(self._stats_html())
        self.status = widgets.HTML(self._status_html())
        self.figures = DashboardFigures(self.device_names, show_training=not self.monitor_only)
        self.curves: TrainingCurves | None = None
        if not self.monitor_only:
            self.curves = TrainingCurves(self.figures.sync, max_points)
        self.controls: RunControls | None = None
        if self.control is not None:
            live, why = click_delivery.clicks_during_cell()
            self.controls = RunControls(
                self.control,
                self.device_names,
                policy=policy,
                headroom=headroom,
                note=self.note,
                delivery=click_delivery.DELIVERY_NOTE.format(why=why) if live is False else "",
            )
        self.event_log = widgets.HTML(self._events_html([]))
        log_box = widgets.Box(
            [self.event_log],
            layout=widgets.Layout(
                max_height="170px", overflow="auto", border="1px solid #e5e7eb", padding="2px 6px"
            ),
        )
        grid = widgets.GridBox(
            self.figures.panels() + ([self.curves.panel] if self.curves is not None else []),
            layout=widgets.Layout(grid_template_columns="repeat(2, minmax(300px, 1fr))"),
        )
        progress_row = widgets.HBox(
            [self.progress_bar, self.stats],
            layout=widgets.Layout(align_items="center"),
        )
        children: list[widgets.Widget] = [self.header, progress_row, self.status]
        if self.controls is not None:
            children.append(self.controls.widget)
        children += [grid, widgets.HTML("<b style='font-size:13px'>Events</b>"), log_box]
        self.widget = widgets.VBox(
            children,
            layout=widgets.Layout(
                width="100%", padding="6px 10px", border="1px solid #e5e7eb", margin="2px 0"
            ),
        )
        self.widget.add_class("adaptive-nb-dashboard")

    def _repr_mimebundle_(self, **kwargs: Any) -> Any:
        return self.widget._repr_mimebundle_(**kwargs)

    # -- observer callbacks (training thread) -------------------------------------------
    def on_start(self, info: RunInfo) -> None:
        if self.disabled:
            return
        with self._lock:
            self._info = info
            self._policy = info.policy
            self._background = threading.current_thread() is not threading.main_thread()
            self.simulated = self.simulated or info.simulated
            if info.devices:
                self.device_names = list(info.devices)
        self._request_flush(force=True)

    def on_progress(self, progress: Progress) -> None:
        if self.disabled:
            return
        with self._lock:
            self._progress = progress
            self._paused = progress.paused
            self._tput.append(progress.elapsed_s, progress.samples_per_s)
            self._loss.append(progress.elapsed_s, progress.loss)
            if self.curves is not None:
                self.curves.record_lr(progress.step, progress.lr)
        self._request_flush()

    def on_tick(self, record: TickRecord) -> None:
        if self.disabled:
            return
        with self._lock:
            self._tick = record
            self._util.append(record.t, record.util_pct)
            # ticks and progress share the run clock; ticks add points where progress
            # reports are sparse (simulated fleets run faster than real time)
            if self._progress is None or record.t > self._progress.elapsed_s:
                self._tput.append(record.t, record.samples_per_s)
                self._loss.append(record.t, record.loss)
        self._request_flush()

    def on_event(self, event: Event) -> None:
        if self.disabled:
            return
        with self._lock:
            self._events_total += 1
            if self._events and _same_event(self._events[-1][0], event):
                _first, n = self._events[-1]
                self._events[-1] = (event, n + 1)
            else:
                self._events.append((event, 1))
            if event.kind == EventKind.PAUSE:
                self._paused = True
            elif event.kind in (EventKind.RESUME, EventKind.STOP):
                self._paused = False
            elif event.kind == EventKind.NONFINITE:
                self._skipped += 1
            elif event.kind == EventKind.EVAL and self.curves is not None:
                self.curves.record_eval(event.step, event.metrics)
            elif event.kind == EventKind.POLICY:
                words = _POLICY_WORD.findall(event.detail)
                if words:
                    self._policy = words[-1]
            if event.kind in _CONTROL_KINDS:
                self._note = ""
        self._request_flush()

    def on_end(self, report: RunReport) -> None:
        if self.disabled:
            return
        summary = getattr(report, "summary", {}) or {}
        ended = str(summary.get("ended") or "finished")
        with self._lock:
            self._ended = ended
            self._paused = False
            self._note = ""
            p = self._progress
            if p is not None and isinstance(summary.get("steps"), int):
                self._progress = replace(
                    p,
                    step=summary["steps"],
                    samples=int(summary.get("samples") or p.samples),
                    elapsed_s=float(summary.get("wall_s") or p.elapsed_s),
                    samples_per_s=float(summary.get("samples_per_s") or p.samples_per_s),
                    eta_s=None,
                    loss=summary.get("final_loss", p.loss),
                    paused=False,
                )
            if self.curves is not None:
                self.curves.record_report(
                    getattr(report, "lr", []), getattr(report, "evaluations", [])
                )
            timeline = getattr(report, "timeline", None)
            if timeline and self._tick is None:
                self._tick = timeline[-1]
        self._cancel_timer()
        self._request_flush(force=True)

    # -- monitor-only feed ---------------------------------------------------------------
    def on_snapshot(self, snapshot: Snapshot) -> None:
        """Plot one resource-monitor sample (``%%adaptive_monitor``; any thread)."""
        if self.disabled:
            return
        from ...monitor.report import snapshot_record

        with self._lock:
            if self._monitor_t0 is None:
                self._monitor_t0 = snapshot.t
            record = snapshot_record(snapshot, self._monitor_t0)
            self._tick = record
            self._util.append(record.t, record.util_pct)
            if record.devices and record.devices != self.device_names:
                self.device_names = list(record.devices)
        self._request_flush()

    def finish(self, text: str = "finished") -> None:
        """Mark a monitor-only dashboard as done and send the final state."""
        if self.disabled:
            return
        with self._lock:
            self._ended = text
        self._cancel_timer()
        self._request_flush(force=True)

    # -- requests from control handlers (any thread) -----------------------------------
    def note(self, text: str) -> None:
        """Show a short status note (e.g. "pause requested") at the next update."""
        with self._lock:
            self._note = text
        self._request_flush()

    # -- rendering (holds _flush_lock) ----------------------------------------------------
    def _state(self) -> dict[str, Any]:
        names = list(self.device_names)
        util_names = [n for n in names if n in self._util.names] + [
            n for n in self._util.names if n not in names
        ]
        ux, uys = self._util.data(util_names)
        tx, tys = self._tput.data()
        _, lys = self._loss.data()
        return {
            "info": self._info,
            "progress": self._progress,
            "tick": self._tick,
            "names": names,
            "util": (ux, util_names, uys),
            "tput": (tx, tys, lys),
            "events": list(self._events),
            "events_total": self._events_total,
            "paused": self._paused,
            "ended": self._ended,
            "policy": self._policy,
            "note": self._note,
            "curves": self.curves.state() if self.curves is not None else None,
            "skipped": self._skipped,
            "background": self._background,
        }

    def _render(self, s: dict[str, Any]) -> None:
        sync = self.figures.sync
        sync.set(self.header, value=self._header_html(s["info"], s["policy"]))
        self._render_progress(s["progress"], s["info"], s["ended"], s["skipped"])
        p: Progress | None = s["progress"]
        where = ""
        if p is not None and s["ended"] is not None and not _completed(s["ended"]):
            where = f" at step {p.step:,}" + (f" of {p.total_steps:,}" if p.total_steps else "")
        sync.set(self.status, value=self._status_html(s["paused"], s["ended"], s["note"], where))
        ux, util_names, uys = s["util"]
        if ux:
            self.figures.update_util(ux, util_names, uys)
        tick: TickRecord | None = s["tick"]
        if tick is not None:
            order = s["names"] + [n for n in tick.mem_total_mb if n not in s["names"]]
            self.figures.update_memory(
                order, tick.mem_used_mb, tick.mem_other_mb, tick.mem_total_mb
            )
            if not self.monitor_only:
                self.figures.update_shares(s["names"], tick.shares)
        tx, tys, lys = s["tput"]
        if tx and not self.monitor_only:
            self.figures.update_throughput(tx, tys, lys)
        if self.curves is not None and s["curves"] is not None:
            self.curves.update(s["curves"])
        sync.set(self.event_log, value=self._events_html(s["events"], s["events_total"]))
        if self.controls is not None:
            self.controls.show_state(
                paused=s["paused"], ended=s["ended"] is not None, policy=s["policy"]
            )
            self.controls.show_delivery(background=s["background"])

    def _render_progress(
        self, p: Progress | None, info: RunInfo | None, ended: str | None, skipped: int = 0
    ) -> None:
        sync = self.figures.sync
        total = p.total_steps if p is not None else (info.total_steps if info else None)
        epochs = info.epochs if info is not None else None
        if p is None:
            value, maximum = 0.0, 1.0
        elif total:
            value, maximum = float(min(p.step, total)), float(total)
        elif epochs:  # unknown epoch length: show completed epochs (``epoch`` is 0-based)
            value, maximum = float(max(0, min(p.epoch, epochs))), float(epochs)
        else:
            value, maximum = 0.0, 1.0
        style = "info"
        if ended is not None:
            style = "success" if _completed(ended) else "warning"
            if ended.startswith("error"):
                style = "danger"
            if self.monitor_only or style == "success":
                value = maximum
        elif p is not None and p.paused:
            style = "warning"
        sync.set(self.progress_bar, max=maximum, value=value, bar_style=style)
        sync.set(self.stats, value=self._stats_html(p, info, ended, skipped))


def _same_event(a: Event, b: Event) -> bool:
    return a.kind == b.kind and a.detail == b.detail
