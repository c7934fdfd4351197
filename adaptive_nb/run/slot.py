"""The active-run slot: one run at a time per process (foreground or background), claimed
atomically, and the most recent run for ``adaptive_nb.last_run()``."""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

from ..errors import UsageError

if TYPE_CHECKING:
    from .loop import Run

__all__ = ["active_run", "busy_message", "claim", "last_run", "release", "set_last"]

_lock = threading.Lock()
_active: Run | None = None
_last: Run | None = None


def active_run() -> Run | None:
    """The run in progress in this process (foreground or background), if any."""
    return _active


def last_run() -> Run | None:
    """The most recent run started in this process (finished or not)."""
    return _last


def set_last(run: Run) -> None:
    global _last
    _last = run


def busy_message(run: Run) -> str:
    return (
        f"another adaptive_nb run ({run.run_id}, step {run.step}) is still running in this "
        "kernel: stop it with `%adaptive stop` (or run.control.stop()) and wait for it to "
        "finish."
    )


def claim(run: Run) -> None:
    """Make ``run`` the active run, atomically; UsageError if another one holds the slot."""
    global _active
    with _lock:
        if _active is not None and _active is not run:
            raise UsageError(busy_message(_active))
        _active = run


def release(run: Run) -> None:
    global _active
    with _lock:
        if _active is run:
            _active = None
