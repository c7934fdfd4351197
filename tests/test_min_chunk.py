"""Tiny chunks: no device gets fewer samples than a minimum (2 with batch norm), the
primary included; and a dropped device gives its allocator cache back. CPU only."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from adaptive_nb.engine.dataparallel import (
    DataParallelEngine,
    WeightedDataParallel,
    default_min_chunk,
)
from adaptive_nb.layout import chunk_sizes


def _cpu_engine(ids: list[int]) -> DataParallelEngine:
    return DataParallelEngine(ids, names=[f"GPU {d}" for d in ids])  # names: no CUDA checks


def test_no_device_gets_fewer_samples_than_the_minimum() -> None:
    # a 0.05 share of 20 is one sample: with a minimum of 2 that device sits it out, and its
    # sample goes to the largest chunk
    assert chunk_sizes([0.55, 0.4, 0.05], 20, required=0) == [11, 8, 1]
    assert chunk_sizes([0.55, 0.4, 0.05], 20, required=0, min_chunk=2) == [12, 8, 0]
    # the primary is raised to the minimum rather than left with one sample
    assert chunk_sizes([0.001, 0.999], 10, required=0, min_chunk=2) == [2, 8]
    # a batch smaller than two minimums goes to the primary alone
    assert chunk_sizes([0.5, 0.5], 3, required=0, min_chunk=2) == [3, 0]
    # caps are the harder limit: no room elsewhere keeps a small chunk
    assert chunk_sizes([0.45, 0.45, 0.1], 10, [5, 4, None], required=0, min_chunk=2) == [5, 4, 1]
    for total in range(0, 40):
        for shares in ([0.7, 0.2, 0.1], [0.01, 0.5, 0.49], [0.34, 0.33, 0.33]):
            sizes = chunk_sizes(shares, total, required=0, min_chunk=3)
            assert sum(sizes) == total
            assert all(s == 0 or s >= min(3, total) for s in sizes), (shares, total, sizes)
            assert total == 0 or sizes[0] >= min(3, total)


def test_the_wrapper_uses_two_samples_per_replica_with_batch_norm() -> None:
    bn = nn.Sequential(nn.Linear(2, 4), nn.BatchNorm1d(4))
    assert default_min_chunk(bn) == 2 and default_min_chunk(nn.Linear(2, 2)) == 1
    dp = WeightedDataParallel(bn, [0, 1, 2])
    dp.set_plan([0.5, 0.45, 0.05])
    positions, sizes = dp.chunk_plan(20)
    assert positions == [0, 1] and sizes == [11, 9]
    assert WeightedDataParallel(bn, [0, 1], min_chunk=1).min_chunk == 1
    engine = _cpu_engine([0, 1])
    engine.wrap(bn)
    assert engine.effective_min_chunk == 2


def test_release_device_empties_the_cache_of_that_device_only(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    engine = _cpu_engine([3, 5])
    current: list[int] = []
    emptied: list[int] = []

    class _Device:
        def __init__(self, index: int) -> None:
            self.index = index

        def __enter__(self) -> None:
            current.append(self.index)

        def __exit__(self, *exc: object) -> None:
            current.pop()

    monkeypatch.setattr(torch.cuda, "device", _Device)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: emptied.append(current[-1]))
    engine.release_device(1)
    assert emptied == [5]
    engine.release_device(7)  # not a position: nothing to release
    assert emptied == [5]
