"""One optimizer step's forward + backward, with the checks and retries that keep a step
applied exactly once: the loss is checked before ``backward``, and after an out-of-memory
or a dropped device the controller re-plans and the *same* batch is retried with the
gradients cleared."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from ..errors import DeviceFailure, LossError, OutOfMemory
from ..events import Event
from ..step import StepFn, StepOutcome

__all__ = ["MAX_RETRIES", "align_optimizer_state", "checked_step", "forward_backward"]

MAX_RETRIES = 8


def _check_loss(loss: Any, loss_name: str) -> torch.Tensor:
    if loss is None:
        raise LossError(
            f"the step never assigned `{loss_name}`: end the cell with e.g. "
            f"`{loss_name} = F.cross_entropy(model(x), y)` (the step was not applied)."
        )
    if not isinstance(loss, torch.Tensor):
        raise LossError(
            f"`{loss_name}` is a {type(loss).__name__}, not a tensor: assign the loss tensor "
            "itself, not `.item()` (the step was not applied)."
        )
    if loss.numel() != 1:
        raise LossError(
            f"`{loss_name}` has shape {tuple(loss.shape)}; it must be a scalar: reduce it, "
            f"e.g. `{loss_name} = {loss_name}.mean()` (the step was not applied)."
        )
    if not loss.requires_grad:
        raise LossError(
            f"`{loss_name}` does not require grad: it was computed under torch.no_grad() or "
            "from detached tensors, so nothing can be trained (the step was not applied)."
        )
    return loss if loss.dim() == 0 else loss.reshape(())


def checked_step(step: StepFn, loss_name: str) -> StepFn:
    """``step`` whose result is checked to be a usable scalar loss (else LossError)."""

    def checked(model: nn.Module, batch: Any) -> torch.Tensor:
        return _check_loss(step(model, batch), loss_name)

    return checked


def align_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """Move optimizer state (e.g. Adam moments from an earlier CPU run) to the device its
    parameter now lives on; scalar entries such as Adam's ``step`` stay where they are."""
    for param, state in optimizer.state.items():
        if not isinstance(param, torch.Tensor):
            continue
        for key, value in state.items():
            if isinstance(value, torch.Tensor) and value.dim() > 0 and value.device != param.device:
                state[key] = value.to(param.device)


def forward_backward(
    run_step: Callable[[], StepOutcome],
    zero_grad: Callable[[], None],
    *,
    on_oom: Callable[[OutOfMemory], Sequence[Event]],
    on_device_failure: Callable[[DeviceFailure], Sequence[Event]],
) -> tuple[StepOutcome, int]:
    """Run ``run_step`` (gradients cleared first), retrying the same batch after each
    out-of-memory or dropped device the controller re-planned around (``on_oom`` /
    ``on_device_failure`` re-plan, or re-raise when they cannot). Returns the outcome and
    the number of out-of-memory errors recovered on the way; re-raises after
    :data:`MAX_RETRIES` retries."""
    retries = 0
    ooms = 0
    while True:
        zero_grad()
        try:
            return run_step(), ooms
        except OutOfMemory as err:
            retries += 1
            if retries > MAX_RETRIES:
                raise
            zero_grad()
            on_oom(err)
            ooms += 1
        except DeviceFailure as err:
            retries += 1
            zero_grad()
            on_device_failure(err)
            if retries > MAX_RETRIES:
                raise
