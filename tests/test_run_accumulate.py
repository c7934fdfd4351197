"""User gradient accumulation: one optimizer step per N loader batches, each batch's mean
loss weighted by its share of the samples; equal to a hand-written accumulation loop, also
when a batch in the middle of a group is retried after an out-of-memory."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from conftest import ce_step, make_data, make_model, params_of, same_params
from run_support import OomEngine, static_run
from torch import nn

import adaptive_nb
from adaptive_nb.run.training import check_training_options

N = 3


def _data() -> list[tuple[torch.Tensor, torch.Tensor]]:
    return make_data(n=100, batch=16)  # 7 batches: six of 16, one of 4


def _setup() -> tuple[nn.Module, torch.optim.Optimizer]:
    model = make_model()
    return model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)


def _reference(epochs: int) -> tuple[nn.Module, list[float]]:
    """Accumulation by hand: groups of N batches (the last of an epoch shorter), each
    batch's loss weighted by b_i / sum(b), one scheduler step per optimizer step."""
    data = _data()
    ref, opt = _setup()
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.9)
    lrs = []
    for _ in range(epochs):
        for start in range(0, len(data), N):
            group = data[start : start + N]
            total = sum(len(y) for _, y in group)
            opt.zero_grad()
            for x, y in group:
                loss = nn.functional.cross_entropy(ref(x), y)
                (loss * (len(y) / total)).backward()
            lrs.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
    return ref, lrs


def test_accumulation_equals_a_plain_accumulation_loop() -> None:
    ref, lrs = _reference(epochs=2)
    model, opt = _setup()
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.9)
    report = adaptive_nb.train(
        ce_step,
        model=model,
        optimizer=opt,
        data=_data(),
        epochs=2,
        devices="cpu",
        policy="static",
        accumulate=N,
        scheduler=sched,
    )
    assert same_params(params_of(ref), params_of(model))
    assert report.summary["steps"] == 6 and report.summary["samples"] == 200
    assert report.info.total_steps == 6
    assert report.lr == lrs
    assert report.summary["accumulate"] == N


def test_a_retry_inside_a_group_loses_no_batch_and_doubles_none() -> None:
    ref, _ = _reference(epochs=1)
    model, opt = _setup()
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.9)
    options = check_training_options(
        optimizer=opt, device_kind="cpu", accumulate=N, scheduler=sched
    )
    engine = OomEngine(fail=1)  # every batch of every group fails once first
    run = static_run(ce_step, model, opt, _data(), engine, options)
    report = run.execute()
    assert report.summary["oom_recovered"] == 7 and engine.attempts == 14
    assert report.summary["steps"] == 3 and sched.last_epoch == 3
    assert same_params(params_of(ref), params_of(model))


def test_steps_count_optimizer_steps() -> None:
    model, opt = _setup()
    report = adaptive_nb.train(
        ce_step, model=model, optimizer=opt, data=_data(), steps=2, devices="cpu", accumulate=N
    )
    assert report.summary["steps"] == 2 and report.summary["samples"] == 6 * 16


@pytest.mark.parametrize("bad", [0, -2, 1.5, True, "2"])
def test_a_bad_accumulate_is_a_usage_error(bad: Any) -> None:
    model, opt = _setup()
    with pytest.raises(adaptive_nb.UsageError, match=r"accumulate=.*\(--accumulate\)"):
        adaptive_nb.train(
            ce_step, model=model, optimizer=opt, data=_data(), devices="cpu", accumulate=bad
        )
