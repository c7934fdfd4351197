"""Walkers over nested batches (tensors inside tuples, lists, dicts and namedtuples): one
home for counting samples, moving to a device and splitting along the batch dimension.

Engines split batches into per-device chunks or micro-batches with :func:`split_nested`,
each giving its own rule for a single tensor.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from typing import Any

import torch

__all__ = ["batch_size_of", "first_batch_size", "iter_tensors", "move_to", "split_nested"]


def iter_tensors(obj: Any) -> Iterator[torch.Tensor]:
    """Every tensor of a nested tuple/list/dict/dataclass structure, in order (dict values
    and dataclass fields in order)."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from iter_tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from iter_tensors(v)
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        for f in dataclasses.fields(obj):
            yield from iter_tensors(getattr(obj, f.name))


def batch_size_of(batch: Any) -> int:
    """Samples in a batch: the first non-zero leading dimension among its tensors (a 0-d
    tensor counts as one sample; 0 if there is none)."""
    for t in iter_tensors(batch):
        n = int(t.shape[0]) if t.dim() > 0 else 1
        if n:
            return n
    return 0


def first_batch_size(obj: Any, dim: int = 0) -> int | None:
    """Size along ``dim`` of the first tensor that has that dimension (None if none)."""
    for t in iter_tensors(obj):
        if t.dim() > dim:
            return int(t.shape[dim])
    return None


def move_to(batch: Any, device: torch.device) -> Any:
    """Move every tensor in a nested tuple/list/dict structure to ``device``."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True) if batch.device != device else batch
    if isinstance(batch, dict):
        return {k: move_to(v, device) for k, v in batch.items()}
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # namedtuple
        return type(batch)(*(move_to(v, device) for v in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(move_to(v, device) for v in batch)
    return batch


def split_nested(
    obj: Any, parts: int, split_tensor: Callable[[torch.Tensor], list[Any]]
) -> list[Any]:
    """``parts`` copies of a nested structure, each holding one piece of every tensor.

    ``split_tensor(t)`` returns the ``parts`` pieces of one tensor (or raises); containers
    keep their type (namedtuples, dict subclasses); anything else is repeated in each part.
    """

    def split(x: Any) -> list[Any]:
        if isinstance(x, torch.Tensor):
            return list(split_tensor(x))
        if isinstance(x, tuple) and hasattr(x, "_fields"):
            cols = [split(v) for v in x]
            return [type(x)(*(c[i] for c in cols)) for i in range(parts)]
        if isinstance(x, (list, tuple)):
            cols = [split(v) for v in x]
            return [type(x)(c[i] for c in cols) for i in range(parts)]
        if isinstance(x, dict):
            items = {k: split(v) for k, v in x.items()}
            return [type(x)((k, v[i]) for k, v in items.items()) for i in range(parts)]
        return [x] * parts

    return split(obj)
