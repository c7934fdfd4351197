"""Thread-safe requests from front-ends to a running training loop.

Widget handlers, ``%adaptive pause`` and the like run on other threads (ipykernel 7
delivers widget messages on a subshell while the cell runs). They only *post* requests
here; the loop applies them at the next step boundary and logs each as an event.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

from ..policies import POLICIES

__all__ = ["ControlRequests", "RunControl"]


@dataclass
class ControlRequests:
    """Requests drained at one step boundary (None / empty: nothing asked)."""

    pause: bool | None = None  # True: pause, False: resume
    stop: bool = False
    policy: str | None = None
    headroom: float | None = None
    device_enabled: dict[int, bool] | None = None  # device position -> include?

    def empty(self) -> bool:
        return (
            self.pause is None
            and not self.stop
            and self.policy is None
            and self.headroom is None
            and not self.device_enabled
        )


class RunControl:
    """Mailbox between any thread and the training loop."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pending = ControlRequests()
        self._wake = threading.Event()
        self._paused = False
        self._stopped = False

    # -- called from any thread -------------------------------------------------------
    def pause(self) -> None:
        with self._lock:
            self._pending.pause = True

    def resume(self) -> None:
        with self._lock:
            self._pending.pause = False
        self._wake.set()

    def stop(self) -> None:
        with self._lock:
            self._pending.stop = True
        self._wake.set()

    def set_policy(self, policy: str) -> None:
        if policy not in POLICIES:
            raise ValueError(f"unknown policy {policy!r}; choose one of {', '.join(POLICIES)}")
        with self._lock:
            self._pending.policy = policy

    def set_headroom(self, headroom: float) -> None:
        if not 0.0 <= headroom < 1.0:
            raise ValueError(f"headroom must be in [0, 1), got {headroom}")
        with self._lock:
            self._pending.headroom = float(headroom)

    def set_device_enabled(self, position: int, enabled: bool) -> None:
        with self._lock:
            if self._pending.device_enabled is None:
                self._pending.device_enabled = {}
            self._pending.device_enabled[int(position)] = bool(enabled)

    @property
    def paused(self) -> bool:
        return self._paused

    @property
    def stopped(self) -> bool:
        return self._stopped

    # -- called by the loop -----------------------------------------------------------
    def take(self) -> ControlRequests:
        """Return and clear pending requests (cheap when there are none)."""
        if self._pending.empty():
            return _EMPTY
        with self._lock:
            pending, self._pending = self._pending, ControlRequests()
        if pending.pause is not None:
            self._paused = pending.pause
        if pending.stop:
            self._stopped = True
            self._paused = False
        return pending

    def wait_while_paused(self, timeout: float = 0.1) -> None:
        """Block the loop (between steps) for up to ``timeout`` seconds while paused."""
        self._wake.wait(timeout)
        self._wake.clear()


_EMPTY = ControlRequests()
