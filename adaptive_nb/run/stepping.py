"""One optimizer step of a run: forward/backward of each batch of the step (one batch, or
an accumulation group with each batch's loss weighted by its share of the samples), then
the step applied exactly once (:meth:`.training.Training.commit`) and counted."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from ..batches import batch_size_of, move_to
from ..step import StepOutcome
from .training import Commit

if TYPE_CHECKING:
    from .loop import Run

__all__ = ["train_step"]


def train_step(
    run: Run, group: list[Any], primary: torch.device
) -> tuple[list[StepOutcome], Commit]:
    """Run ``group`` (the step's loader batches) and apply the step; the batches'
    outcomes and what the commit did."""
    training = run.training
    outcomes: list[StepOutcome] = []
    sizes = [batch_size_of(b) for b in group] if len(group) > 1 else [1]
    total = sum(sizes)
    for batch, n in zip(group, sizes, strict=True):
        if training.accumulate > 1:
            training.set_weight(n / total if total > 0 else 1.0 / len(group))
        outcomes.append(run._forward_backward(move_to(batch, primary)))
        training.after_batch()
    run._in_optimizer_step = True  # a second Ctrl-C waits until the step is counted
    commit = training.commit(run._apply_optimizer_step)
    run.step += 1
    run.samples += sum(o.samples for o in outcomes)
    run._in_optimizer_step = False
    return outcomes, commit
