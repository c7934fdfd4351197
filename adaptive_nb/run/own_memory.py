"""This process's own GPU memory, counted from the CUDA allocator rather than by NVML PID.

In Docker and most cloud notebooks NVML lists GPU processes under the host's PIDs, so
matching them against ``os.getpid()`` finds nothing and the run's own memory is counted as
another job's: the controller then believes half the GPU is taken and starves its own job.
Own memory is instead ``torch.cuda.memory_reserved(i)`` plus the CUDA context, which the
caching allocator does not see.

How the context is measured (once per device per process, kept for later runs): when the
device has no CUDA context yet, NVML's used memory of the device is read, the context is
created (``torch.cuda.mem_get_info``), NVML is read again: the difference, less what the
allocator reserved meanwhile (nothing), is the context. A co-tenant allocating during
those milliseconds would be counted as context; the result is clamped at 0. A device
whose context already exists (the model was moved there before the run) gets the median
of the contexts measured on other devices, or 0 when none was: its context (a few
hundred MB) is then counted as external, the safe side.
"""

from __future__ import annotations

import logging
import statistics
from collections.abc import Callable, Sequence

import torch

__all__ = ["CudaOwnMemory", "measure_context_mb"]

log = logging.getLogger("adaptive_nb")

MB = float(2**20)

_CONTEXT_MB: dict[int, float] = {}  # torch index -> measured context size, this process


def _has_context(index: int) -> bool:
    probe = getattr(torch._C, "_cuda_hasPrimaryContext", None)
    if probe is None:  # cannot tell: assume it exists (never counts a co-tenant as ours)
        return True
    return bool(probe(index))


def _create_context(index: int) -> None:
    torch.cuda.mem_get_info(index)


def _reserved_mb(index: int) -> float:
    return float(torch.cuda.memory_reserved(index)) / MB


def measure_context_mb(
    indices: Sequence[int],
    device_used_mb: Callable[[int], float | None],
    *,
    known: dict[int, float] | None = None,
    has_context: Callable[[int], bool] = _has_context,
    create_context: Callable[[int], None] = _create_context,
    reserved_mb: Callable[[int], float] = _reserved_mb,
) -> dict[int, float]:
    """Context size (MB) of each CUDA device in ``indices`` (method: module docstring).

    ``device_used_mb(i)``: NVML's used memory of torch device ``i`` now (None: unreadable).
    ``known``: sizes measured before (updated in place; default: this process's cache).
    """
    known = _CONTEXT_MB if known is None else known
    for i in indices:
        if i in known or has_context(i):
            continue
        before = device_used_mb(i)
        create_context(i)
        after = device_used_mb(i)
        if before is not None and after is not None:
            known[i] = max(0.0, after - before - reserved_mb(i))
    fallback = statistics.median(known.values()) if known else 0.0
    return {i: known.get(i, fallback) for i in indices}


class CudaOwnMemory:
    """``reader(torch_index)``: MB this process holds on the device (reserved + context),
    for the devices of a run; None for others (the monitor then matches PIDs)."""

    def __init__(
        self, context_mb: dict[int, float], reserved_mb: Callable[[int], float] = _reserved_mb
    ) -> None:
        self.context_mb = dict(context_mb)
        self._reserved_mb = reserved_mb

    def __call__(self, index: int) -> float | None:
        base = self.context_mb.get(index)
        if base is None:
            return None
        return self._reserved_mb(index) + base


def tell_monitor_own_memory(monitor: object, indices: Sequence[int]) -> None:
    """Give the monitor a :class:`CudaOwnMemory` reader for a GPU run's devices, measuring
    their CUDA contexts first (with the monitor's own NVML readings). Best effort: without
    it the monitor keeps matching PIDs."""
    setter = getattr(monitor, "set_own_memory_reader", None)
    sample_now = getattr(monitor, "sample_now", None)
    if setter is None or sample_now is None:
        return

    def used(index: int) -> float | None:
        for g in sample_now().gpus:
            if g.index == index:
                return float(g.mem_used_mb)
        return None

    try:
        context = measure_context_mb(list(indices), used)
    except Exception as exc:  # no CUDA, a driver hiccup: PID matching still works outside
        log.debug("could not measure CUDA context sizes: %s", exc)
        return
    setter(CudaOwnMemory({**_CONTEXT_MB, **context}))
