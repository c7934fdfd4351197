"""Gradient clipping once per step, after all the step's gradients are in, before
``optimizer.step``; a non-finite norm skips the step (an event, never a NaN model)."""

from __future__ import annotations

import math
from typing import Any

import torch
from conftest import make_data, make_model, params_of, same_params
from torch import nn

import adaptive_nb
from adaptive_nb.events import EventKind
from adaptive_nb.run.report import RunReport

MAX_NORM = 0.5


def _setup() -> tuple[nn.Module, torch.optim.Optimizer]:
    model = make_model()
    return model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)


def _step_poisoning(bad_steps: set[int]) -> Any:
    """A step whose loss is NaN on the given (1-based) calls."""
    calls = [0]

    def step(model: nn.Module, batch: Any) -> torch.Tensor:
        calls[0] += 1
        x, y = batch
        loss = nn.functional.cross_entropy(model(x), y)
        return loss * float("nan") if calls[0] in bad_steps else loss

    return step


def test_clipped_params_and_norms_equal_a_plain_loop() -> None:
    data = make_data()
    ref, ref_opt = _setup()
    norms = []
    for x, y in data:
        ref_opt.zero_grad()
        nn.functional.cross_entropy(ref(x), y).backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(ref.parameters(), MAX_NORM)))
        ref_opt.step()
    assert max(norms) > MAX_NORM  # clipping really happened

    model, opt = _setup()
    report = adaptive_nb.train(
        _step_poisoning(set()),
        model=model,
        optimizer=opt,
        data=data,
        devices="cpu",
        policy="static",
        clip_grad_norm=MAX_NORM,
    )
    assert same_params(params_of(ref), params_of(model))
    assert report.grad_norm == norms
    assert report.summary["grad_norm_max"] == max(norms)
    assert report.summary["grad_norm_last"] == norms[-1]
    assert report.summary["nonfinite_skipped_steps"] == 0


def test_a_non_finite_norm_skips_the_step_and_says_so() -> None:
    data = make_data()
    ref, ref_opt = _setup()
    ref_sched = torch.optim.lr_scheduler.StepLR(ref_opt, step_size=1, gamma=0.9)
    for i, (x, y) in enumerate(data):
        ref_opt.zero_grad()
        nn.functional.cross_entropy(ref(x), y).backward()
        if i == 2:
            continue  # the poisoned step: nothing applied, no scheduler step
        torch.nn.utils.clip_grad_norm_(ref.parameters(), MAX_NORM)
        ref_opt.step()
        ref_sched.step()

    model, opt = _setup()
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.9)
    report = adaptive_nb.train(
        _step_poisoning({3}),
        model=model,
        optimizer=opt,
        data=data,
        devices="cpu",
        policy="static",
        clip_grad_norm=MAX_NORM,
        scheduler=sched,
    )
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert same_params(params_of(ref), params_of(model))
    assert report.summary["steps"] == len(data)
    assert report.summary["nonfinite_skipped_steps"] == 1
    assert sched.last_epoch == len(data) - 1
    assert report.grad_norm[2] is None and all(
        n is not None for i, n in enumerate(report.grad_norm) if i != 2
    )
    skipped = [e for e in report.events if e.kind == EventKind.NONFINITE]
    assert len(skipped) == 1 and skipped[0].step == 3 and "skipped" in skipped[0].detail
    assert report.summary["final_loss"] is not None and math.isfinite(report.summary["final_loss"])
    back = RunReport.from_json(report.to_json())
    assert back.grad_norm == report.grad_norm
