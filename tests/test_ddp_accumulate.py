"""DDP engine with gradient accumulation (``accumulate=k``: one optimizer step per k loader
batches) on 3 CPU ranks (gloo): each group is one rank step whose pieces are its batches'
slices, so the parameters after every step equal a plain single-process loop that
accumulates the same batches (batch i's mean loss weighted by b_i/Σb), under uneven shares
(5/3/1, then a new plan), with batches of different sizes, a short last group at the epoch
end, the step sent ahead (run-ahead) being the next group, and an out-of-memory on one rank
in the middle of a group (the whole group is retried, nothing lost or doubled); the
``train(engine="ddp", accumulate=3)`` path with its callbacks and summary, and with an
out-of-memory the controller re-plans around over a shuffled DataLoader; the token stream
announcing whole groups. The reference loop below shares no code with adaptive_nb."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from ddp_support import accumulation_reference as reference
from ddp_support import group_of, labelled_batches, worker_children
from torch import nn

import adaptive_nb
from adaptive_nb.engine.ddp import BatchToken, DDPEngine, WorkerGroup
from adaptive_nb.errors import OutOfMemory
from adaptive_nb.layout import Plan

pytestmark = pytest.mark.timeout(300)

W = 3
K = 3
SIZES = (9, 7, 9, 12, 5, 9, 9, 8)  # 8 batches: groups of 3, 3 and a short last one of 2


@pytest.fixture(scope="module")
def group() -> Iterator[WorkerGroup]:
    with group_of(W) as g:
        yield g
    assert worker_children() == []


def classify(model: nn.Module, batch: Any) -> torch.Tensor:
    x, y = batch
    return F.cross_entropy(model(x), y)


def classify_small_rank1(model: nn.Module, batch: Any) -> torch.Tensor:
    """Rank 1 'runs out of memory' above 4 samples in a piece (a memory limit)."""
    x, y = batch
    if dist.is_initialized() and dist.get_rank() == 1 and x.shape[0] > 4:
        raise torch.OutOfMemoryError(f"CUDA out of memory: tried {x.shape[0]} samples")
    return F.cross_entropy(model(x), y)


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))


def batches(sizes: Sequence[int] = SIZES, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return labelled_batches(sizes, seed)


def plan(sizes: tuple[int, ...]) -> Plan:
    total = sum(sizes)
    return Plan(tuple(range(len(sizes))), tuple(s / total for s in sizes), 1, total)


def groups_of(items: Sequence[Any], k: int) -> list[list[Any]]:
    return [list(items[i : i + k]) for i in range(0, len(items), k)]


def drive(
    engine: DDPEngine,
    data: Any,
    k: int,
    *,
    on_oom: Any = None,
    new_plan_after: tuple[int, Plan] | None = None,
) -> tuple[list[float], int]:
    """The engine over the data in groups of k tokens, each announced ahead (run-ahead),
    retried after an out-of-memory (``on_oom`` re-plans); the losses and the OOM count."""
    tokens: list[BatchToken] = list(engine.iter_batches(data, 1))
    grps = groups_of(tokens, k)
    losses, ooms = [], 0
    for i, grp in enumerate(grps):
        engine.expect_next(tuple(grps[i + 1]) if i + 1 < len(grps) else None)
        while True:
            try:
                out = engine.forward_backward(None, grp)
                break
            except OutOfMemory:
                ooms += 1
                on_oom()
        assert out.samples == sum(t.batch for t in grp)
        losses.append(float(out.loss))
        engine.optimizer_step()
        if new_plan_after is not None and i == new_plan_after[0]:
            engine.apply_plan(new_plan_after[1])
    return losses, ooms


def assert_same_params(model: nn.Module, ref: nn.Module) -> None:
    for (name, p), q in zip(model.named_parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)


def test_accumulated_groups_under_uneven_shares_equal_a_plain_accumulation_loop(
    group: WorkerGroup,
) -> None:
    data = batches()
    ref = mlp()
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
    want = reference(ref, ref_opt, data, K)

    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    engine = DDPEngine(
        classify,
        model=model,
        optimizer=optimizer,
        data=data,
        group=group,
        run_ahead=True,
        accumulate=K,
    )
    engine.apply_plan(plan((5, 3, 1)))
    engine.start()
    try:
        losses, ooms = drive(engine, data, K, new_plan_after=(0, plan((1, 2, 6))))
        logs = engine.rank_log()
    finally:
        engine.close()
    assert ooms == 0 and engine.applied == 3  # 8 batches: groups of 3, 3 and 2
    assert losses == pytest.approx(want, rel=1e-5)
    assert_same_params(model, ref)
    # every batch ran on every rank, in order (the last group short: 2 batches); the second
    # group had left ahead with the old plan, so the new plan ran it again (dropped first)
    for rank in range(W):
        assert [step for step, _ in logs[rank]] == [0, 1, 2, 3, 4, 5, 3, 4, 5, 6, 7]
    last = [dict(logs[rank]) for rank in range(W)]  # the attempt that was applied
    for step, size in enumerate(SIZES):
        assert sum(last[rank][step] for rank in range(W)) == size
    assert last[0][0] == 5 and last[2][0] == 1
    assert all(last[2][step] > last[0][step] for step in range(K, len(SIZES)))


def test_out_of_memory_inside_a_group_retries_the_whole_group_once(group: WorkerGroup) -> None:
    """Rank 1 runs out of memory on the second batch of the first group (the first one's
    gradient was accumulated under no_sync, the third never ran there); every rank drops
    the group, the step sent ahead is skipped everywhere, and the retry with a new plan
    applies the group once."""
    data = batches((9, 15, 9, 6, 6, 6))
    ref = mlp()
    ref_opt = torch.optim.Adam(ref.parameters(), lr=0.01)
    want = reference(ref, ref_opt, data, K)

    model = mlp()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    engine = DDPEngine(
        classify_small_rank1,
        model=model,
        optimizer=optimizer,
        data=data,
        group=group,
        run_ahead=True,
        accumulate=K,
    )
    engine.apply_plan(plan((1, 1, 1)))  # rank 1: 3, then 5 samples (> 4: out of memory)
    engine.start()
    try:
        losses, ooms = drive(engine, data, K, on_oom=lambda: engine.apply_plan(plan((5, 2, 8))))
        logs = engine.rank_log()
    finally:
        engine.close()
    assert ooms == 1 and engine.applied == 2
    assert losses == pytest.approx(want, rel=1e-5)
    assert_same_params(model, ref)
    # every rank: the first group tried, then all of it again with the new plan, then the
    # second group once (the one sent ahead never ran with the first failed)
    for rank in range(W):
        assert [step for step, _ in logs[rank]] == [0, 1, 2, 0, 1, 2, 3, 4, 5]
    assert logs[1][:3] == [(0, 3), (1, 5), (2, 3)]
    assert all(n <= 4 for _, n in logs[1][3:])


def test_train_with_accumulate_on_ddp_equals_a_plain_accumulation_loop() -> None:
    """train(engine="ddp", accumulate=3) over two epochs of 7 batches: groups never span
    an epoch (3, 3, 1 per epoch: 6 steps), callbacks once per step with the group's mean
    loss, the summary's accumulate, steps and samples."""
    sizes = (9, 9, 9, 9, 6, 9, 5)
    data = batches(sizes, seed=3)
    ref = mlp()
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    want = reference(ref, ref_opt, data, K) + reference(ref, ref_opt, data, K)

    class Losses:
        def __init__(self) -> None:
            self.seen: list[tuple[int, float]] = []

        def on_step_end(self, step: int, loss: float | None, history: Any) -> None:
            assert loss is not None
            self.seen.append((step, loss))

    calls = Losses()
    shared = {p.pid for p in worker_children()}  # the module's group, if it runs
    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    report = adaptive_nb.train(
        classify,
        model=model,
        optimizer=optimizer,
        data=data,
        epochs=2,
        devices="cpu",
        engine="ddp",
        workers=W,
        accumulate=K,
        callbacks=[calls],
        control_interval=0.05,
    )
    s = report.summary
    assert s["ended"] == "completed", s.get("events")
    assert s["accumulate"] == K and s["steps"] == 6 and s["samples"] == 2 * sum(sizes)
    assert [step for step, _ in calls.seen] == [1, 2, 3, 4, 5, 6]
    assert [loss for _, loss in calls.seen] == pytest.approx(want, rel=1e-4)
    assert_same_params(model, ref)
    assert {p.pid for p in worker_children()} <= shared  # the run's own ranks are gone


class _Announcing:
    """A token source that records what the stream announces (no processes)."""

    accumulate = K

    def __init__(self, n: int) -> None:
        self.n = n
        self.heard: list[Any] = []

    def iter_batches(self, data: Any, epochs: int | None = 1) -> Iterator[BatchToken]:
        return iter([BatchToken(i, 0, 4, i) for i in range(self.n)])

    def expect_next(self, token: BatchToken | None) -> None:
        self.heard.append(token)


def test_the_token_stream_announces_the_next_whole_group_within_the_epoch() -> None:
    """With accumulate=3 the step sent ahead must be the next group: the stream reads ahead
    and, at the last token of each group, announces the next group's tokens together (the
    short last group of the epoch too), then nothing (it never reads into the next epoch)."""
    from adaptive_nb.engine.ddp.data import StepToken, token_parts
    from adaptive_nb.run.ddp_backend import TokenEpochs

    source = _Announcing(7)
    stream = TokenEpochs(source, data=list(range(7)))
    seen = []
    for token in stream:  # the loop takes groups of 3: after each 3rd token, the next group
        seen.append(token.step)
        if len(seen) % K == 0 or len(seen) == 7:
            heard = source.heard[-1]
            nxt = list(range(len(seen), min(len(seen) + K, 7)))
            if not nxt:
                assert heard is None
            else:
                parts = token_parts(heard)[0] if isinstance(heard, StepToken) else (heard,)
                assert [t.step for t in parts] == nxt
    assert seen == list(range(7))
    assert len(source.heard) == 3  # once per group (3, 3, 1)


def test_train_with_accumulate_recovers_an_out_of_memory_through_the_controller() -> None:
    """train(engine="ddp", accumulate=3) over a shuffled DataLoader (two epochs of 7
    batches) whose rank 1 runs out of memory above 4 samples a piece: the controller plans
    a group as one global batch of its samples and re-plans after each out-of-memory, the
    loop retries the whole group, and the result equals a plain accumulation loop over the
    same shuffled order (the stream's read-ahead does not move the loader's RNG)."""
    from torch.utils.data import DataLoader, TensorDataset

    g = torch.Generator().manual_seed(5)
    dataset = TensorDataset(
        torch.randn(84, 6, generator=g), torch.randint(0, 3, (84,), generator=g)
    )

    def loader() -> DataLoader[Any]:
        return DataLoader(
            dataset, batch_size=12, shuffle=True, generator=torch.Generator().manual_seed(7)
        )

    ref = mlp()
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    ref_loader = loader()
    for _ in range(2):  # two epochs, each pass over the loader drawing as the run's does
        reference(ref, ref_opt, list(ref_loader), K)

    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    report = adaptive_nb.train(
        classify_small_rank1,
        model=model,
        optimizer=optimizer,
        data=loader(),
        epochs=2,
        devices="cpu",
        engine="ddp",
        workers=2,
        accumulate=K,
        control_interval=0.05,
    )
    s = report.summary
    assert s["ended"] == "completed", s.get("events")
    assert s["steps"] == 6 and s["samples"] == 2 * 84 and s["oom_recovered"] >= 1
    assert_same_params(model, ref)
