"""Per-device forward *and* backward times of a DataParallel step, from device events.

Method (no synchronisation, nothing assumed about backward ≈ k × forward):

* forward of replica ``i``: an event just before and just after the replica's ``forward``,
  recorded on its device's current stream from the thread that runs it;
* backward start of replica ``i``: a hook on the replica's output tensors fires when the
  first of their gradients has arrived on that device (after the loss backward and
  ``Gather.backward`` delivered it), and records an event there;
* backward end of replica ``i``: ``torch.autograd.graph.register_multi_grad_hook`` on the
  replica's parameters (mode ``"all"``) fires once every parameter gradient of that
  replica is computed, before they are reduced onto the primary, and records an event;
* the primary is also charged with the loss: from the end of the gather to the start of
  its replica's backward (loss forward, loss backward, ``Gather.backward``), and, when the
  loop steps the optimizer through the engine, with ``optimizer.step()``.

Events are read only once completed (a step or more late). On CUDA an event is a
``torch.cuda.Event`` on the device's current stream; the elapsed time between two events
is device time (idle gaps between them included). :class:`EventClock` abstracts this so the
bracketing is testable on the CPU with a fake clock.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

import torch
from torch import nn

__all__ = [
    "CudaEventClock",
    "EventClock",
    "Interval",
    "mark_backward_end",
    "mark_backward_start",
    "seconds_by_position",
]


class EventClock(Protocol):
    """Records timing events on devices and reads them once they have completed."""

    def mark(self, device: int) -> Any:
        """An event recorded now on ``device``'s current stream."""

    def done(self, event: Any) -> bool:
        """Whether the device has reached ``event`` (never blocks)."""

    def seconds(self, start: Any, end: Any) -> float:
        """Device seconds from ``start`` to ``end`` (both done)."""


class CudaEventClock:
    """:class:`EventClock` on CUDA events with timing enabled."""

    def mark(self, device: int) -> Any:
        ev = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
        ev.record(torch.cuda.current_stream(device))
        return ev

    def done(self, event: Any) -> bool:
        return bool(event.query())

    def seconds(self, start: Any, end: Any) -> float:
        return float(start.elapsed_time(end)) / 1000.0


@dataclasses.dataclass
class Interval:
    """One timed stretch of one device position: ``kind`` is forward, backward, loss or
    optimizer. ``end`` is None until it has been marked."""

    position: int
    kind: str
    start: Any
    end: Any = None


def seconds_by_position(
    intervals: Sequence[Interval], clock: EventClock
) -> dict[int, dict[str, float]]:
    """Seconds per position and kind (completed intervals only)."""
    out: dict[int, dict[str, float]] = {}
    for iv in intervals:
        if iv.end is None:
            continue
        kinds = out.setdefault(iv.position, {})
        kinds[iv.kind] = kinds.get(iv.kind, 0.0) + clock.seconds(iv.start, iv.end)
    return out


def _map(obj: Any, fn: Callable[[torch.Tensor], Any]) -> Any:
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, Mapping):
        mapping_type: Any = type(obj)
        return mapping_type((k, _map(v, fn)) for k, v in obj.items())
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        fields = [f.name for f in dataclasses.fields(obj) if f.init]
        return dataclasses.replace(obj, **{n: _map(getattr(obj, n), fn) for n in fields})
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):
        return type(obj)(*(_map(v, fn) for v in obj))
    if isinstance(obj, (list, tuple)):
        return type(obj)(_map(v, fn) for v in obj)
    return obj


def mark_backward_start(output: Any, callback: Callable[[], None]) -> list[Any]:
    """Call ``callback`` once, when the gradient of the first of ``output``'s
    grad-requiring tensors arrives (the replica's backward starts there). A tensor hook,
    so the output itself is untouched (in-place operations on it stay allowed). Returns
    the hook handles."""
    fired = False

    def once(grad: torch.Tensor) -> None:
        nonlocal fired
        if not fired:
            fired = True
            callback()

    handles: list[Any] = []

    def hook(t: torch.Tensor) -> torch.Tensor:
        if t.requires_grad:
            handles.append(t.register_hook(once))  # type: ignore[no-untyped-call]
        return t

    _map(output, hook)
    return handles


def _trainable(module: nn.Module) -> list[torch.Tensor]:
    """The gradient-requiring parameters of ``module``, also when it is a DataParallel
    replica: ``replicate`` leaves a replica's ``_parameters`` empty and keeps its
    (non-leaf) parameter copies in ``_former_parameters``."""
    out: list[torch.Tensor] = []
    for m in module.modules():
        former = (
            getattr(m, "_former_parameters", None) if getattr(m, "_is_replica", False) else None
        )
        source = former.values() if former else m._parameters.values()
        out.extend(p for p in source if p is not None and p.requires_grad)
    return out


def mark_backward_end(module: nn.Module, callback: Callable[[], None]) -> Any:
    """Call ``callback`` once every gradient-requiring parameter of ``module`` (or of the
    replica) has its gradient in the current backward pass. Returns the hook handle (None:
    no such parameter)."""
    params = _trainable(module)
    if not params:
        return None
    return torch.autograd.graph.register_multi_grad_hook(
        params, lambda _grads: callback(), mode="all"
    )
