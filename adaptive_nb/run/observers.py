"""The observer protocol through which front-ends (dashboard, text progress, status files)
follow a run.

Data flows one way: the loop produces records (:mod:`adaptive_nb.events`) and calls
observers; observers never reach into the loop. To steer a run they post requests to
:class:`~adaptive_nb.run.control.RunControl`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from ..events import Event, Progress, RunInfo, TickRecord

if TYPE_CHECKING:
    from .report import RunReport

__all__ = ["BaseObserver", "Observer", "SafeObservers"]

log = logging.getLogger("adaptive_nb")


@runtime_checkable
class Observer(Protocol):
    """Follows a run. Every method is called on the training thread and must be quick;
    an exception raised here is logged once and the observer is detached, never stopping
    training."""

    def on_start(self, info: RunInfo) -> None: ...

    def on_progress(self, progress: Progress) -> None: ...

    def on_tick(self, record: TickRecord) -> None: ...

    def on_event(self, event: Event) -> None: ...

    def on_end(self, report: RunReport) -> None: ...


class BaseObserver:
    """An observer that ignores everything; subclass and override what you need."""

    def on_start(self, info: RunInfo) -> None:
        pass

    def on_progress(self, progress: Progress) -> None:
        pass

    def on_tick(self, record: TickRecord) -> None:
        pass

    def on_event(self, event: Event) -> None:
        pass

    def on_end(self, report: RunReport) -> None:
        pass


class SafeObservers:
    """Calls observers; one that raises is logged once and detached."""

    def __init__(self, observers: Sequence[Observer], on_fail: Callable[[str], None]) -> None:
        self._observers = list(observers)
        self._on_fail = on_fail

    def call(self, method: str, arg: Any) -> None:
        for obs in list(self._observers):
            try:
                getattr(obs, method)(arg)
            except Exception as exc:
                self._observers.remove(obs)
                name = type(obs).__name__
                log.warning("adaptive_nb: %s failed in %s (%s); detached.", name, method, exc)
                self._on_fail(f"{name} detached after an error: {exc}")

    def __bool__(self) -> bool:
        return bool(self._observers)
