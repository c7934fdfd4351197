"""What can go wrong with a group of DDP worker processes, in the package's error terms."""

from __future__ import annotations

import pickle
from typing import Any

from ...errors import DeviceFailure, LossError

__all__ = ["DDPStartError", "WorkerLost", "remote_error"]


class DDPStartError(RuntimeError):
    """The worker processes could not be started (nothing is left running)."""


class WorkerLost(DeviceFailure):
    """A rank died or can no longer keep in step with the others. Unlike a GPU under
    DataParallel, a rank cannot be dropped without restarting the whole process group:
    the loop must stop cleanly (the model keeps its last completed step)."""


def remote_error(reply: tuple[Any, ...]) -> BaseException:
    """The error a rank reported, as the user's own exception type where it unpickles."""
    _, rank, kind, message, text, blob = reply
    exc: BaseException | None = None
    if blob is not None:
        try:
            exc = pickle.loads(blob)
        except Exception:
            exc = None
    if exc is None:
        exc = LossError(message) if kind == "LossError" else RuntimeError(f"{kind}: {message}")
    if hasattr(exc, "add_note"):
        exc.add_note(f"(raised on DDP rank {rank})\n{text}")
    return exc
