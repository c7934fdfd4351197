"""DistributedDataParallel as an engine: ``W`` rank processes started from the kernel
(:mod:`.launcher`, :mod:`.worker`), each loading its own slice of every global batch
(:mod:`.data`) with the loss scaled so that the gradient is the full-batch gradient under
uneven shares (:mod:`.scaling`), driven step by step by :class:`DDPEngine`."""

from __future__ import annotations

from .data import BatchToken
from .engine import DDPEngine
from .errors import DDPStartError, WorkerLost
from .launcher import WorkerGroup

__all__ = ["BatchToken", "DDPEngine", "DDPStartError", "WorkerGroup", "WorkerLost"]
