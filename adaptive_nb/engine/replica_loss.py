"""Losses a model computes itself, combined across replicas by each replica's share.

A model whose ``forward`` returns its own loss (a scalar, a dict with ``"loss"``, or a
dataclass such as a Hugging Face ``ModelOutput``) gives one scalar per replica under
``nn.DataParallel``; ``gather`` stacks them into a vector and the usual ``loss.mean()``
weights every replica equally. With an uneven split that is the wrong gradient: replica
``i`` holds ``bᵢ`` of the ``B`` samples, so the full-batch mean is ``Σ bᵢ/B · lossᵢ``.
:func:`gather_weighted` gathers replica outputs as ``nn.DataParallel`` does and replaces
every floating-point *scalar* (0-dim tensor) by that weighted sum. A scalar is taken to be
a mean over the replica's samples (PyTorch's default reduction, and what such models
return); sums are not (a model that returns a sum should be given a sum: use equal
shares or reduce by mean). The result is a scalar, so the user's ``loss.mean()`` (as
written for plain DataParallel) leaves it unchanged. Other values gather as usual.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

__all__ = ["gather_weighted", "weighted_scalar"]

GatherFn = Callable[[list[torch.Tensor]], torch.Tensor]


def weighted_scalar(gathered: torch.Tensor, weights: Sequence[float]) -> torch.Tensor:
    """``Σ wᵢ · gathered[i]`` for the vector of per-replica scalars ``gather`` made."""
    flat = gathered.reshape(-1)  # Python-float weights: no host-to-device copy per step
    return sum((flat[i] * float(w) for i, w in enumerate(weights)), flat.new_zeros(()))


def _is_namedtuple(obj: Any) -> bool:
    return isinstance(obj, tuple) and hasattr(obj, "_fields") and hasattr(obj, "_make")


def gather_weighted(outputs: Sequence[Any], weights: Sequence[float], gather: GatherFn) -> Any:
    """Gather ``outputs`` (one per replica, same structure) with ``gather`` on lists of
    tensors, weighting floating-point scalars by ``weights`` (replica ``i``'s share of the
    batch, summing to 1). Walks tensors, None, mappings (their own type rebuilt from
    (key, value) pairs, as ``nn.DataParallel`` does), dataclasses, named tuples, lists and
    tuples; any other value is taken from the first replica."""
    if len(outputs) != len(weights):
        raise ValueError(f"{len(outputs)} replica outputs but {len(weights)} weights")

    def walk(items: Sequence[Any]) -> Any:
        first = items[0]
        if isinstance(first, torch.Tensor):
            tensors = list(items)
            if all(t.dim() == 0 and t.is_floating_point() for t in tensors):
                with warnings.catch_warnings():  # "all input tensors were scalars": expected
                    warnings.simplefilter("ignore", UserWarning)
                    return weighted_scalar(gather(tensors), weights)
            return gather(tensors)
        if first is None:
            return None
        if isinstance(first, Mapping):
            mapping_type: Any = type(first)  # rebuilt from pairs (a ModelOutput accepts them)
            return mapping_type((k, walk([d[k] for d in items])) for k in first)
        if dataclasses.is_dataclass(first) and not isinstance(first, type):
            changes = {
                f.name: walk([getattr(o, f.name) for o in items])
                for f in dataclasses.fields(first)
                if f.init
            }
            return dataclasses.replace(first, **changes)
        if _is_namedtuple(first):
            return type(first)._make(walk(list(parts)) for parts in zip(*items, strict=True))
        if isinstance(first, (list, tuple)):
            return type(first)(walk(list(parts)) for parts in zip(*items, strict=True))
        return first

    return walk(list(outputs))
