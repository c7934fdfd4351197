"""Errors adaptive_nb raises: the user's mistakes, and the device faults a step can hit.

Core code raises :class:`UsageError` before anything runs; the Jupyter front-end shows it
as a short message without a traceback. :class:`OutOfMemory` and :class:`DeviceFailure`
travel from an engine to the run loop, which re-plans and retries the same batch.
"""

from __future__ import annotations

import re

__all__ = ["DeviceFailure", "LossError", "OutOfMemory", "UsageError", "is_oom"]

_OOM_MESSAGE = re.compile(r"out of memory|CUBLAS_STATUS_ALLOC_FAILED")


class UsageError(ValueError):
    """The user asked for something adaptive_nb cannot do; nothing was changed."""


class LossError(UsageError):
    """The step body produced no usable loss; the step was not applied."""


class OutOfMemory(RuntimeError):
    """A device ran out of memory during a step; nothing was applied, the batch is retried.

    ``device`` is the engine's device position (index into ``Engine.device_names()``),
    or None when unknown."""

    def __init__(self, message: str, device: int | None = None) -> None:
        super().__init__(message)
        self.device = device


class DeviceFailure(RuntimeError):
    """A device errored (not OOM) or disappeared; it is dropped and the batch retried."""

    def __init__(self, message: str, device: int) -> None:
        super().__init__(message)
        self.device = device


def is_oom(exc: BaseException) -> bool:
    """Whether ``exc`` is an out-of-memory error: ours, torch's ``OutOfMemoryError`` (CUDA
    or not), or a ``RuntimeError`` whose message says so (cuBLAS allocation failures
    included). Torch-free: the class is recognised by name and message."""
    if isinstance(exc, OutOfMemory) or type(exc).__name__ == "OutOfMemoryError":
        return True
    return isinstance(exc, RuntimeError) and bool(_OOM_MESSAGE.search(str(exc)))
