"""A retried step equals one clean step bit for bit: after an out-of-memory in forward or
backward (batch-norm statistics, gradients of parameters outside the optimizer) and in
``optimizer.step()`` (parameters and optimizer state). CPU only: the engines and
optimizers here fail on purpose, the way a CUDA out-of-memory would."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from adaptive_nb.engine.cpu import CpuEngine
from adaptive_nb.errors import OutOfMemory
from adaptive_nb.events import Event, EventKind
from adaptive_nb.monitor.snapshot import Snapshot
from adaptive_nb.plan.base import Controller
from adaptive_nb.run import loop
from adaptive_nb.run.attempt import apply_optimizer_step, forward_backward
from adaptive_nb.run.rollback import StepRollback
from adaptive_nb.step import StepFn, StepOutcome


class BnNet(nn.Module):
    """A small CNN with batch norm; ``head.bias`` is left out of the optimizer."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.head = nn.Linear(4 * 6 * 6, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.bn(self.conv(x))).flatten(1))


def bn_step(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = batch
    return nn.functional.cross_entropy(model(x), y)


def bn_data(steps: int = 3) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(3)
    return [
        (torch.randn(8, 3, 6, 6, generator=g), torch.randint(0, 5, (8,), generator=g))
        for _ in range(steps)
    ]


def bn_model_and_optimizer() -> tuple[BnNet, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = BnNet()
    owned = [p for name, p in model.named_parameters() if name != "head.bias"]
    return model, torch.optim.SGD(owned, lr=0.1, momentum=0.9)


class FailingForwardEngine(CpuEngine):
    """On the first attempt of step ``fail_step`` runs forward (batch-norm statistics move)
    and backward (gradients accumulate) and only then runs out of memory."""

    def __init__(self, fail_step: int) -> None:
        super().__init__()
        self.fail_step = fail_step
        self.calls = 0
        self.failed = False

    def forward_backward(self, step: StepFn, batch: Any) -> StepOutcome:
        self.calls += 1
        if self.calls == self.fail_step and not self.failed:
            self.failed = True
            assert self._model is not None
            step(self._model, batch).backward()  # type: ignore[no-untyped-call]
            raise OutOfMemory("CUDA out of memory (simulated, after backward)", device=0)
        return super().forward_backward(step, batch)


class Retry(Controller):
    """Recovers every out-of-memory (the retry itself is what is under test)."""

    def observe(self, outcome: StepOutcome) -> None:
        pass

    def tick(self, now: float, step: int, snapshot: Snapshot | None) -> list[Event]:
        return []

    def on_oom(self, error: OutOfMemory, now: float, step: int) -> list[Event]:
        return [Event(now, EventKind.OOM, "retrying", step)]


def _train(engine: CpuEngine, data: list[Any]) -> tuple[BnNet, torch.optim.Optimizer, Any]:
    model, opt = bn_model_and_optimizer()
    run = loop.Run(
        bn_step,
        model=model,
        optimizer=opt,
        data=data,
        epochs=None,
        steps=len(data),
        engine=engine,
        controller=Retry(),
        snapshots=None,
        policy="adaptive",
        headroom=0.1,
        handle_interrupt=False,
    )
    return model, opt, run.execute()


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    out = {f"param {k}": v.detach().clone() for k, v in model.named_parameters()}
    out.update(
        {f"grad {k}": v.grad.clone() for k, v in model.named_parameters() if v.grad is not None}
    )
    out.update({f"buffer {k}": v.clone() for k, v in model.named_buffers()})
    return out


def _assert_bitwise_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), f"{key} differs"


def test_retry_after_oom_in_backward_equals_a_clean_run_bit_for_bit() -> None:
    data = bn_data(3)
    clean, _, _ = _train(CpuEngine(), data)
    retried, _, report = _train(FailingForwardEngine(fail_step=2), data)
    assert report.summary["oom_recovered"] == 1 and report.summary["steps"] == 3
    assert int(retried.bn.num_batches_tracked) == 3  # not 4: the failed forward is undone
    _assert_bitwise_equal(_state(retried), _state(clean))


def test_rollback_restores_buffers_in_place_and_foreign_gradients() -> None:
    model, opt = bn_model_and_optimizer()
    x, y = bn_data(1)[0]
    bn_step(model, (x, y)).backward()  # an earlier step left a gradient on head.bias
    opt.zero_grad(set_to_none=True)
    earlier_bias_grad = model.head.bias.grad.clone()  # type: ignore[union-attr]
    reference = copy.deepcopy(model)  # (deepcopy leaves gradients behind: copy them)
    reference.head.bias.grad = earlier_bias_grad.clone()
    running_mean = model.bn.running_mean
    attempts = 0

    def run_step() -> StepOutcome:
        nonlocal attempts
        attempts += 1
        loss = bn_step(model, (x, y))
        loss.backward()  # type: ignore[no-untyped-call]
        if attempts == 1:
            raise OutOfMemory("simulated")
        return StepOutcome(loss=loss.detach(), samples=8, wall_s=0.0)

    forward_backward(
        run_step,
        lambda: opt.zero_grad(set_to_none=True),
        on_oom=lambda err: [],
        on_device_failure=lambda err: [],
        rollback=StepRollback(model, opt),
    )
    bn_step(reference, (x, y)).backward()  # one clean step from the same start
    reference_grads = {n: p.grad for n, p in reference.named_parameters()}
    assert model.bn.running_mean is running_mean  # restored in place, references stay valid
    _assert_bitwise_equal(_state(model), _state(reference))
    bias_grad = model.head.bias.grad
    assert bias_grad is not None and reference_grads["head.bias"] is not None
    assert not torch.equal(bias_grad, earlier_bias_grad)  # the step did add its gradient


def test_a_model_without_buffers_or_foreign_parameters_copies_nothing() -> None:
    model = nn.Linear(3, 2)
    rollback = StepRollback(model, torch.optim.SGD(model.parameters(), lr=0.1))
    rollback.take()
    assert rollback._buffers == [] and rollback._grads == []


# -- out of memory in optimizer.step() ----------------------------------------------------


class OomOnceAdam(torch.optim.Adam):
    """Adam whose first ``fail`` calls update the first parameter and create its state (as a
    real step has done by the time it runs out of memory), then raise a CUDA OOM."""

    def __init__(self, params: Any, fail: int = 1, **kw: Any) -> None:
        super().__init__(params, **kw)
        self.fail = fail
        self.calls = 0

    @torch.no_grad()  # type: ignore[misc]
    def step(self, closure: Any = None) -> Any:  # type: ignore[override]
        self.calls += 1
        if self.calls <= self.fail:
            first = self.param_groups[0]["params"][0]
            self.state[first]["exp_avg"] = torch.ones_like(first)
            first.add_(1.0)  # half-applied
            raise torch.cuda.OutOfMemoryError(
                "CUDA out of memory. Tried to allocate 20.00 MiB. GPU 0 has a total capacity"
            )
        return super().step(closure)


def _linear_with_grads(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
    x = torch.randn(5, 4)
    model(x).pow(2).mean().backward()
    return model


def _optimizer_state(opt: torch.optim.Optimizer) -> list[dict[str, torch.Tensor]]:
    return [
        {k: v.clone() for k, v in opt.state[p].items()}
        for g in opt.param_groups
        for p in g["params"]
    ]


def test_oom_in_the_first_optimizer_step_is_retried_exactly() -> None:
    clean = _linear_with_grads()
    clean_opt = torch.optim.Adam(clean.parameters(), lr=0.01)
    clean_opt.step()
    model = _linear_with_grads()
    opt = OomOnceAdam(model.parameters(), fail=1, lr=0.01)
    heard: list[OutOfMemory] = []
    recovered = apply_optimizer_step(opt, on_oom=heard.append)
    assert recovered == 1 and opt.calls == 2 and len(heard) == 1
    assert "emptied the allocator cache" in str(heard[0])
    for a, b in zip(model.parameters(), clean.parameters(), strict=True):
        assert torch.equal(a, b)
    for sa, sb in zip(_optimizer_state(opt), _optimizer_state(clean_opt), strict=True):
        assert sa.keys() == sb.keys()
        assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_second_oom_switches_to_per_parameter_updates() -> None:
    model = _linear_with_grads()
    opt = OomOnceAdam(model.parameters(), fail=2, lr=0.01)
    assert apply_optimizer_step(opt) == 2
    assert opt.param_groups[0]["foreach"] is False


def test_an_optimizer_step_that_never_fits_stops_with_nothing_applied() -> None:
    model = _linear_with_grads()
    before = [p.detach().clone() for p in model.parameters()]
    opt = OomOnceAdam(model.parameters(), fail=10, lr=0.01)
    with pytest.raises(OutOfMemory, match="Nothing was applied") as err:
        apply_optimizer_step(opt)
    assert "tried: emptied the allocator cache; switched to per-parameter" in str(err.value)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), before, strict=True))
    assert len(opt.state) == 0  # the state the failed step began is gone


def test_an_oom_in_an_uncopied_later_optimizer_step_stops_and_says_why() -> None:
    """A later step that is not copied (here: parameters in host memory) stops the run on
    an out-of-memory and says the update may be partly applied (see
    test_optimizer_step_oom for the copied case, which recovers exactly)."""
    model = _linear_with_grads()
    opt = OomOnceAdam(model.parameters(), fail=0, lr=0.01)
    apply_optimizer_step(opt)
    apply_optimizer_step(opt)
    opt.fail = opt.calls + 1
    with pytest.raises(OutOfMemory, match="may be partly applied"):
        apply_optimizer_step(opt)


def test_errors_that_are_not_out_of_memory_pass_unchanged() -> None:
    model = _linear_with_grads()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)

    def broken() -> None:
        raise ValueError("the user's own bug")

    with pytest.raises(ValueError, match="own bug"):
        apply_optimizer_step(opt, step=broken)


def test_giving_up_leaves_the_model_as_before_and_says_what_was_tried() -> None:
    model, opt = bn_model_and_optimizer()
    x, y = bn_data(1)[0]
    before = _state(model)

    def always_oom() -> StepOutcome:
        bn_step(model, (x, y)).backward()  # type: ignore[no-untyped-call]
        raise OutOfMemory("CUDA out of memory. Tried to allocate 1 GiB", device=0)

    replans = iter(f"plan {i}" for i in range(100))

    def replan(err: OutOfMemory) -> list[Event]:
        return [Event(0.0, EventKind.OOM, next(replans), 0)]

    with pytest.raises(OutOfMemory, match="after 8 retries") as err:
        forward_backward(
            always_oom,
            lambda: opt.zero_grad(set_to_none=True),
            on_oom=replan,
            on_device_failure=lambda e: [],
            rollback=StepRollback(model, opt),
        )
    message = str(err.value)
    assert (
        message.startswith("CUDA out of memory")
        and "Tried: plan 4; plan 5; plan 6; plan 7" in message
    )
    assert "not applied" in message and err.value.device == 0
    _assert_bitwise_equal(_state(model), before)

    def cannot_replan(e: OutOfMemory) -> list[Event]:
        raise e

    with pytest.raises(OutOfMemory, match="no plan left that fits") as err:
        forward_backward(
            always_oom,
            lambda: opt.zero_grad(set_to_none=True),
            on_oom=cannot_replan,
            on_device_failure=lambda e: [],
            rollback=StepRollback(model, opt),
        )
    assert "Tried: nothing (the controller could not re-plan)" in str(err.value)
    _assert_bitwise_equal(_state(model), before)


def test_the_rollback_cost_script_runs(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parent.parent / "benchmarks"))
    import rollback_cost

    rollback_cost.main(repeats=2)
    out = capsys.readouterr().out
    assert "6 buffers" in out and "StepRollback.take()" in out and "% of a step" in out


def test_a_buffer_the_failed_attempt_replaced_is_put_back() -> None:
    model, opt = bn_model_and_optimizer()
    rollback = StepRollback(model, opt)
    original = model.bn.running_var
    before = original.clone()
    for _ in range(3):  # later takes reuse the first walk
        rollback.take()
    model.bn.running_var = torch.full((4,), 7.0)  # the attempt swapped the tensor
    original.add_(1.0)
    rollback.restore()
    assert model.bn.running_var is original and torch.equal(original, before)
    model.bn.running_var = torch.full((4,), 3.0)  # a step that swaps it for good
    rollback.take()  # notices the kept buffer is gone and walks the model again
    model.bn.running_var.add_(1.0)
    rollback.restore()
    assert torch.equal(model.bn.running_var, torch.full((4,), 3.0))
