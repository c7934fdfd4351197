"""User callbacks, called once per *committed* optimizer step: the step body may run more
than once per applied step (an out-of-memory retry re-runs it, micro-batches and
accumulated batches run it per piece), so once-per-step side effects (logging, saving,
early stopping via ``run.control``) belong here, never in the step body.

A callback is any object with some of ``on_step_end(step, loss, history)``,
``on_epoch_end(epoch, history)`` and ``on_eval(metrics)``; ``history`` is the run's live
:class:`~adaptive_nb.run.history.TrainingHistory`. An exception in a callback stops the
run (it is the user's code, as a step body error is)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..errors import UsageError
from .history import TrainingHistory

__all__ = ["HOOKS", "Callbacks", "check_callbacks"]

HOOKS = ("on_step_end", "on_epoch_end", "on_eval")


def check_callbacks(value: Any, name: str = "callbacks") -> tuple[Any, ...]:
    """One callback object or a list/tuple of them; each must have at least one hook."""
    if value is None:
        return ()
    items = tuple(value) if isinstance(value, (list, tuple)) else (value,)
    for i, obj in enumerate(items):
        if not any(callable(getattr(obj, hook, None)) for hook in HOOKS):
            which = f"`{name}`" if len(items) == 1 and items[0] is value else f"`{name}`[{i}]"
            raise UsageError(
                f"{which} is a {type(obj).__name__} with none of the callback methods "
                f"{', '.join(HOOKS)}: pass an object that defines at least one, e.g. a class "
                "with `def on_step_end(self, step, loss, history): …`."
            )
    return items


class Callbacks:
    """Calls each hook of each callback that defines it, in the order given."""

    def __init__(self, items: Sequence[Any]) -> None:
        self.items = tuple(items)

    def _call(self, hook: str, *args: Any) -> None:
        for obj in self.items:
            fn = getattr(obj, hook, None)
            if callable(fn):
                fn(*args)

    def step_end(self, step: int, loss: float | None, history: TrainingHistory) -> None:
        self._call("on_step_end", step, loss, history)

    def epoch_end(self, epoch: int, history: TrainingHistory) -> None:
        self._call("on_epoch_end", epoch, history)

    def eval(self, metrics: dict[str, float]) -> None:
        self._call("on_eval", dict(metrics))
