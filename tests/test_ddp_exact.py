"""DDP engine, exact training: on 3 CPU ranks (gloo) the gradients of every step and the
parameters after several steps equal a single-process full-batch loop, under uneven
splits (5/3/1 of 9) and splits with a zero share, with SGD and Adam, from a list of
batches and from a shuffled DataLoader, with SyncBatchNorm and with micro-batches. One
worker group serves the whole module (each test ships its own job to it)."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from ddp_support import group_of, reference_steps, worker_children
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from adaptive_nb.engine.ddp import DDPEngine, WorkerGroup
from adaptive_nb.errors import UsageError
from adaptive_nb.layout import Plan

pytestmark = pytest.mark.timeout(300)

W = 3


@pytest.fixture(scope="module")
def group() -> Iterator[WorkerGroup]:
    with group_of(W) as g:
        yield g
    assert worker_children() == []


def classify(model: nn.Module, batch: Any) -> torch.Tensor:
    x, y = batch
    return F.cross_entropy(model(x), y)


def mlp(seed: int = 0, bn: bool = False) -> nn.Module:
    torch.manual_seed(seed)
    layers: list[nn.Module] = [nn.Linear(6, 16)]
    if bn:
        layers.append(nn.BatchNorm1d(16))
    layers += [nn.Tanh(), nn.Linear(16, 3)]
    return nn.Sequential(*layers)


def batches(n: int, size: int = 9, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(size, 6, generator=g), torch.randint(0, 3, (size,), generator=g))
        for _ in range(n)
    ]


def plan(sizes: tuple[int, ...], micro: int = 1) -> Plan:
    total = sum(sizes)
    return Plan(tuple(range(len(sizes))), tuple(s / total for s in sizes), micro, total)


OPTIMIZERS = {
    "sgd": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9),
    "adam": lambda ps: torch.optim.Adam(ps, lr=0.01),
}


def run_engine(
    group: WorkerGroup,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    data: Any,
    split: tuple[int, ...],
    *,
    micro: int = 1,
    **kwargs: Any,
) -> tuple[list[dict[int, dict[str, torch.Tensor | None]]], list[float], DDPEngine]:
    engine = DDPEngine(classify, model=model, optimizer=optimizer, data=data, group=group, **kwargs)
    engine.apply_plan(plan(split, micro))
    engine.start()
    grads, losses = [], []
    try:
        for token in engine.iter_batches(data, 1):
            out = engine.forward_backward(None, token)
            grads.append(engine.gradients())
            losses.append(float(out.loss))
            engine.optimizer_step()
    finally:
        engine.close()
    return grads, losses, engine


def assert_same_grads(
    got: list[dict[int, dict[str, torch.Tensor | None]]], want: list[dict[str, torch.Tensor]]
) -> None:
    assert len(got) == len(want)
    for step, (per_rank, ref) in enumerate(zip(got, want, strict=True)):
        assert sorted(per_rank) == list(range(W))
        for rank, grads in per_rank.items():
            for name, g in ref.items():
                mine = grads[name]
                assert mine is not None, (step, rank, name)
                torch.testing.assert_close(
                    mine, g, rtol=1e-5, atol=1e-6, msg=f"step {step} rank {rank} {name}"
                )


@pytest.mark.parametrize("opt", sorted(OPTIMIZERS))
@pytest.mark.parametrize("split", [(5, 3, 1), (6, 0, 3), (0, 4, 5)], ids=str)
def test_uneven_and_zero_shares_give_the_full_batch_gradient(
    group: WorkerGroup, opt: str, split: tuple[int, ...]
) -> None:
    data = batches(4)
    ref_model = mlp()
    ref_opt = OPTIMIZERS[opt](ref_model.parameters())
    want_grads, want_losses = reference_steps(classify, ref_model, ref_opt, data)

    model = mlp()
    optimizer = OPTIMIZERS[opt](model.parameters())
    grads, losses, engine = run_engine(group, model, optimizer, data, split)

    assert_same_grads(grads, want_grads)
    assert losses == pytest.approx(want_losses, rel=1e-5)
    for (name, p), q in zip(model.named_parameters(), ref_model.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)
    # the optimizer state came home too: the next step matches the reference's next step
    ref_state = ref_opt.state_dict()["state"]
    got_state = optimizer.state_dict()["state"]
    assert sorted(got_state) == sorted(ref_state)
    for k in ref_state:
        for key, value in ref_state[k].items():
            torch.testing.assert_close(got_state[k][key], value, rtol=1e-5, atol=1e-6)
    assert engine.applied == len(data)


def test_a_shuffled_dataloader_is_walked_in_the_kernel_and_loaded_by_the_ranks(
    group: WorkerGroup,
) -> None:
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(25, 6, generator=g), torch.randint(0, 3, (25,), generator=g)
    ds = TensorDataset(x, y)

    def loader() -> DataLoader[Any]:
        return DataLoader(
            ds, batch_size=9, shuffle=True, generator=torch.Generator().manual_seed(7)
        )

    ref_model = mlp()
    ref_opt = torch.optim.SGD(ref_model.parameters(), lr=0.1)
    want_grads, want_losses = reference_steps(classify, ref_model, ref_opt, list(loader()))
    assert [len(b[1]) for b in loader()] == [9, 9, 7]

    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    grads, losses, _ = run_engine(group, model, optimizer, loader(), (4, 4, 1))
    assert_same_grads(grads, want_grads)
    assert losses == pytest.approx(want_losses, rel=1e-5)
    for p, q in zip(model.parameters(), ref_model.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_sync_bn_on_cpu_ranks_is_refused_before_anything_runs() -> None:
    model = mlp(bn=True)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    before = {p.pid for p in worker_children()}
    with pytest.raises(UsageError, match="sync_bn=True needs one GPU per rank"):
        DDPEngine(classify, model=model, optimizer=optimizer, data=batches(1), sync_bn=True)
    assert {p.pid for p in worker_children()} == before


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
@pytest.mark.parametrize("split", [(5, 4), (9, 0)], ids=str)
def test_sync_bn_matches_full_batch_batch_norm_on_gpus(split: tuple[int, ...]) -> None:
    data = batches(3)
    ref_model = mlp(bn=True)
    ref_opt = torch.optim.SGD(ref_model.parameters(), lr=0.1)
    want_grads, _ = reference_steps(classify, ref_model, ref_opt, data)

    model = mlp(bn=True)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    engine = DDPEngine(
        classify, model=model, optimizer=optimizer, data=data, sync_bn=True, device_ids=[0, 1]
    )
    engine.apply_plan(plan(split))
    engine.start()
    try:
        for token, want in zip(engine.iter_batches(data, 1), want_grads, strict=True):
            engine.forward_backward(None, token)
            for grads in engine.gradients().values():
                for name, g in want.items():
                    torch.testing.assert_close(grads[name], g, rtol=1e-4, atol=1e-5)
            engine.optimizer_step()
    finally:
        engine.close()
    ref_state = ref_model.state_dict()
    for name, value in model.state_dict().items():  # running statistics included
        torch.testing.assert_close(value, ref_state[name], rtol=1e-4, atol=1e-5, msg=name)


def test_micro_batches_accumulate_to_the_full_batch_gradient(group: WorkerGroup) -> None:
    data = batches(3, size=12)
    ref_model = mlp()
    ref_opt = torch.optim.Adam(ref_model.parameters(), lr=0.01)
    want_grads, want_losses = reference_steps(classify, ref_model, ref_opt, data)

    model = mlp()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    grads, losses, _ = run_engine(group, model, optimizer, data, (7, 4, 1), micro=3)
    assert_same_grads(grads, want_grads)
    assert losses == pytest.approx(want_losses, rel=1e-5)


def test_batch_norm_with_uneven_micro_batches_keeps_the_ranks_in_step(group: WorkerGroup) -> None:
    """Buffers make DDP broadcast at a rank's first forward of a step; ranks running
    different numbers of micro-batches (3, 3 and one empty piece here) must still call the
    same collectives: the run completes and every rank holds the same gradient."""
    data = batches(3, size=12)
    model = mlp(bn=True)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    grads, _, engine = run_engine(group, model, optimizer, data, (6, 6, 0), micro=3)
    assert engine.applied == 3
    assert [engine.last_replies[r]["pieces"] for r in range(3)] == [3, 3, 1]
    for per_rank in grads:
        for name, g in per_rank[0].items():
            for rank in (1, 2):
                other = per_rank[rank][name]
                assert g is not None and other is not None
                torch.testing.assert_close(other, g, rtol=0, atol=0, msg=name)


def test_learning_rate_set_in_the_kernel_reaches_the_ranks(group: WorkerGroup) -> None:
    """A scheduler steps the kernel's optimizer; the ranks step with its learning rate."""
    data = batches(3)
    ref_model = mlp()
    ref_opt = torch.optim.SGD(ref_model.parameters(), lr=0.1)
    ref_sched = torch.optim.lr_scheduler.StepLR(ref_opt, step_size=1, gamma=0.5)
    for batch in data:
        ref_opt.zero_grad()
        classify(ref_model, batch).backward()  # type: ignore[no-untyped-call]
        ref_opt.step()
        ref_sched.step()

    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    engine = DDPEngine(classify, model=model, optimizer=optimizer, data=data, group=group)
    engine.start()
    try:
        for token in engine.iter_batches(data, 1):
            engine.forward_backward(None, token)
            engine.optimizer_step()
            sched.step()
    finally:
        engine.close()
    for p, q in zip(model.parameters(), ref_model.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_clip_grad_norm_clips_the_full_batch_gradient_on_the_ranks(group: WorkerGroup) -> None:
    data = batches(3)
    ref_model = mlp()
    ref_opt = torch.optim.SGD(ref_model.parameters(), lr=0.5)
    norms = []
    for batch in data:
        ref_opt.zero_grad()
        classify(ref_model, batch).backward()  # type: ignore[no-untyped-call]
        norms.append(float(nn.utils.clip_grad_norm_(ref_model.parameters(), 0.05)))
        ref_opt.step()
    assert min(norms) > 0.05  # the clip acts on every step

    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    run_engine(group, model, optimizer, data, (5, 0, 4), clip_grad_norm=0.05)
    for p, q in zip(model.parameters(), ref_model.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_kernel_model_is_untouched_until_close(group: WorkerGroup) -> None:
    data = batches(2)
    model = mlp()
    before = copy.deepcopy(model.state_dict())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    engine = DDPEngine(classify, model=model, optimizer=optimizer, data=data, group=group)
    engine.start()
    try:
        for token in engine.iter_batches(data, 1):
            engine.forward_backward(None, token)
            engine.optimizer_step()
        for name, value in model.state_dict().items():
            assert torch.equal(value, before[name]), name
    finally:
        engine.close()
    assert not torch.equal(model.state_dict()["0.weight"], before["0.weight"])
