"""A one-line text progress display (for ``--no-widget`` and scripts): step/total,
samples/s, ETA, loss and learning rate, rewritten in place at most every ``interval_s``
seconds, then decisions and the end as plain lines."""

from __future__ import annotations

import sys
import time
from typing import TYPE_CHECKING, TextIO

from ..events import Event, EventKind, Progress, RunInfo
from .observers import BaseObserver

if TYPE_CHECKING:
    from .report import RunReport

__all__ = ["TextProgress", "format_duration"]

_SHOWN = {
    EventKind.THREADS,
    EventKind.REALLOCATE,
    EventKind.DEVICES,
    EventKind.DEVICE_DROPPED,
    EventKind.DEVICE_READMITTED,
    EventKind.OOM,
    EventKind.MICROBATCH,
    EventKind.POLICY,
    EventKind.PAUSE,
    EventKind.RESUME,
    EventKind.STOP,
    EventKind.EVAL,
    EventKind.NONFINITE,
}


def format_duration(seconds: float | None) -> str:
    """``75.2`` → ``1:15``; ``3725`` → ``1:02:05``; None → ``?``."""
    if seconds is None or seconds != seconds:  # None or NaN
        return "?"
    s = max(0, round(seconds))
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{h}:{m:02d}:{sec:02d}" if h else f"{m}:{sec:02d}"


class TextProgress(BaseObserver):
    """Prints progress to ``stream`` (default: stdout) without flooding it."""

    def __init__(self, stream: TextIO | None = None, interval_s: float = 1.0) -> None:
        self._stream = stream
        self._interval = interval_s
        self._next = 0.0
        self._open_line = False
        self._sim = ""

    @property
    def stream(self) -> TextIO:
        return self._stream if self._stream is not None else sys.stdout

    def _line(self, text: str) -> None:
        if self._open_line:
            self.stream.write("\n")
            self._open_line = False
        self.stream.write(text + "\n")
        self.stream.flush()

    def on_start(self, info: RunInfo) -> None:
        self._sim = " (simulated)" if info.simulated else ""
        total = f"{info.total_steps} steps" if info.total_steps else "steps: unknown total"
        self._line(
            f"adaptive_nb: training on {', '.join(info.devices)}{self._sim}, "
            f"policy {info.policy}, {total}"
        )

    def on_progress(self, progress: Progress) -> None:
        now = time.monotonic()
        if now < self._next:
            return
        self._next = now + self._interval
        total = f"/{progress.total_steps}" if progress.total_steps else ""
        pct = f" {100 * progress.step / progress.total_steps:3.0f}%" if progress.total_steps else ""
        loss = f" · loss {progress.loss:.4g}" if progress.loss is not None else ""
        lr = f" · lr {progress.lr:.3g}" if progress.lr is not None else ""
        state = " · paused" if progress.paused else ""
        eta = f" · ETA {format_duration(progress.eta_s)}" if progress.total_steps else ""
        self.stream.write(
            f"\rstep {progress.step}{total}{pct} · {progress.samples_per_s:,.0f} samples/s"
            f"{self._sim} · elapsed {format_duration(progress.elapsed_s)}{eta}{loss}{lr}{state}   "
        )
        self.stream.flush()
        self._open_line = True

    def on_event(self, event: Event) -> None:
        if event.kind in _SHOWN:
            self._line(f"  [{format_duration(event.t)}] {event.kind}: {event.detail}")

    def on_end(self, report: RunReport) -> None:
        s = report.summary
        self._line(
            f"adaptive_nb: {s.get('ended')} after {s.get('steps')} steps, "
            f"{s.get('samples_per_s', 0):,.0f} samples/s{self._sim} "
            f"(report in the returned RunReport)"
        )
