"""What can go wrong with a group of DDP worker processes, in the package's error terms."""

from __future__ import annotations

from ...errors import DeviceFailure

__all__ = ["DDPStartError", "WorkerLost"]


class DDPStartError(RuntimeError):
    """The worker processes could not be started (nothing is left running)."""


class WorkerLost(DeviceFailure):
    """A rank died or can no longer keep in step with the others. Unlike a GPU under
    DataParallel, a rank cannot be dropped without restarting the whole process group:
    the loop must stop cleanly (the model keeps its last completed step)."""
