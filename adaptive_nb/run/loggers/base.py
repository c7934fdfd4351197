"""What every logger records, and the guard that keeps a failing logger from stopping a run.

A logger is an observer (ticks, events, start, end) *and* a callback (``on_step_end`` for
the loss and learning rate of every committed step, ``on_eval`` for the exact metrics):
progress reports are throttled, callbacks are not, and they run once per applied step,
never for a retried attempt. Subclasses only say how to write scalars, text and
parameters; names and values are decided here, so TensorBoard, MLflow and CSV hold the
same series.
"""

from __future__ import annotations

import logging
import math
import re
from typing import TYPE_CHECKING, Any

from ...events import Event, RunInfo, TickRecord
from ..observers import BaseObserver

if TYPE_CHECKING:
    from ..history import TrainingHistory
    from ..report import RunReport

__all__ = ["MetricLogger", "metric_name"]

log = logging.getLogger("adaptive_nb")

_UNSAFE = re.compile(r"[^A-Za-z0-9_\-. /]")


def metric_name(*parts: str) -> str:
    """``metric_name("share", "GPU 0 (A100)")`` → ``"share/GPU 0 _A100_"``: the characters
    MLflow accepts in metric names, the same name in every backend."""
    return "/".join(_UNSAFE.sub("_", p) for p in parts)


class MetricLogger(BaseObserver):
    """Turns a run's records into named scalars per step; subclasses write them.

    Any exception while writing is logged once; the logger then closes and ignores the
    rest of the run (training goes on)."""

    kind = "logger"

    def __init__(self) -> None:
        self.dead = False
        self._step = 0

    # -- what subclasses implement --------------------------------------------------
    def open(self, info: RunInfo) -> None:
        """Create the writer (first call: nothing is created before the run starts)."""

    def scalars(self, step: int, values: dict[str, float]) -> None:
        raise NotImplementedError

    def text(self, step: int, tag: str, text: str) -> None:
        raise NotImplementedError

    def flush(self) -> None:
        """Make what was written so far visible to readers."""

    def close(self, ended: str | None) -> None:
        """Flush and release the writer; ``ended`` is how the run ended (None: failed)."""

    # -- the guard ------------------------------------------------------------------
    def _safely(self, fn: Any, *args: Any) -> None:
        if self.dead:
            return
        try:
            fn(*args)
        except Exception as exc:
            self.dead = True
            log.warning(
                "adaptive_nb: %s logging failed (%s: %s); it stops, training continues.",
                self.kind,
                type(exc).__name__,
                exc,
            )
            try:
                self.close(None)
            except Exception as close_exc:  # already failing: keep the first error
                log.debug("closing the %s logger failed too: %s", self.kind, close_exc)

    # -- observer hooks ---------------------------------------------------------------
    def on_start(self, info: RunInfo) -> None:
        self._safely(self.open, info)

    def on_tick(self, record: TickRecord) -> None:
        self._safely(self._tick, record)

    def on_event(self, event: Event) -> None:
        self._safely(self._event, event)

    def on_end(self, report: RunReport) -> None:
        self._safely(self.close, str(report.summary.get("ended") or "finished"))

    # -- callback hooks ---------------------------------------------------------------
    def on_step_end(self, step: int, loss: float | None, history: TrainingHistory) -> None:
        self._safely(self._step_end, step, loss, history)

    def on_eval(self, metrics: dict[str, float]) -> None:
        self._safely(self._eval, metrics)

    # -- records → scalars --------------------------------------------------------------
    def _step_end(self, step: int, loss: float | None, history: TrainingHistory) -> None:
        self._step = step
        values: dict[str, float] = {}
        if loss is not None:
            values["loss"] = float(loss)
        if history.lr:
            values["lr"] = float(history.lr[-1])
            if len(history.grad_norm) == len(history.lr) and history.grad_norm[-1] is not None:
                values["grad_norm"] = float(history.grad_norm[-1])
        if values:
            self.scalars(step, values)

    def _eval(self, metrics: dict[str, float]) -> None:
        values = {metric_name("eval", str(k)): float(v) for k, v in metrics.items()}
        if values:
            self.scalars(self._step, values)

    def _tick(self, record: TickRecord) -> None:
        values: dict[str, float] = {"samples_per_s": float(record.samples_per_s)}
        for family in ("shares", "util_pct", "mem_used_mb", "mem_other_mb"):
            per_device: dict[str, float] = getattr(record, family)
            prefix = "share" if family == "shares" else family
            for device, value in per_device.items():
                values[metric_name(prefix, device)] = float(value)
        if record.threads is not None:
            values["threads"] = float(record.threads)
        if record.predicted_step_s is not None:
            values["step_s/predicted"] = float(record.predicted_step_s)
        if record.measured_step_s is not None:
            values["step_s/measured"] = float(record.measured_step_s)
        finite = {k: v for k, v in values.items() if math.isfinite(v)}
        self.scalars(record.step, finite)
        self.flush()

    def _event(self, event: Event) -> None:
        self._step = max(self._step, event.step)
        self.text(event.step, "events", f"{event.kind}: {event.detail}")
