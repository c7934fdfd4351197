"""DDP engine, control and faults on a shared group of 2 CPU ranks: a new plan applies at
the same step on every rank (from the next step, or from a named later step); an
out-of-memory on one rank is raised only after every rank dropped the step, and the
retry with a shifted plan applies the step exactly once; closing mid-run brings home the
last completed step; the step's errors reach the kernel in the user's terms."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from ddp_support import group_of, reference_steps, worker_children
from torch import nn

from adaptive_nb.engine.ddp import DDPEngine, WorkerGroup
from adaptive_nb.errors import LossError, OutOfMemory
from adaptive_nb.layout import Plan

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def group() -> Iterator[WorkerGroup]:
    with group_of(2) as g:
        yield g
    assert worker_children() == []


def regress(model: nn.Module, batch: Any) -> torch.Tensor:
    x, y = batch
    return F.mse_loss(model(x), y)


def small_rank1(model: nn.Module, batch: Any) -> torch.Tensor:
    """Rank 1 'runs out of memory' above 2 samples (a memory limit, as a GPU has)."""
    x, y = batch
    if dist.get_rank() == 1 and x.shape[0] > 2:
        raise torch.OutOfMemoryError(f"CUDA out of memory: tried {x.shape[0]} samples")
    return F.mse_loss(model(x), y)


def net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 1))


def data(n: int, size: int = 8) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(2)
    return [
        (torch.randn(size, 3, generator=g), torch.randn(size, 1, generator=g)) for _ in range(n)
    ]


def split(a: int, b: int) -> Plan:
    return Plan((0, 1), (a / (a + b), b / (a + b)), 1, a + b)


def test_a_new_plan_applies_at_the_same_step_on_every_rank(group: WorkerGroup) -> None:
    batches = data(7)
    model = net()
    engine = DDPEngine(
        regress,
        model=model,
        optimizer=torch.optim.SGD(model.parameters(), 0.1),
        data=batches,
        group=group,
    )
    engine.apply_plan(split(6, 2))
    engine.start()
    try:
        tokens = list(engine.iter_batches(batches, 1))
        for token in tokens[:2]:
            engine.forward_backward(None, token)
            engine.optimizer_step()
        engine.apply_plan(split(3, 5))  # from the next step (2)
        engine.apply_plan(split(1, 7), from_step=5)  # announced ahead, for step 5 on
        for token in tokens[2:]:
            engine.forward_backward(None, token)
            engine.optimizer_step()
        logs = engine.rank_log()
    finally:
        engine.close()
    assert logs[0] == [(0, 6), (1, 6), (2, 3), (3, 3), (4, 3), (5, 1), (6, 1)]
    assert logs[1] == [(0, 2), (1, 2), (2, 5), (3, 5), (4, 5), (5, 7), (6, 7)]


def test_out_of_memory_on_one_rank_is_retried_by_all_ranks_exactly_once(
    group: WorkerGroup,
) -> None:
    batches = data(3)
    ref = net()
    ref_opt = torch.optim.Adam(ref.parameters(), lr=0.01)
    reference_steps(regress, ref, ref_opt, batches)

    model = net()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    engine = DDPEngine(small_rank1, model=model, optimizer=optimizer, data=batches, group=group)
    engine.start()  # the equal split gives rank 1 four samples: out of memory
    ooms = []
    try:
        for token in engine.iter_batches(batches, 1):
            while True:
                try:
                    out = engine.forward_backward(None, token)
                    break
                except OutOfMemory as err:
                    ooms.append((token.step, err.device))
                    # every rank has dropped the step's gradients already
                    assert all(
                        g is None
                        for per_rank in engine.gradients().values()
                        for g in per_rank.values()
                    )
                    engine.apply_plan(split(6, 2))  # what the controller's cap does
            assert out.device_batch == {0: 6, 1: 2}
            engine.optimizer_step()
        logs = engine.rank_log()
    finally:
        engine.close()
    assert ooms == [(0, 1)]
    assert logs[1] == [(0, 4), (0, 2), (1, 2), (2, 2)]  # step 0 tried twice, by both ranks
    assert logs[0] == [(0, 4), (0, 6), (1, 6), (2, 6)]
    assert engine.applied == 3
    for p, q in zip(model.parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_out_of_memory_under_run_ahead_skips_the_step_sent_ahead_on_every_rank(
    group: WorkerGroup,
) -> None:
    """Step 1 leaves with step 0's update while step 0 runs; rank 1 runs out of memory on
    step 0, so every rank learns it (the all-reduce after the last bucket) and skips step
    1 without applying step 0; the retry applies each step once."""
    batches = data(3)
    ref = net()
    ref_opt = torch.optim.Adam(ref.parameters(), lr=0.01)
    reference_steps(regress, ref, ref_opt, batches)

    model = net()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    engine = DDPEngine(
        small_rank1, model=model, optimizer=optimizer, data=batches, group=group, run_ahead=True
    )
    engine.start()
    tokens = list(engine.iter_batches(batches, 1))
    ooms = 0
    try:
        for i, token in enumerate(tokens):
            engine.expect_next(tokens[i + 1] if i + 1 < len(tokens) else None)
            while True:
                try:
                    engine.forward_backward(None, token)
                    break
                except OutOfMemory:
                    ooms += 1
                    engine.apply_plan(split(6, 2))
            engine.optimizer_step()
        logs = engine.rank_log()
    finally:
        engine.close()
    assert ooms == 1 and engine.applied == 3
    assert logs[1] == [(0, 4), (0, 2), (1, 2), (2, 2)]  # step 1 never ran with step 0 failed
    assert logs[0] == [(0, 4), (0, 6), (1, 6), (2, 6)]
    for p, q in zip(model.parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_the_allocation_controller_and_the_loops_retry_drive_the_engine(
    group: WorkerGroup,
) -> None:
    """The existing pieces, unchanged: AllocationController plans for the engine (its
    ``apply_plan``/``last_batch``), and run.attempt.forward_backward retries the same token
    after each out-of-memory the controller re-planned around (caps on rank 1)."""
    from adaptive_nb.plan.allocation import AllocationController
    from adaptive_nb.run.attempt import forward_backward

    batches = data(3)
    ref = net()
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    reference_steps(regress, ref, ref_opt, batches)

    model = net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    engine = DDPEngine(small_rank1, model=model, optimizer=optimizer, data=batches, group=group)
    controller = AllocationController(engine, snapshots=None)
    engine.prepare(model)
    recovered = 0
    try:
        for token in engine.iter_batches(batches, 1):
            outcome, ooms = forward_backward(
                lambda token=token: engine.forward_backward(None, token),
                lambda: None,
                on_oom=lambda e, step=token.step: controller.on_oom(e, 0.0, step),
                on_device_failure=lambda e, step=token.step: controller.on_device_failure(
                    e, 0.0, step
                ),
            )
            recovered += ooms
            controller.observe(outcome)
            assert outcome.samples == 8  # (rank 1 may now run its share as micro-batches)
            engine.optimizer_step()
    finally:
        engine.close()
    assert recovered >= 1 and engine.applied == 3
    for p, q in zip(model.parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_closing_mid_run_brings_home_the_last_completed_step(group: WorkerGroup) -> None:
    batches = data(5)
    ref = net()
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
    reference_steps(regress, ref, ref_opt, batches[:2])

    model = net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    engine = DDPEngine(regress, model=model, optimizer=optimizer, data=batches, group=group)
    engine.start()
    tokens = engine.iter_batches(batches, 1)
    for _ in range(2):
        engine.forward_backward(None, next(tokens))
        engine.optimizer_step()
    engine.forward_backward(None, next(tokens))  # a third step computed, never applied
    engine.close()  # (a stop request acts here: between steps, on every rank alike)
    for p, q in zip(model.parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    assert optimizer.state_dict()["state"].keys() == ref_opt.state_dict()["state"].keys()


def test_an_interrupted_wait_still_brings_home_the_last_completed_step(
    group: WorkerGroup, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ctrl-C while the kernel waits for a step: the ranks finish it, its replies are
    never read; close() skips them, loads the last completed step and ends the group
    (stale replies must not answer a later command)."""
    batches = data(4)
    ref = net()
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    reference_steps(regress, ref, ref_opt, batches[:2])

    model = net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    engine = DDPEngine(regress, model=model, optimizer=optimizer, data=batches, group=group)
    engine.start()
    tokens = list(engine.iter_batches(batches, 1))
    for token in tokens[:2]:
        engine.forward_backward(None, token)
        engine.optimizer_step()
    real_gather = group.gather

    def interrupted(*args: Any, **kwargs: Any) -> Any:
        monkeypatch.setattr(group, "gather", real_gather)
        raise KeyboardInterrupt

    monkeypatch.setattr(group, "gather", interrupted)
    with pytest.raises(KeyboardInterrupt):
        engine.forward_backward(None, tokens[2])
    engine.close()
    assert group.alive() == []
    for p, q in zip(model.parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def _ahead_loop(engine: DDPEngine, tokens: list[Any], start: int, stop: int) -> None:
    """What the run loop does with a run-ahead engine: tell the next token (sent ahead
    with the update), step."""
    for i in range(start, stop):
        engine.expect_next(tokens[i + 1] if i + 1 < len(tokens) else None)
        engine.forward_backward(None, tokens[i])
        engine.optimizer_step()


def test_a_plan_for_a_step_already_sent_ahead_runs_it_again_with_that_plan(
    group: WorkerGroup,
) -> None:
    batches = data(5)
    ref = net()
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
    reference_steps(regress, ref, ref_opt, batches)

    model = net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    engine = DDPEngine(
        regress, model=model, optimizer=optimizer, data=batches, group=group, run_ahead=True
    )
    engine.apply_plan(split(6, 2))
    engine.start()
    try:
        tokens = list(engine.iter_batches(batches, 1))
        _ahead_loop(engine, tokens, 0, 2)  # step 2 is on its way with the (6, 2) plan
        engine.apply_plan(split(3, 5))  # ... and must run with this one
        _ahead_loop(engine, tokens, 2, 5)
        logs = engine.rank_log()
    finally:
        engine.close()
    assert logs[0] == [(0, 6), (1, 6), (2, 6), (2, 3), (3, 3), (4, 3)]
    assert logs[1] == [(0, 2), (1, 2), (2, 2), (2, 5), (3, 5), (4, 5)]
    assert engine.applied == 5
    for p, q in zip(model.parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def bn_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 5), nn.BatchNorm1d(5), nn.Tanh(), nn.Linear(5, 1))


def test_a_step_sent_ahead_is_never_part_of_the_state_that_comes_home(
    group: WorkerGroup,
) -> None:
    """Its buffer updates (BatchNorm statistics) are not in a state read while it is on
    its way (a checkpoint), nor in what close() brings home when it was never asked for.
    Reference: equal shares, each rank's BatchNorm normalises its half; DDP broadcasts
    rank 0's buffers before every forward, so rank 0's statistics are the ones kept."""
    batches = data(4)
    model = bn_net()
    engine = DDPEngine(
        regress,
        model=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        data=batches,
        group=group,
        run_ahead=True,
    )
    engine.start()
    tokens = list(engine.iter_batches(batches, 1))
    try:
        _ahead_loop(engine, tokens, 0, 2)  # step 2 sent ahead
        engine.fetch_state()  # its replies are read and kept; the state is after step 1
        after_two = {k: v.clone() for k, v in model.state_dict().items()}
        _ahead_loop(engine, tokens, 2, 3)  # the step sent ahead, used as it is; step 3 sent
        assert engine.rank_log()[0][-1] == (3, 4)  # (read: step 3 ran, and was dropped)
    finally:
        engine.close()

    ref = bn_net()
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    for i, (x, y) in enumerate(batches[:3]):
        rank0 = copy.deepcopy(ref)
        rank0(x[:4])  # rank 0's statistics, from its half
        ref_opt.zero_grad()
        loss = (F.mse_loss(ref(x[:4]), y[:4]) + F.mse_loss(ref(x[4:]), y[4:])) / 2
        loss.backward()  # type: ignore[no-untyped-call]
        ref_opt.step()
        with torch.no_grad():
            kept = dict(rank0.named_buffers())
            for name, buf in ref.named_buffers():
                buf.copy_(kept[name])
        if i == 1:
            for name, value in ref.state_dict().items():
                torch.testing.assert_close(after_two[name], value, msg=name)
    for name, value in ref.state_dict().items():  # step 3's state, not the one sent ahead
        torch.testing.assert_close(model.state_dict()[name], value, msg=name)


def test_a_step_that_returns_no_tensor_is_a_loss_error(group: WorkerGroup) -> None:
    """Checked on the ranks, before backward; it reaches the kernel as LossError. The
    failed step ends the shared group (a rank may be left inside a collective); the next
    engine on it starts new processes. Runs last in this module."""
    batches = data(2)
    model = net()
    before = [p.detach().clone() for p in model.parameters()]
    engine = DDPEngine(
        lambda m, b: regress(m, b).item(),
        model=model,
        optimizer=torch.optim.SGD(model.parameters(), 0.1),
        data=batches,
        group=group,
    )
    engine.start()
    token = next(engine.iter_batches(batches, 1))
    with pytest.raises(LossError, match="not a loss tensor"):
        engine.forward_backward(None, token)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before, strict=True))
    assert group.alive() == []
    # the step fixed, the next engine on the same group starts it afresh
    fixed = DDPEngine(
        regress,
        model=model,
        optimizer=torch.optim.SGD(model.parameters(), 0.1),
        data=batches,
        group=group,
    )
    fixed.start()
    assert len(group.alive()) == 2 and len(group.pids) == 2
    fixed.forward_backward(None, token)
    fixed.optimizer_step()
    fixed.close()
    assert not all(torch.equal(p, q) for p, q in zip(model.parameters(), before, strict=True))
