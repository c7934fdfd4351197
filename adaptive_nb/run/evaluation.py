"""Evaluation during training: the user's ``evaluate(model) -> {name: number}``, run every
epoch (or every ``eval_every`` optimizer steps) under ``model.eval()`` and
``torch.no_grad()``, with the model put back in training mode afterwards (so BatchNorm and
Dropout train again). Its time is kept out of the training throughput."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..errors import UsageError

__all__ = ["Evaluator", "check_evaluate"]

EvaluateFn = Callable[[nn.Module], dict[str, float]]


def check_evaluate(evaluate: Any, eval_every: Any, name: str = "evaluate") -> int | None:
    """Check ``evaluate`` / ``eval_every``; returns ``eval_every`` (None: every epoch)."""
    if evaluate is not None:
        if not callable(evaluate) or isinstance(evaluate, nn.Module):
            raise UsageError(
                f"`{name}` is a {type(evaluate).__name__}, not a function: pass "
                "evaluate=fn (--eval NAME) with fn(model) -> {'val_loss': …, …}."
            )
        try:
            inspect.signature(evaluate).bind(None)
        except TypeError:
            raise UsageError(
                f"`{name}` cannot be called with the model alone: an evaluation function "
                "takes one argument, e.g. `def evaluate(model): return {'val_loss': …}`."
            ) from None
        except ValueError:  # no signature to inspect (a builtin): let the call tell
            pass
    if eval_every is None:
        return None
    if evaluate is None:
        raise UsageError(
            f"eval_every={eval_every!r} (--eval-every) was given without an evaluation "
            "function: pass evaluate=fn (--eval NAME) too, or drop it."
        )
    if isinstance(eval_every, bool) or not isinstance(eval_every, int) or eval_every < 1:
        raise UsageError(
            f"eval_every={eval_every!r} (--eval-every) must be a whole number of optimizer "
            "steps, at least 1; leave it out to evaluate after every epoch."
        )
    return eval_every


def _metrics(result: Any, name: str) -> dict[str, float]:
    if not isinstance(result, dict):
        raise UsageError(
            f"`{name}` returned a {type(result).__name__}; an evaluation function must return "
            "a dict of metric names to numbers, e.g. {'val_loss': 0.41, 'accuracy': 0.87}."
        )
    out: dict[str, float] = {}
    for key, value in result.items():
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            value = value.item()
        if not isinstance(key, str) or isinstance(value, bool):
            value = None
        if not isinstance(value, (int, float)):
            raise UsageError(
                f"`{name}` returned {key!r}: {type(value).__name__}; every metric must be a "
                "number under a string name (use `.item()` on a scalar tensor)."
            )
        out[key] = float(value)
    return out


class Evaluator:
    """Runs ``fn`` on the model in eval mode without gradients; checks what it returns."""

    def __init__(self, fn: EvaluateFn | None, every: int | None, name: str) -> None:
        self.fn = fn
        self.every = every
        self.name = name

    def due_after_step(self, step: int) -> bool:
        return self.fn is not None and self.every is not None and step % self.every == 0

    def due_after_epoch(self) -> bool:
        return self.fn is not None and self.every is None

    def run(self, model: nn.Module) -> dict[str, float]:
        assert self.fn is not None
        model.eval()
        try:
            with torch.no_grad():
                result = self.fn(model)
        finally:
            model.train()
        return _metrics(result, self.name)  # a NaN metric is reported as it is
