"""One DDP rank's step, in this process (a gloo group of one): what the step function is
given, what the rank measures, and that the scalar the ranks reduce to learn whether all of
them completed a step stays out of the user's model, its state and its gradients."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from adaptive_nb.engine.ddp.data import describe_data, iter_tokens
from adaptive_nb.engine.ddp.launcher import free_port
from adaptive_nb.engine.ddp.rank import RankJob, _buffers_of


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(4, 3)
        self.norm = nn.BatchNorm1d(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.body(x))


@pytest.fixture
def one_rank(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _job(seen: list[Any]) -> tuple[RankJob, list[Any], nn.Module]:
    torch.manual_seed(0)
    model = Net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(8, 4, generator=g), torch.randint(0, 3, (8,), generator=g))]

    def step(m: nn.Module, batch: Any) -> torch.Tensor:
        seen.append(m)
        x, y = batch
        return F.cross_entropy(m(x), y)

    job = RankJob(
        {"step": step, "model": model, "optimizer": optimizer, "data": describe_data(data)},
        0,
        1,
    )
    return job, data, model


def test_the_step_gets_ddp_over_the_users_own_module(one_rank: None) -> None:
    seen: list[Any] = []
    job, data, model = _job(seen)
    token = next(iter(iter_tokens(data, 1)))
    done = job.forward_backward(token)
    assert isinstance(seen[0], nn.parallel.DistributedDataParallel)
    assert seen[0].module is model  # ``model.module`` is what the user built
    assert done["batch"] == 8 and done["pieces"] == 1
    assert done["forward_s"] > 0 and done["backward_s"] > 0 and done["wait_s"] >= 0
    assert job.all_ok  # the one rank completed the step


def test_the_completion_scalar_stays_out_of_state_and_gradients(one_rank: None) -> None:
    job, data, model = _job([])
    names = {name for name, _ in model.named_parameters()}
    token = next(iter(iter_tokens(data, 1)))
    job.forward_backward(token)
    grads = job.gradients()
    assert set(grads) == names and all(g is not None for g in grads.values())
    job.apply(None)
    state = job.state()
    assert set(state["model"]) == set(model.state_dict())
    assert len(state["optimizer"]["param_groups"][0]["params"]) == len(names)


def test_the_gradient_is_the_plain_loss_gradient(one_rank: None) -> None:
    """The completion term adds nothing to the model's gradient (its value is 0)."""
    job, data, _ = _job([])
    token = next(iter(iter_tokens(data, 1)))
    job.forward_backward(token)
    got = job.gradients()
    torch.manual_seed(0)
    reference = Net()
    x, y = data[0]
    F.cross_entropy(reference(x), y).backward()
    for name, p in reference.named_parameters():
        assert p.grad is not None
        torch.testing.assert_close(got[name], p.grad, rtol=0, atol=1e-6)


def test_the_buffer_walk_matches_module_buffers() -> None:
    """The rank's per-step walk saves the buffers ``module.buffers()`` names, in its order,
    each once (a module shared by two parents included)."""
    shared = nn.BatchNorm1d(4)
    nested = nn.Sequential(nn.Linear(2, 3), nn.BatchNorm1d(3), nn.Sequential(nn.BatchNorm1d(3)))
    tree = nn.ModuleList([shared, nested, nn.Linear(1, 1), shared])
    tree.register_buffer("own", torch.zeros(1))
    for module in (tree, nested, nn.Linear(2, 2)):
        walked, expected = _buffers_of(module), list(module.buffers())
        assert len(walked) == len(expected)
        assert all(a is b for a, b in zip(walked, expected, strict=True))
