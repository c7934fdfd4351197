"""Per-device forward *and* backward times of a DataParallel step, from device events.

Method (no synchronisation, nothing assumed about backward ≈ k × forward):

* forward of replica ``i``: an event just before and just after the replica's ``forward``,
  recorded on its device's current stream from the thread that runs it;
* backward start of replica ``i``: a hook on the replica's output tensors fires when the
  first of their gradients has arrived on that device (after the loss backward and
  ``Gather.backward`` delivered it), and records an event there;
* backward end of replica ``i``: an identity autograd function over the replica's
  parameter copies, inserted just before its forward; its backward runs on that device
  once every parameter gradient of the replica is computed, before they are reduced onto
  the primary, and records an event (a module called alone, with leaf parameters, uses
  ``torch.autograd.graph.register_multi_grad_hook`` on them instead);
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
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import torch
from torch import nn

from ..batches import iter_tensors

__all__ = [
    "CudaEventClock",
    "EventClock",
    "Interval",
    "mark_backward_end",
    "mark_backward_start",
    "mark_replica_backward_end",
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

    return [
        t.register_hook(once)  # type: ignore[no-untyped-call]
        for t in iter_tensors(output)
        if t.requires_grad
    ]


class _ReplicaEnd(torch.autograd.Function):
    """Identity on a replica's parameters; its backward runs once all of their gradients
    are computed (on the replica's device, before they are reduced) and calls
    ``callback``."""

    @staticmethod
    def forward(ctx: Any, callback: Callable[[], None], *params: torch.Tensor) -> Any:
        ctx.callback = callback
        return tuple(p.view_as(p) for p in params)

    @staticmethod
    def backward(ctx: Any, *grads: Any) -> Any:
        ctx.callback()
        return (None, *grads)


def mark_replica_backward_end(replica: nn.Module, callback: Callable[[], None]) -> bool:
    """Before a DataParallel replica's forward: pass its parameter copies (which
    ``replicate`` keeps in ``_former_parameters``) through :class:`_ReplicaEnd`, so that
    ``callback`` runs when the replica's own parameter gradients are done. (A tensor hook on
    those copies would fire only when ``Broadcast``'s backward runs, after *every* replica.)
    Created just before the forward, the function also comes right after the replica's own
    nodes in autograd's order. False if ``replica`` is not a replica with parameters."""
    slots: list[tuple[dict[str, Any], Any, str, torch.Tensor]] = []
    for m in replica.modules():
        former = m.__dict__.get("_former_parameters")
        if not former or not m.__dict__.get("_is_replica", False):
            continue
        attrs = m.__dict__
        slots.extend(
            (attrs, former, k, t) for k, t in former.items() if t is not None and t.requires_grad
        )
    if not slots:
        return False
    unique = list({id(t): t for _, _, _, t in slots}.values())
    outs = _ReplicaEnd.apply(callback, *unique)  # type: ignore[no-untyped-call]
    new = {id(t): o for t, o in zip(unique, outs, strict=True)}
    for attrs, former, key, t in slots:  # plain attributes of a replica, as replicate set them
        attrs[key] = former[key] = new[id(t)]
    return True


def mark_backward_end(module: nn.Module, callback: Callable[[], None]) -> Any:
    """Call ``callback`` once every gradient-requiring parameter of ``module`` (a module
    with leaf parameters, not a replica: see :func:`mark_replica_backward_end`) has its
    gradient in the current backward pass. Returns the hook handle (None: no such
    parameter)."""
    params = [p for p in module.parameters() if p.requires_grad]
    if not params:
        return None
    return torch.autograd.graph.register_multi_grad_hook(
        params, lambda _grads: callback(), mode="all"
    )
