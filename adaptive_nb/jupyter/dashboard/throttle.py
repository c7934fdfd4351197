"""Throttled widget updates of the dashboard (a mixin of :class:`~.observer.Dashboard`).

Observers record data cheaply and call :meth:`ThrottledFlush._request_flush`; at most
``update_hz`` times a second the state is rendered to the widgets. A timer sends the last
pending update so the display is never more than ``1 / update_hz`` seconds stale, also
while the run is paused. Any error while updating widgets is logged once and disables the
dashboard: training never stops because of it.
"""

from __future__ import annotations

import contextlib
import html
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import ipywidgets as widgets

__all__ = ["ThrottledFlush"]

log = logging.getLogger("adaptive_nb.dashboard")


class ThrottledFlush:
    """Flushes ``self._state()`` to ``self._render(state)`` at most every
    ``min_interval`` seconds (one widget update at a time)."""

    disabled: bool
    min_interval: float
    flushes: int
    flush_s: float
    status: widgets.HTML
    _clock: Callable[[], float]
    _use_timer: bool
    _lock: threading.Lock
    _flush_lock: threading.Lock
    _timer: threading.Timer | None
    _last_flush: float
    _dirty: bool
    _ended: str | None

    def _state(self) -> dict[str, Any]:
        raise NotImplementedError

    def _render(self, s: dict[str, Any]) -> None:
        raise NotImplementedError

    # -- throttled flushing --------------------------------------------------------------
    def _request_flush(self, force: bool = False) -> None:
        with self._lock:
            self._dirty = True
        if self.disabled:
            return
        now = self._clock()
        if force or now - self._last_flush >= self.min_interval:
            self._flush(blocking=force)
        else:
            self._arm_timer(self._last_flush + self.min_interval - now)

    def _arm_timer(self, delay: float) -> None:
        if not self._use_timer or self._ended is not None:
            return
        with self._lock:
            if self._timer is not None:
                return
            timer = threading.Timer(max(0.0, delay), self._on_timer)
            timer.daemon = True
            self._timer = timer
        timer.start()

    def _on_timer(self) -> None:
        with self._lock:
            self._timer = None
        if not self.disabled and self._dirty:
            self._request_flush()

    def _cancel_timer(self) -> None:
        with self._lock:
            timer, self._timer = self._timer, None
        if timer is not None:
            timer.cancel()

    def flush(self) -> None:
        """Send the current state to the widgets now (ignores throttling)."""
        self._request_flush(force=True)

    def _flush(self, blocking: bool) -> None:
        if not self._flush_lock.acquire(blocking=blocking):
            self._arm_timer(self.min_interval)
            return
        t0 = time.perf_counter()
        try:
            with self._lock:
                self._dirty = False
                self._last_flush = self._clock()
                state = self._state()
            self._render(state)
            self.flushes += 1
            self.flush_s += time.perf_counter() - t0
        except Exception as exc:  # never let the display stop training
            self._fail(exc)
        finally:
            self._flush_lock.release()

    def _fail(self, exc: BaseException) -> None:
        if self.disabled:
            return
        self.disabled = True
        self._cancel_timer()
        log.warning(
            "adaptive_nb dashboard stopped updating after a display error "
            "(training continues): %s: %s",
            type(exc).__name__,
            exc,
            exc_info=exc,
        )
        with contextlib.suppress(Exception):
            self.status.value = (
                "<span style='color:#b91c1c'>dashboard stopped updating after a display "
                f"error ({html.escape(type(exc).__name__)}); training continues</span>"
            )
