"""An out-of-memory inside a *later* ``optimizer.step()`` (after the first has fitted),
raised half-way through the parameter groups: the step is never left half-applied. A copied
step (cheap copy, or the allocator gave memory back since the last step) recovers exactly;
a step that keeps failing stops with parameters and state exactly as after the last
completed step."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from torch import nn

import adaptive_nb.run.attempt as attempt
from adaptive_nb.errors import OutOfMemory
from adaptive_nb.run.attempt import apply_optimizer_step


class HalfwayOomAdam(torch.optim.Adam):
    """Adam over two parameter groups whose calls listed in ``fail_on`` really update the
    first group (parameters, moments, step counts) and then raise a CUDA out-of-memory,
    as torch's grouped update does when the second group's scratch does not fit."""

    def __init__(self, groups: Any, fail_on: set[int], **kw: Any) -> None:
        super().__init__(groups, **kw)
        self.fail_on = fail_on
        self.calls = 0

    @torch.no_grad()  # type: ignore[misc]
    def step(self, closure: Any = None) -> Any:  # type: ignore[override]
        self.calls += 1
        if self.calls not in self.fail_on:
            return super().step(closure)
        groups = self.param_groups
        self.param_groups = groups[:1]
        try:
            super().step(closure)  # the first group is updated in place
        finally:
            self.param_groups = groups
        raise torch.cuda.OutOfMemoryError(
            "CUDA out of memory. Tried to allocate 64.00 MiB. GPU 0 has a total capacity"
        )


@pytest.fixture
def on_gpu(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """The parameters count as on ``cuda:0`` (only GPU steps are copied after the first;
    the tensors stay on the CPU) with an allocator reserve the test sets; emptying the
    cache does nothing."""
    reserved = {"mb": 900}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda d=None: reserved["mb"])
    monkeypatch.setattr(attempt, "devices_of", lambda ts: [torch.device("cuda", 0)])
    monkeypatch.setattr(attempt, "_free_cache", lambda devices: None)
    return reserved


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))


def _groups(model: nn.Module) -> list[dict[str, Any]]:
    first, second = model[0], model[2]  # type: ignore[index]
    return [
        {"params": list(first.parameters())},
        {"params": list(second.parameters()), "lr": 0.02},
    ]


def _grads(model: nn.Module, k: int) -> None:
    g = torch.Generator().manual_seed(k)
    x = torch.randn(8, 6, generator=g)
    model.zero_grad(set_to_none=True)
    model(x).pow(2).mean().backward()


def _state(opt: torch.optim.Optimizer) -> list[dict[str, torch.Tensor]]:
    return [
        {k: v.clone() for k, v in opt.state[p].items()}
        for g in opt.param_groups
        for p in g["params"]
    ]


def _same(model: nn.Module, ref: nn.Module, opt: Any, ref_opt: Any) -> bool:
    params = all(
        torch.equal(a, b) for a, b in zip(model.parameters(), ref.parameters(), strict=True)
    )
    states = _state(opt), _state(ref_opt)
    return params and all(
        sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
        for sa, sb in zip(*states, strict=True)
    )


def test_a_later_step_that_runs_out_of_memory_half_way_is_retried_exactly(
    monkeypatch: pytest.MonkeyPatch, on_gpu: dict[str, int]
) -> None:
    # copies count as cheap whatever this busy machine's timing (the budget rule itself:
    # test_a_step_after_the_cache_was_released_is_copied_even_when_dear and test_exact_retry)
    monkeypatch.setattr(attempt, "GUARD_BUDGET", 1e9)
    model = _model()
    ref = copy.deepcopy(model)
    opt = HalfwayOomAdam(_groups(model), fail_on={3}, lr=0.01)
    ref_opt = torch.optim.Adam(_groups(ref), lr=0.01)
    heard: list[OutOfMemory] = []
    recovered = 0
    for k in range(5):
        _grads(model, k)
        _grads(ref, k)
        recovered += apply_optimizer_step(opt, on_oom=heard.append)
        ref_opt.step()
        assert _same(model, ref, opt, ref_opt), f"differs after step {k}"
    assert recovered == 1 and len(heard) == 1 and opt.calls == 6


def test_a_later_step_that_never_fits_stops_with_the_last_completed_step(
    monkeypatch: pytest.MonkeyPatch, on_gpu: dict[str, int]
) -> None:
    monkeypatch.setattr(attempt, "GUARD_BUDGET", 1e9)
    model = _model()
    opt = HalfwayOomAdam(_groups(model), fail_on=set(range(3, 20)), lr=0.01)
    for k in range(2):
        _grads(model, k)
        apply_optimizer_step(opt)
    after = copy.deepcopy(model)
    state = _state(opt)
    _grads(model, 2)
    with pytest.raises(OutOfMemory, match="Nothing was applied") as err:
        apply_optimizer_step(opt)
    assert "ran out of memory again" in str(err.value)
    assert all(
        torch.equal(a, b) for a, b in zip(model.parameters(), after.parameters(), strict=True)
    )
    for sa, sb in zip(_state(opt), state, strict=True):
        assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_a_step_after_the_cache_was_released_is_copied_even_when_dear(
    monkeypatch: pytest.MonkeyPatch, on_gpu: dict[str, int]
) -> None:
    """Copying costs more than the budget, but the allocator gave memory back since the
    last step (its reserve fell): the blocks the step's scratch used may be gone, so this
    step is copied and its out-of-memory recovered exactly."""
    reserved = on_gpu
    model = _model()
    ref = copy.deepcopy(model)
    opt = HalfwayOomAdam(_groups(model), fail_on={4, 5}, lr=0.01)
    ref_opt = torch.optim.Adam(_groups(ref), lr=0.01)
    for k in range(3):
        _grads(model, k)
        _grads(ref, k)
        apply_optimizer_step(opt)
        ref_opt.step()
    monkeypatch.setattr(attempt, "GUARD_BUDGET", 0.0)  # copies are now too dear
    _grads(model, 3)
    _grads(ref, 3)
    reserved["mb"] = 500  # an out-of-memory in forward/backward emptied the cache
    assert apply_optimizer_step(opt) == 2
    ref_opt.step()
    assert _same(model, ref, opt, ref_opt)


def test_host_memory_steps_are_not_copied_after_the_first() -> None:
    """Parameters in host memory: copying them would take the memory that ran short, so a
    later step is not copied, and an out-of-memory there says so."""
    model = _model()
    opt = HalfwayOomAdam(_groups(model), fail_on={3}, lr=0.01)
    for k in range(2):
        _grads(model, k)
        apply_optimizer_step(opt)
    _grads(model, 2)
    with pytest.raises(OutOfMemory, match="parameters in host memory"):
        apply_optimizer_step(opt)
