"""The DDP engine's checks of the user's job: their mistakes, in their terms, raised as
:class:`UsageError` before any process starts."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ...errors import UsageError

__all__ = ["check_job"]


def check_job(
    step: Any, model: nn.Module, optimizer: torch.optim.Optimizer, world_size: int
) -> None:
    """The user's mistakes, in their terms, before anything starts."""
    if not callable(step):
        raise UsageError(f"the step is a {type(step).__name__}: pass a function (model, batch).")
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise UsageError(f"world_size must be a whole number of ranks >= 1, got {world_size!r}.")
    if not isinstance(model, nn.Module):
        raise UsageError(f"`model` is a {type(model).__name__}, not a torch.nn.Module.")
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise UsageError(f"`optimizer` is a {type(optimizer).__name__}, not a torch optimizer.")
    own = {id(p) for p in model.parameters()}
    stray = sum(1 for g in optimizer.param_groups for p in g["params"] if id(p) not in own)
    if stray:
        raise UsageError(
            f"`optimizer` updates {stray} tensor(s) that are not parameters of `model`: on the "
            "ranks only the model's gradients are averaged, so those would drift apart. "
            "Build the optimizer from model.parameters()."
        )
