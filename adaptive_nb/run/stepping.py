"""One optimizer step of a run: forward/backward of each batch of the step (one batch, or
an accumulation group with each batch's loss weighted by its share of the samples), then
the step applied exactly once (:meth:`.training.Training.commit`) and counted.

An engine whose workers hold the gradients (the DDP ranks: the kernel has none to keep
between the batches of a group) says so with ``takes_groups`` (:class:`GroupEngine`): it
gets the whole group in one ``forward_backward`` call, weights the batches itself and
returns one outcome for the group (its samples, its mean loss); an out-of-memory retry
reruns the whole group. It was built knowing the run's accumulation and precision, and
runs the run's autocast itself (on its workers)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

import torch

from ..batches import batch_size_of, move_to
from ..step import StepOutcome
from .training import Commit

if TYPE_CHECKING:
    from .loop import Run

__all__ = ["GroupEngine", "train_step"]


class GroupEngine(Protocol):
    """An engine that takes an accumulation group as one step (``takes_groups`` true):
    ``forward_backward(step, [batch, ...])`` computes the gradient of the group's mean loss
    (batch ``i``'s mean loss weighted by ``bᵢ/Σb``) and returns the group's outcome.
    Its builder passes it the run's ``accumulate`` and ``precision`` (it applies autocast
    where its step runs; it raises a UsageError for a precision it cannot run)."""

    takes_groups: bool


def train_step(
    run: Run, group: list[Any], primary: torch.device
) -> tuple[list[StepOutcome], Commit]:
    """Run ``group`` (the step's loader batches) and apply the step; the batches'
    outcomes (one for the whole group on an engine that takes groups) and what the
    commit did."""
    training = run.training
    outcomes: list[StepOutcome] = []
    if getattr(run.engine, "takes_groups", False):
        # the engine's workers accumulate (and weight) the group: one call, one outcome;
        # its tokens are references, not tensors (nothing to move)
        outcomes.append(run._forward_backward(group[0] if len(group) == 1 else list(group)))
        training.after_batch()
    else:
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
