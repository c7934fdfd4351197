"""Callbacks are called exactly once per committed step, never for a retried attempt,
while the step body itself may run more than once per step."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from conftest import ce_step, make_data, make_model
from run_support import OomEngine, static_run
from torch import nn

import adaptive_nb
from adaptive_nb.errors import OutOfMemory
from adaptive_nb.run.history import TrainingHistory
from adaptive_nb.run.training import check_training_options


class Recorder:
    def __init__(self) -> None:
        self.steps: list[tuple[int, float | None]] = []
        self.epochs: list[int] = []
        self.evals: list[dict[str, float]] = []
        self.lrs: list[float] = []

    def on_step_end(self, step: int, loss: float | None, history: TrainingHistory) -> None:
        self.steps.append((step, loss))
        self.lrs.append(history.lr[-1])

    def on_epoch_end(self, epoch: int, history: TrainingHistory) -> None:
        self.epochs.append(epoch)

    def on_eval(self, metrics: dict[str, float]) -> None:
        self.evals.append(metrics)


class EpochsOnly:
    def __init__(self) -> None:
        self.epochs: list[int] = []

    def on_epoch_end(self, epoch: int, history: TrainingHistory) -> None:
        self.epochs.append(epoch)


def test_callbacks_run_once_per_committed_step_even_with_out_of_memory_retries() -> None:
    data = make_data()
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    body_calls = [0]

    def step(m: nn.Module, batch: Any) -> torch.Tensor:
        body_calls[0] += 1
        return ce_step(m, batch)

    rec, other = Recorder(), EpochsOnly()
    options = check_training_options(
        optimizer=opt,
        device_kind="cpu",
        callbacks=[rec, other],
        evaluate=lambda m: {"n": 1.0},
        eval_every=3,
    )
    engine = OomEngine(fail=1)
    run = static_run(step, model, opt, data, engine, options, epochs=2)
    report = run.execute()
    n = 2 * len(data)
    assert engine.attempts == 2 * n  # every step was attempted twice (one OOM each)
    assert body_calls[0] == n  # the OOM came before the body here; it ran once per success
    assert [s for s, _ in rec.steps] == list(range(1, n + 1))
    assert rec.steps[-1][1] == pytest.approx(report.summary["final_loss"])
    assert rec.epochs == other.epochs == [0, 1]
    assert rec.evals == [{"n": 1.0}] * 4
    assert rec.lrs == [0.1] * n


def test_a_body_run_twice_per_step_still_gets_one_callback() -> None:
    data = make_data()
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    body_calls = [0]

    def step(m: nn.Module, batch: Any) -> torch.Tensor:
        body_calls[0] += 1
        if body_calls[0] == 2:  # the second call runs out of memory after the forward
            raise OutOfMemory("simulated", device=0)
        return ce_step(m, batch)

    rec = Recorder()
    options = check_training_options(optimizer=opt, device_kind="cpu", callbacks=rec)
    run = static_run(step, model, opt, data, OomEngine(fail=0), options)
    report = run.execute()
    assert report.summary["oom_recovered"] == 1
    assert body_calls[0] == len(data) + 1
    assert [s for s, _ in rec.steps] == list(range(1, len(data) + 1))


@pytest.mark.parametrize("bad", [print, 3, [Recorder(), object()]])
def test_an_object_without_callback_methods_is_a_usage_error(bad: Any) -> None:
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(adaptive_nb.UsageError, match="none of the callback methods"):
        adaptive_nb.train(
            ce_step, model=model, optimizer=opt, data=make_data(), devices="cpu", callbacks=bad
        )
