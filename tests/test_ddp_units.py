"""DDP engine, the parts without processes: the rank layout and loss weights that make
the gradient exact, the kernel's walk of a DataLoader (same order and same random stream
as the user's own loop), rank-side slicing, and naming what cannot be pickled."""

from __future__ import annotations

import pickle
import threading
from collections import namedtuple
from typing import Any

import pytest
import torch
from torch.utils.data import DataLoader, IterableDataset, TensorDataset

from adaptive_nb.engine.ddp.data import describe_data, iter_tokens, load_slice
from adaptive_nb.engine.ddp.payload import dumps_host, dumps_job, find_unpicklable
from adaptive_nb.engine.ddp.scaling import loss_weight, rank_layout, slice_bounds
from adaptive_nb.errors import UsageError


def test_layout_follows_shares_and_every_rank_joins_once() -> None:
    lay = rank_layout((5 / 9, 3 / 9, 1 / 9), 9)
    assert lay.sizes == (5, 3, 1) and lay.pieces == ((5,), (3,), (1,))
    zero = rank_layout((6 / 9, 0.0, 3 / 9), 9)
    assert zero.sizes == (6, 0, 3)
    assert zero.pieces[1] == (0,)  # an empty piece: the rank still joins the all-reduce
    assert [slice_bounds(zero.sizes, r) for r in range(3)] == [(0, 6), (6, 6), (6, 9)]


def test_micro_batches_and_caps_split_each_rank_without_losing_a_sample() -> None:
    lay = rank_layout((7 / 12, 4 / 12, 1 / 12), 12, micro_batches=3)
    assert lay.total == 12
    assert all(sum(p) == s for p, s in zip(lay.pieces, lay.sizes, strict=True))
    assert max(len(p) for p in lay.pieces) == 3
    capped = rank_layout((0.5, 0.5), 10, caps=(2, 3))  # 5 per micro-batch do not fit
    assert capped.total == 10
    assert all(max(p) <= c for p, c in zip(capped.pieces, (2, 3), strict=True))


def test_loss_weights_average_to_the_full_batch_mean() -> None:
    sizes, total, world = (5, 3, 1, 0), 9, 4
    weights = [loss_weight(b, total, world) for b in sizes]
    assert weights[-1] == 0.0
    # DDP divides the sum of the ranks' gradients by W: Σ wᵢ/W · gᵢ = Σ bᵢ/B · gᵢ
    assert [w / world for w in weights] == pytest.approx([b / total for b in sizes])
    assert loss_weight(3, 0, 2) == 0.0


def test_kernel_walks_a_shuffled_loader_like_the_users_loop() -> None:
    ds = TensorDataset(torch.arange(23).float().unsqueeze(1), torch.arange(23))

    def loader() -> DataLoader[Any]:
        return DataLoader(ds, batch_size=5, shuffle=True)  # the global RNG drives it

    torch.manual_seed(11)
    want = [b[1].tolist() for _ in range(2) for b in loader()]
    after_user = torch.rand(1)
    torch.manual_seed(11)
    tokens = list(iter_tokens(loader(), 2))
    assert [list(t.key) for t in tokens] == want  # type: ignore[arg-type]
    assert torch.equal(torch.rand(1), after_user)  # the random stream advanced alike
    assert [t.step for t in tokens] == list(range(10))
    assert [t.epoch for t in tokens] == [0] * 5 + [1] * 5
    assert [t.batch for t in tokens] == [5, 5, 5, 5, 3] * 2


def test_a_rank_loads_only_its_slice_and_an_empty_slice_keeps_the_structure() -> None:
    Pair = namedtuple("Pair", "x y")
    batch = {"a": Pair(torch.arange(6).reshape(6, 1), torch.arange(6)), "scale": torch.ones(2)}
    source = describe_data([batch])
    token = next(iter_tokens([batch], 1))
    part = load_slice(source, token, 2, 5)
    assert part["a"].x.flatten().tolist() == [2, 3, 4] and isinstance(part["a"], Pair)
    assert torch.equal(part["scale"], torch.ones(2))  # not batch-sized: passed whole
    empty = load_slice(source, token, 6, 6)
    assert empty["a"].x.shape == (0, 1) and empty["a"].y.shape == (0,)

    ds = TensorDataset(torch.randn(8, 3), torch.arange(8))
    loaded = describe_data(DataLoader(ds, batch_size=4))
    tok = next(iter_tokens(DataLoader(ds, batch_size=4), 1))
    x, y = load_slice(loaded, tok, 1, 3)
    assert y.tolist() == [1, 2] and x.shape == (2, 3)
    x0, y0 = load_slice(loaded, tok, 2, 2)
    assert x0.shape == (0, 3) and y0.shape == (0,)


def test_unsupported_data_is_a_usage_error_in_the_users_terms() -> None:
    with pytest.raises(UsageError, match=r"`train_data` is a generator.*list\(train_data\)"):
        describe_data((b for b in []), "train_data")

    class Stream(IterableDataset[int]):
        def __iter__(self) -> Any:
            return iter(range(3))

    with pytest.raises(UsageError, match="iterable dataset"):
        describe_data(DataLoader(Stream(), batch_size=2))


def test_what_cannot_be_pickled_is_named_with_a_fix() -> None:
    lock = threading.Lock()

    def step(model: Any, batch: Any) -> Any:
        with lock:
            return batch

    assert find_unpicklable(step, "`step`") == "`step` → captured variable `lock` (a lock: lock)"
    with pytest.raises(UsageError, match="a lock cannot cross processes"):
        dumps_job({"step": step, "model": torch.nn.Linear(1, 1)})
    assert find_unpicklable({"fine": [1, 2]}, "x") is None


def _shipped_pair(device: str) -> tuple[Any, Any]:
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4)).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    model(torch.randn(5, 3, device=device)).sum().backward()
    opt.step()
    job = pickle.loads(dumps_host({"model": model, "optimizer": opt}))
    return job["model"], job["optimizer"]


def test_the_shipped_optimizer_still_refers_to_the_shipped_models_parameters() -> None:
    model, opt = _shipped_pair("cpu")
    assert [id(p) for p in model.parameters()] == [
        id(p) for g in opt.param_groups for p in g["params"]
    ]
    assert all(id(p) in {id(q) for q in model.parameters()} for p in opt.state)


@pytest.mark.gpu
def test_gpu_tensors_are_shipped_as_cpu_tensors_with_identity_kept() -> None:
    model, opt = _shipped_pair("cuda")
    assert all(t.device.type == "cpu" for t in model.state_dict().values())
    assert all(isinstance(p, torch.nn.Parameter) and p.requires_grad for p in model.parameters())
    assert all(
        v.device.type == "cpu"
        for s in opt.state.values()
        for v in s.values()
        if isinstance(v, torch.Tensor)
    )
    assert [id(p) for p in model.parameters()] == [
        id(p) for g in opt.param_groups for p in g["params"]
    ]


def test_a_job_the_ranks_could_not_train_is_refused_before_anything_starts() -> None:
    from adaptive_nb.engine.ddp import DDPEngine

    model = torch.nn.Linear(2, 1)
    other = torch.nn.Linear(2, 1)
    data = [(torch.randn(4, 2), torch.randn(4, 1))]

    def step(m: Any, b: Any) -> Any:
        return m(b[0]).mean()

    opt = torch.optim.SGD([*model.parameters(), *other.parameters()], lr=0.1)
    with pytest.raises(UsageError, match=r"updates 2 tensor.*not parameters of `model`"):
        DDPEngine(step, model=model, optimizer=opt, data=data)
    good = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(UsageError, match="world_size must be"):
        DDPEngine(step, model=model, optimizer=good, data=data, world_size=0)
    with pytest.raises(UsageError, match="pass a function"):
        DDPEngine("step", model=model, optimizer=good, data=data)  # type: ignore[arg-type]
    with pytest.raises(UsageError, match="device_ids has 1 entries for 2 ranks"):
        DDPEngine(step, model=model, optimizer=good, data=data, device_ids=[0])
