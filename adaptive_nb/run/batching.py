"""The batches a run trains on: passes over the user's data (each followed by an
end-of-epoch mark), grouped into optimizer steps (one batch each, or ``accumulate``;
a group never spans two epochs)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..errors import UsageError
from ..events import EventKind

if TYPE_CHECKING:
    from .loop import Run

__all__ = ["EpochEnd", "batch_stream", "next_group"]


@dataclass(frozen=True)
class EpochEnd:
    """Marks, in the stream of batches, that epoch ``epoch`` (0-based) went through."""

    epoch: int


_DONE = object()


def batch_stream(run: Run) -> Iterator[Any]:
    """The run's batches, epoch after epoch, with an :class:`EpochEnd` after each epoch that
    produced batches (``run.epoch`` is the epoch of the latest batch). Data that produces no
    batch at all is a UsageError; data that runs out later ends the run with a notice."""
    checkpoints = run.training.checkpoints
    epoch, skip = checkpoints.skip_to()  # (0, 0) unless resuming
    while run.epochs is None or epoch < run.epochs:
        got = False
        checkpoints.start_epoch(epoch, run.data)
        for batch in run.data:
            checkpoints.position = (epoch, checkpoints.position[1] + 1)
            if not got:
                got = True
                run.epoch = epoch
                run._epochs_started = epoch + 1
            if skip:  # consumed before the checkpoint being resumed
                skip -= 1
                if not skip:
                    checkpoints.skipped()
                continue
            yield batch
        if skip:
            raise UsageError(
                f"`{run.data_name}` has fewer batches in epoch {epoch} than when the checkpoint "
                "was written: resume with the same data (and batch size)."
            )
        if not got:
            if run.step == 0:
                raise UsageError(
                    f"`{run.data_name}` produced no batches: is the dataset empty, or an "
                    "iterator that was already used up? Re-create it and run again."
                )
            run._event(
                EventKind.NOTICE,
                f"`{run.data_name}` ran out after {run.step} steps (a one-shot iterator?)",
            )
            return
        yield EpochEnd(epoch)
        epoch += 1


def next_group(batches: Iterator[Any], size: int) -> tuple[list[Any], EpochEnd | None, bool]:
    """The batches of the next optimizer step (``size`` of them, fewer at the end of an
    epoch), the end of epoch that followed them (if any), and whether the data ran out."""
    group: list[Any] = []
    while len(group) < size:
        item = next(batches, _DONE)
        if item is _DONE:
            return group, None, True
        if isinstance(item, EpochEnd):
            return group, item, False
        group.append(item)
    return group, None, False
