"""The learning-rate scheduler is stepped exactly as a hand-written loop steps it: once per
applied optimizer step (or per epoch), with a metric after each evaluation for
ReduceLROnPlateau; never on an out-of-memory retry."""

from __future__ import annotations

from typing import Any

import torch
from conftest import ce_step, make_data, make_model, params_of, same_params
from run_support import OomEngine, static_run
from torch import nn

import adaptive_nb
from adaptive_nb.run.report import RunReport
from adaptive_nb.run.training import check_training_options


def _setup(seed: int = 0) -> tuple[nn.Module, torch.optim.Optimizer]:
    model = make_model(seed)
    return model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)


def _train(**kw: Any) -> RunReport:
    return adaptive_nb.train(ce_step, devices="cpu", policy="static", **kw)


def test_step_lr_per_step_equals_a_plain_loop() -> None:
    data = make_data()
    ref, ref_opt = _setup()
    ref_sched = torch.optim.lr_scheduler.StepLR(ref_opt, step_size=2, gamma=0.5)
    ref_lrs = []
    for _ in range(2):
        for x, y in data:
            ref_opt.zero_grad()
            nn.functional.cross_entropy(ref(x), y).backward()
            ref_lrs.append(ref_opt.param_groups[0]["lr"])
            ref_opt.step()
            ref_sched.step()

    model, opt = _setup()
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    report = _train(model=model, optimizer=opt, data=data, epochs=2, scheduler=sched)
    assert same_params(params_of(ref), params_of(model))
    assert report.lr == ref_lrs and len(set(ref_lrs)) == 6  # the lr really changed
    assert report.summary["lr_final"] == ref_opt.param_groups[0]["lr"]
    assert sched.last_epoch == ref_sched.last_epoch == 12
    back = RunReport.from_json(report.to_json())
    assert back.lr == report.lr


def test_lambda_lr_per_epoch_equals_a_plain_loop() -> None:
    data = make_data()
    ref, ref_opt = _setup()
    ref_sched = torch.optim.lr_scheduler.LambdaLR(ref_opt, lambda e: 0.5**e)
    for _ in range(3):
        for x, y in data:
            ref_opt.zero_grad()
            nn.functional.cross_entropy(ref(x), y).backward()
            ref_opt.step()
        ref_sched.step()

    model, opt = _setup()
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda e: 0.5**e)
    report = _train(
        model=model,
        optimizer=opt,
        data=data,
        epochs=3,
        scheduler=sched,
        scheduler_interval="epoch",
    )
    assert same_params(params_of(ref), params_of(model))
    assert report.lr == [0.1] * 6 + [0.05] * 6 + [0.025] * 6
    assert report.summary["lr_final"] == ref_opt.param_groups[0]["lr"] == 0.0125


def _val_loss(model: nn.Module) -> dict[str, float]:
    x, y = make_data(n=32, batch=32, seed=1)[0]
    return {"val_loss": float(nn.functional.cross_entropy(model(x), y)), "flat": 1.0}


def test_reduce_on_plateau_is_stepped_with_the_named_metric_after_each_evaluation() -> None:
    data = make_data()
    ref, ref_opt = _setup()
    ref_sched = torch.optim.lr_scheduler.ReduceLROnPlateau(ref_opt, patience=0, factor=0.5)
    for _ in range(4):
        for x, y in data:
            ref_opt.zero_grad()
            nn.functional.cross_entropy(ref(x), y).backward()
            ref_opt.step()
        ref.eval()
        with torch.no_grad():
            metrics = _val_loss(ref)
        ref.train()
        ref_sched.step(metrics["flat"])

    model, opt = _setup()
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, patience=0, factor=0.5)
    report = _train(
        model=model,
        optimizer=opt,
        data=data,
        epochs=4,
        scheduler=sched,
        scheduler_metric="flat",
        evaluate=_val_loss,
    )
    assert same_params(params_of(ref), params_of(model))
    # a metric that never improves halves the lr after every evaluation but the first
    assert report.summary["lr_final"] == ref_opt.param_groups[0]["lr"] == 0.1 * 0.5**3
    assert [e["metrics"]["flat"] for e in report.evaluations] == [1.0] * 4


def test_scheduler_is_not_stepped_on_an_out_of_memory_retry() -> None:
    data = make_data()
    ref, ref_opt = _setup()
    ref_sched = torch.optim.lr_scheduler.StepLR(ref_opt, step_size=1, gamma=0.9)
    for x, y in data:
        ref_opt.zero_grad()
        nn.functional.cross_entropy(ref(x), y).backward()
        ref_opt.step()
        ref_sched.step()

    model, opt = _setup()
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.9)
    options = check_training_options(optimizer=opt, device_kind="cpu", scheduler=sched)
    engine = OomEngine(fail=1)  # every step fails once, then goes through
    run = static_run(ce_step, model, opt, data, engine, options)
    report = run.execute()
    assert engine.attempts == 2 * len(data) and report.summary["oom_recovered"] == len(data)
    assert sched.last_epoch == len(data)
    assert same_params(params_of(ref), params_of(model))
    assert report.summary["lr_final"] == ref_opt.param_groups[0]["lr"]


def test_start_takes_the_same_options_in_the_background() -> None:
    model, opt = _setup()
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    run = adaptive_nb.start(
        ce_step,
        model=model,
        optimizer=opt,
        data=make_data(),
        devices="cpu",
        scheduler=sched,
        evaluate=_val_loss,
    )
    report = run.wait(60)
    assert report.lr == [0.1, 0.1, 0.05, 0.05, 0.025, 0.025]
    assert len(report.evaluations) == 1
