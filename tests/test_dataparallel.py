"""Weighted DataParallel: pure parts on CPU; real scatter, gradient equality and OOM
recovery on CUDA (marked ``gpu``, skipped without a device)."""

from __future__ import annotations

import copy
from collections import namedtuple
from collections.abc import Sequence

import pytest
import torch
from torch import nn

from adaptive_nb.engine.base import OutOfMemory
from adaptive_nb.engine.dataparallel import (
    DataParallelEngine,
    WeightedDataParallel,
    device_of_error,
    first_batch_size,
    scatter_weighted,
)
from adaptive_nb.errors import UsageError
from adaptive_nb.plan.planner import Plan

Pair = namedtuple("Pair", ["x", "y"])


def fake_scatter(
    devices: Sequence[int], sizes: Sequence[int], dim: int, t: torch.Tensor
) -> list[torch.Tensor]:
    assert len(devices) == len(sizes)
    return list(torch.split(t, list(sizes), dim=dim))


def test_scatter_weighted_nested_structures() -> None:
    x = torch.arange(12).reshape(6, 2)
    batch = ({"a": x, "b": [x, "tag"], "n": Pair(x, x[:, 0])}, 3)
    out = scatter_weighted(batch, [0, 2], [4, 2], scatter=fake_scatter)
    assert len(out) == 2
    first, second = out
    assert first[0]["a"].shape == (4, 2) and second[0]["a"].shape == (2, 2)
    assert first[0]["b"][1] == "tag" and second[1] == 3
    assert isinstance(second[0]["n"], Pair) and second[0]["n"].y.tolist() == [8, 10]


def test_scatter_weighted_rejects_tensors_that_are_not_batch_shaped() -> None:
    with pytest.raises(UsageError, match="split"):
        scatter_weighted((torch.zeros(6, 2), torch.zeros(3)), [0, 1], [3, 3], scatter=fake_scatter)


def test_device_of_error() -> None:
    assert device_of_error("Caught OutOfMemoryError in replica 1 on device 1.\nOriginal") == 1
    assert device_of_error("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 3 has a total") == 3
    assert device_of_error("something else") is None


def test_first_batch_size() -> None:
    assert first_batch_size(((), {"x": torch.zeros(5, 3)})) == 5
    assert first_batch_size(("a", [torch.zeros(())], torch.zeros(7))) == 7
    assert first_batch_size(("a",)) is None


def test_chunk_plan_leaves_out_zero_shares_and_keeps_the_primary() -> None:
    dp = WeightedDataParallel(nn.Linear(2, 2), [0, 1, 2])
    dp.set_plan([0.0, 0.7, 0.3])
    positions, sizes = dp.chunk_plan(10)
    assert positions[0] == 0 and sizes[0] == 1  # the primary always computes something
    assert sum(sizes) == 10 and all(s > 0 for s in sizes)
    dp.set_plan([0.5, 0.0, 0.5], [None, None, 3])
    positions, sizes = dp.chunk_plan(10)
    assert positions == [0, 2] and sizes == [7, 3]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA message")
def test_engine_needs_cuda() -> None:
    with pytest.raises(UsageError, match="no CUDA device"):
        DataParallelEngine([0])


# -- on a GPU machine ------------------------------------------------------------------


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 4))


def _loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = batch
    return nn.functional.cross_entropy(model(x), y)


def _batch(n: int = 96) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 16, generator=g), torch.randint(0, 4, (n,), generator=g)


@pytest.mark.gpu
def test_weighted_scatter_and_gradient_equal_one_device() -> None:
    ids = list(range(torch.cuda.device_count()))
    ref = _model().cuda(0)
    x, y = (t.cuda(0) for t in _batch())
    _loss(ref, (x, y)).backward()
    dp_model = copy.deepcopy(ref)
    dp_model.zero_grad(set_to_none=True)
    engine = DataParallelEngine(ids)
    wrapped = engine.prepare(dp_model)
    seen: dict[int, int] = {}
    dp_model[0].register_forward_hook(
        lambda _m, inp, _o: seen.__setitem__(inp[0].device.index, inp[0].shape[0])
    )
    n = len(ids)
    shares = [0.6] + [0.4 / (n - 1)] * (n - 1) if n > 1 else [1.0]
    engine.apply_plan(Plan(tuple(ids), tuple(shares), 1, 96))
    out = engine.forward_backward(_loss, (x, y))
    assert out.samples == 96
    assert sum(seen.values()) == 96
    if n > 1:
        assert seen[0] == round(0.6 * 96)
    for a, b in zip(dp_model.parameters(), ref.parameters(), strict=True):
        assert a.grad is not None and b.grad is not None
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-5)
    assert wrapped is engine.wrapper


@pytest.mark.gpu
def test_micro_batches_on_gpu_give_the_same_gradient() -> None:
    ref = _model().cuda(0)
    x, y = (t.cuda(0) for t in _batch())
    _loss(ref, (x, y)).backward()
    model = copy.deepcopy(ref)
    model.zero_grad(set_to_none=True)
    engine = DataParallelEngine([0])
    engine.prepare(model)
    engine.apply_plan(Plan((0,), (1.0,), 3, 96))
    out = engine.forward_backward(_loss, (x, y))
    assert out.micro_batches in (1, 3)
    for a, b in zip(model.parameters(), ref.parameters(), strict=True):
        assert a.grad is not None and b.grad is not None
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-5)


@pytest.mark.gpu
def test_out_of_memory_on_a_real_device_is_recovered() -> None:
    engine = DataParallelEngine([0])
    model = _model()
    engine.prepare(model)
    x, y = (t.cuda(0) for t in _batch())
    total = torch.cuda.get_device_properties(0).total_memory

    def greedy(m: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        hog = torch.empty(int(total * 2) // 4, dtype=torch.float32, device="cuda:0")
        return _loss(m, batch) + hog[:1].sum() * 0

    with pytest.raises(OutOfMemory) as err:
        engine.forward_backward(greedy, (x, y))
    assert err.value.device == 0
    model.zero_grad(set_to_none=True)
    out = engine.forward_backward(_loss, (x, y))
    assert out.samples == 96 and torch.isfinite(out.loss)
    for _ in range(4):  # measurements arrive a step late, from CUDA events
        out = engine.forward_backward(_loss, (x, y))
    torch.cuda.synchronize()
    out = engine.forward_backward(_loss, (x, y))
    assert out.device_time_s and out.device_batch.get(0) == 96
