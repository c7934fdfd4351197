"""Data without a detour through the kernel: the kernel walks only the *order* of the
global batches (dataset indices, or positions in a list of batches) and hands the ranks a
light :class:`BatchToken` per step; each rank loads only its own contiguous slice.

Supported sources (anything else is a :class:`UsageError` before anything runs):

* a ``torch.utils.data.DataLoader`` over a map-style dataset: the dataset and its
  ``collate_fn`` are shipped to the ranks once; the kernel iterates the loader's batch
  sampler (indices only; the random stream advances exactly as in the user's own loop
  over the loader, so a seeded shuffle gives the same order) and each token carries the
  global batch's indices. ``num_workers`` is not used: a rank loads its slice itself.
* a list or tuple of batches (nested tensors): shipped once; a token carries the batch's
  position, and a rank takes its slice of every tensor whose first dimension is the
  batch size (:func:`adaptive_nb.batches.split_nested`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset

from ...batches import batch_size_of, split_nested
from ...errors import UsageError

__all__ = [
    "AUTOCAST",
    "BatchToken",
    "DataSource",
    "StepToken",
    "describe_data",
    "iter_tokens",
    "load_slice",
    "token_parts",
]


@dataclass(frozen=True)
class BatchToken:
    """One global batch, by reference: what the loop hands the engine instead of data."""

    step: int  # index of the batch in the run (0-based, over all epochs)
    epoch: int
    batch: int  # samples in the global batch
    key: tuple[int, ...] | int  # dataset indices (loader) or position (list of batches)

    @property
    def last_step(self) -> int:
        """The step of the last global batch this token stands for (itself)."""
        return self.step


AUTOCAST: dict[str, torch.dtype] = {"bf16": torch.bfloat16}
"""The precisions a rank runs its step under ``torch.autocast`` for (fp32: none; fp16 is
not among them: its loss scaling would need the GradScaler's skip decision on the ranks)."""


@dataclass(frozen=True)
class StepToken(BatchToken):
    """One rank step that is more than one plain global batch: an accumulation group
    (``tokens``, consecutive global batches of one epoch, one optimizer step) and/or a step
    run under autocast (``autocast``: a key of :data:`AUTOCAST`, None for fp32).

    It *is* a :class:`BatchToken` for whatever reads one (the rank command loop replies
    ``SKIPPED`` with its ``step``; plans and logs go by ``step``): ``step`` and ``epoch`` are
    the first batch's, ``batch`` the group's samples, ``key`` the first batch's key. The
    kernel sends a plain :class:`BatchToken` whenever that says it all (one batch, fp32), so
    a plain step's message is unchanged. Make one with :meth:`of`."""

    tokens: tuple[BatchToken, ...] = ()
    autocast: str | None = None

    @classmethod
    def of(cls, tokens: tuple[BatchToken, ...], autocast: str | None = None) -> BatchToken:
        """The step for ``tokens`` (plain tokens, in order) under ``autocast``: the token
        itself when it is one batch in fp32."""
        if not tokens:
            raise ValueError("a step needs at least one global batch")
        if autocast is not None and autocast not in AUTOCAST:
            raise ValueError(f"no autocast for precision {autocast!r}")
        if len(tokens) == 1 and autocast is None:
            return tokens[0]
        first = tokens[0]
        return cls(
            first.step,
            first.epoch,
            sum(t.batch for t in tokens),
            first.key,
            tokens=tokens,
            autocast=autocast,
        )

    @property
    def last_step(self) -> int:
        return self.tokens[-1].step


def token_parts(token: BatchToken) -> tuple[tuple[BatchToken, ...], str | None]:
    """The plain global batches of a step and its autocast (None: fp32)."""
    if isinstance(token, StepToken):
        return token.tokens, token.autocast
    return (token,), None


@dataclass
class DataSource:
    """What is shipped to every rank: ``kind`` is ``"dataset"`` or ``"sequence"``."""

    kind: str
    items: Any  # the map-style dataset, or the list of batches
    collate: Callable[[list[Any]], Any] | None = None


def describe_data(data: Any, data_name: str = "data") -> DataSource:
    """The shippable description of ``data`` (raises :class:`UsageError` if unsupported)."""
    if isinstance(data, DataLoader):
        if isinstance(data.dataset, IterableDataset) or data.batch_sampler is None:
            raise UsageError(
                f"`{data_name}` is a DataLoader over an iterable dataset (or with "
                "batch_size=None): with engine='ddp' each rank loads its own slice by index, "
                "so use a map-style dataset with a batch_size, or pass a list of batches."
            )
        return DataSource("dataset", data.dataset, data.collate_fn)
    if isinstance(data, (list, tuple)):
        return DataSource("sequence", list(data))
    raise UsageError(
        f"`{data_name}` is a {type(data).__name__}: with engine='ddp' each rank loads its own "
        "slice, which needs a DataLoader over a map-style dataset or a list of batches. "
        f"Pass e.g. `{data_name}=list({data_name})` (small data) or a DataLoader."
    )


def iter_tokens(data: Any, epochs: int | None, data_name: str = "data") -> Iterator[BatchToken]:
    """The tokens of every global batch, epoch after epoch (``None``: without end), walked
    in the kernel without loading any sample."""
    describe_data(data, data_name)  # the same check, before anything is yielded
    step = 0
    epoch = 0
    while epochs is None or epoch < epochs:
        produced = False
        if isinstance(data, DataLoader):
            assert data.batch_sampler is not None
            order = iter(data.batch_sampler)
            if epoch == 0 or not (data.persistent_workers and data.num_workers > 0):
                # the draw a DataLoader iterator makes for its workers' base seed, after
                # creating (not yet starting) the sampler iterator: the random stream
                # then advances exactly as in the user's own loop over the loader
                torch.empty((), dtype=torch.int64).random_(generator=data.generator)
            for indices in order:
                key = tuple(int(i) for i in indices)
                produced = True
                yield BatchToken(step, epoch, len(key), key)
                step += 1
        else:
            for pos, batch in enumerate(data):
                produced = True
                yield BatchToken(step, epoch, batch_size_of(batch), pos)
                step += 1
        if not produced:
            return
        epoch += 1


def _slice_tensors(batch: Any, total: int, start: int, stop: int) -> Any:
    if (  # the common batch, a plain tuple or list of tensors: sliced without the walk
        type(batch) in (tuple, list) and all(isinstance(t, torch.Tensor) for t in batch)
    ):
        return type(batch)(
            t[start:stop] if t.dim() > 0 and t.shape[0] == total else t for t in batch
        )

    def take(t: torch.Tensor) -> list[Any]:
        if t.dim() > 0 and t.shape[0] == total:
            return [t[start:stop]]
        return [t]

    return split_nested(batch, 1, take)[0]


def load_slice(source: DataSource, token: BatchToken, start: int, stop: int) -> Any:
    """Rank-side: the samples ``[start, stop)`` of the token's global batch. An empty slice
    keeps the batch's structure with zero-length tensors (the rank still joins the
    step's all-reduce with it)."""
    if source.kind == "sequence":
        assert isinstance(token.key, int)
        return _slice_tensors(source.items[token.key], token.batch, start, stop)
    assert isinstance(token.key, tuple) and source.collate is not None
    keys: Sequence[int] = token.key[start:stop]
    if keys:
        return source.collate([source.items[i] for i in keys])
    one = source.collate([source.items[token.key[0]]])  # the structure, then 0 samples
    return _slice_tensors(one, 1, 0, 0)
