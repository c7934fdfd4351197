"""Train/eval modes and evaluation: the model trains in training mode (BatchNorm running
statistics advance) even when it was left in eval mode, evaluation runs in eval mode
without gradients every epoch or every N steps, and its time is kept out of the training
throughput."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from conftest import make_data, params_of, same_params
from run_support import static_run
from torch import nn

import adaptive_nb
from adaptive_nb.engine.cpu import CpuEngine
from adaptive_nb.events import EventKind
from adaptive_nb.plan.base import NullController
from adaptive_nb.run.report import RunReport
from adaptive_nb.run.training import check_training_options


def _bn_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3))


def _step(model: nn.Module, batch: Any) -> torch.Tensor:
    x, y = batch
    return nn.functional.cross_entropy(model(x), y)


def _states(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


VAL = make_data(n=32, batch=32, seed=1)[0]


def _evaluate(model: nn.Module) -> dict[str, float]:
    x, y = VAL
    out = model(x)
    return {
        "val_loss": float(nn.functional.cross_entropy(out, y)),
        "acc": float((out.argmax(1) == y).float().mean()),
    }


def test_a_model_left_in_eval_mode_trains_with_batch_norm_statistics_moving() -> None:
    data = make_data()
    ref = _bn_model()
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    ref.train()
    for x, y in data:
        ref_opt.zero_grad()
        nn.functional.cross_entropy(ref(x), y).backward()
        ref_opt.step()

    model = _bn_model()
    model.eval()  # e.g. left over from an evaluation cell
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    adaptive_nb.train(_step, model=model, optimizer=opt, data=data, devices="cpu", policy="static")
    assert int(model[1].num_batches_tracked) == len(data)
    assert _same_state(_states(ref), _states(model))
    assert model.training


def test_evaluation_every_epoch_in_eval_mode_without_grad_then_training_again() -> None:
    data = make_data()
    ref = _bn_model()
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    ref_metrics = []
    for _ in range(2):
        for x, y in data:
            ref_opt.zero_grad()
            nn.functional.cross_entropy(ref(x), y).backward()
            ref_opt.step()
        ref.eval()
        with torch.no_grad():
            ref_metrics.append(_evaluate(ref))
        ref.train()

    seen: list[tuple[bool, bool]] = []

    def evaluate(model: nn.Module) -> dict[str, float]:
        seen.append((model.training, torch.is_grad_enabled()))
        return _evaluate(model)

    model = _bn_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    report = adaptive_nb.train(
        _step,
        model=model,
        optimizer=opt,
        data=data,
        epochs=2,
        devices="cpu",
        policy="static",
        evaluate=evaluate,
    )
    assert seen == [(False, False), (False, False)]
    assert _same_state(_states(ref), _states(model))
    assert int(model[1].num_batches_tracked) == 2 * len(data)  # trained after the evaluation
    assert [e["metrics"] for e in report.evaluations] == ref_metrics
    assert [(e["step"], e["epoch"]) for e in report.evaluations] == [(6, 0), (12, 1)]
    assert report.summary["evaluations"] == 2 and report.summary["last_metrics"] == ref_metrics[-1]
    evals = [e for e in report.events if e.kind == EventKind.EVAL]
    assert [e.metrics for e in evals] == ref_metrics  # the numbers, not only their text
    assert all(e.metrics is None for e in report.events if e.kind != EventKind.EVAL)
    back = RunReport.from_json(report.to_json())
    assert back.evaluations == report.evaluations and back.events == report.events
    assert "Evaluations (2)" in report._repr_html_()


def test_eval_every_n_steps() -> None:
    model = _bn_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    report = adaptive_nb.train(
        _step,
        model=model,
        optimizer=opt,
        data=make_data(),
        epochs=2,
        devices="cpu",
        evaluate=_evaluate,
        eval_every=4,
    )
    assert [e["step"] for e in report.evaluations] == [4, 8, 12]


class TickingEngine(CpuEngine):
    """A CPU engine on a clock that advances 1 s per step and that evaluation advances."""

    def __init__(self) -> None:
        super().__init__()
        self.t = 0.0

    def clock(self) -> float:
        return self.t

    def forward_backward(self, step: Any, batch: Any) -> Any:
        self.t += 1.0
        return super().forward_backward(step, batch)


def test_evaluation_time_is_kept_out_of_the_throughput() -> None:
    engine = TickingEngine()

    def slow_evaluate(model: nn.Module) -> dict[str, float]:
        engine.t += 100.0
        return {"x": 1.0}

    model = _bn_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    options = check_training_options(optimizer=opt, device_kind="cpu", evaluate=slow_evaluate)
    run = static_run(
        _step, model, opt, make_data(), engine, options, epochs=2, controller=NullController()
    )
    s = run.execute().summary
    assert s["eval_s"] == 200.0 and s["wall_s"] == 212.0
    assert s["samples_per_s"] == pytest.approx(s["samples"] / 12.0)


@pytest.mark.parametrize(
    ("result", "message"),
    [
        ([0.5], "`bad_eval` returned a list.*dict of metric names"),
        ({"val_loss": "low"}, "`bad_eval` returned 'val_loss': str"),
        ({"val_loss": torch.ones(3)}, "`bad_eval` returned 'val_loss': Tensor"),
    ],
)
def test_an_evaluation_that_returns_no_metrics_is_a_clear_error(result: Any, message: str) -> None:
    def bad_eval(model: nn.Module) -> Any:
        return result

    model = _bn_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(adaptive_nb.UsageError, match=message):
        adaptive_nb.train(
            _step, model=model, optimizer=opt, data=make_data(), devices="cpu", evaluate=bad_eval
        )
    assert model.training  # put back in training mode
    run = adaptive_nb.last_run()
    assert run is not None and run.report is not None and run.report.summary["steps"] == 6


def test_scalar_tensor_metrics_are_numbers() -> None:
    model = _bn_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = params_of(model)
    report = adaptive_nb.train(
        _step,
        model=model,
        optimizer=opt,
        data=make_data(),
        devices="cpu",
        evaluate=lambda m: {"loss": torch.tensor(0.25)},
    )
    assert report.evaluations[0]["metrics"] == {"loss": 0.25}
    assert not same_params(before, params_of(model))
