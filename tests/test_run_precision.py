"""Mixed precision: bf16 autocast on CPU equals a hand-written autocast loop; the fp16 loss
scaling logic (scaled loss returned to the engine, unscale before clipping, skip on
overflow, one ``update()`` per applied step even after an out-of-memory retry) checked on
CPU with a real ``GradScaler("cpu")`` passed in; the CUDA path under ``-m gpu``."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from conftest import ce_step, make_data, make_model, params_of, same_params
from run_support import OomEngine, static_run
from torch import nn

import adaptive_nb
from adaptive_nb.engine.cpu import CpuEngine
from adaptive_nb.events import EventKind
from adaptive_nb.run import loop
from adaptive_nb.run.training import check_training_options


def _setup() -> tuple[nn.Module, torch.optim.Optimizer]:
    model = make_model()
    return model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)


def test_bf16_autocast_on_cpu_equals_a_plain_autocast_loop() -> None:
    data = make_data()
    ref, ref_opt = _setup()
    for x, y in data:
        ref_opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = nn.functional.cross_entropy(ref(x), y)
        loss.backward()
        ref_opt.step()

    model, opt = _setup()
    seen: list[torch.dtype] = []

    def step(m: nn.Module, batch: Any) -> torch.Tensor:
        x, y = batch
        out = m(x)
        seen.append(out.dtype)
        return nn.functional.cross_entropy(out, y)

    report = adaptive_nb.train(
        step,
        model=model,
        optimizer=opt,
        data=data,
        devices="cpu",
        policy="static",
        precision="bf16",
    )
    assert set(seen) == {torch.bfloat16}
    for a, b in zip(params_of(ref), params_of(model), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    assert report.summary["precision"] == "bf16"

    fp32, fp32_opt = _setup()
    adaptive_nb.train(ce_step, model=fp32, optimizer=fp32_opt, data=data, devices="cpu")
    assert not same_params(params_of(fp32), params_of(model))  # autocast really ran


class CountingScaler:
    """A real CPU GradScaler that counts its calls."""

    def __init__(self) -> None:
        self.inner = torch.amp.GradScaler("cpu", init_scale=2.0**10)
        self.calls: dict[str, int] = {"scale": 0, "unscale_": 0, "step": 0, "update": 0}

    def scale(self, outputs: torch.Tensor) -> torch.Tensor:
        self.calls["scale"] += 1
        return self.inner.scale(outputs)

    def unscale_(self, optimizer: torch.optim.Optimizer) -> None:
        self.calls["unscale_"] += 1
        self.inner.unscale_(optimizer)

    def step(self, optimizer: torch.optim.Optimizer) -> Any:
        self.calls["step"] += 1
        return self.inner.step(optimizer)

    def update(self) -> None:
        self.calls["update"] += 1
        self.inner.update()

    def get_scale(self) -> float:
        return self.inner.get_scale()


def _poisoning_step(bad_call: int) -> Any:
    calls = [0]

    def step(model: nn.Module, batch: Any) -> torch.Tensor:
        calls[0] += 1
        loss = ce_step(model, batch)
        return loss * float("inf") if calls[0] == bad_call else loss

    return step


def _scaled_run(engine: Any, step: Any, scaler: CountingScaler) -> tuple[loop.Run, Any]:
    model, opt = _setup()
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.9)
    options = check_training_options(
        optimizer=opt, device_kind="cpu", scheduler=sched, clip_grad_norm=1.0
    )
    run = static_run(step, model, opt, make_data(), engine, options, scaler=scaler)
    return run, sched


def test_loss_scaling_skips_an_overflowed_step_and_equals_a_plain_scaler_loop() -> None:
    data = make_data()
    ref, ref_opt = _setup()
    ref_sched = torch.optim.lr_scheduler.StepLR(ref_opt, step_size=1, gamma=0.9)
    ref_scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    losses = []
    for i, (x, y) in enumerate(data):
        ref_opt.zero_grad()
        loss = nn.functional.cross_entropy(ref(x), y)
        if i == 2:
            loss = loss * float("inf")
        losses.append(float(loss.detach()))
        ref_scaler.scale(loss).backward()
        ref_scaler.unscale_(ref_opt)
        torch.nn.utils.clip_grad_norm_(ref.parameters(), 1.0)
        before = ref_scaler.get_scale()
        ref_scaler.step(ref_opt)
        ref_scaler.update()
        if ref_scaler.get_scale() >= before:
            ref_sched.step()

    scaler = CountingScaler()
    run, sched = _scaled_run(CpuEngine(), _poisoning_step(3), scaler)
    report = run.execute()
    assert same_params(params_of(ref), params_of(run.model))
    assert report.summary["amp_skipped_steps"] == 1
    assert report.summary["nonfinite_skipped_steps"] == 0
    assert sched.last_epoch == ref_sched.last_epoch == len(data) - 1
    assert scaler.get_scale() == ref_scaler.get_scale() == 2.0**9
    assert report.summary["final_loss"] == pytest.approx(losses[-1], rel=1e-6)  # unscaled
    assert report.grad_norm[2] is None
    events = [e for e in report.events if e.kind == EventKind.NONFINITE]
    assert len(events) == 1 and "GradScaler" in events[0].detail


def test_an_out_of_memory_retry_updates_the_scaler_once_per_step() -> None:
    scaler = CountingScaler()
    engine = OomEngine(fail=1)
    run, _ = _scaled_run(engine, ce_step, scaler)
    report = run.execute()
    steps = len(make_data())
    assert report.summary["steps"] == steps and report.summary["oom_recovered"] == steps
    assert engine.attempts == 2 * steps
    assert scaler.calls == {"scale": steps, "unscale_": steps, "step": steps, "update": steps}

    ref_scaler = CountingScaler()
    ref, _ = _scaled_run(CpuEngine(), ce_step, ref_scaler)
    ref.execute()
    assert same_params(params_of(ref.model), params_of(run.model))


def test_fp16_without_cuda_is_a_usage_error() -> None:
    model, opt = _setup()
    before = params_of(model)
    with pytest.raises(adaptive_nb.UsageError, match=r"fp16.*needs CUDA.*bf16"):
        adaptive_nb.train(
            ce_step,
            model=model,
            optimizer=opt,
            data=make_data(),
            devices="cpu",
            precision="fp16",
        )
    assert same_params(before, params_of(model))


@pytest.mark.gpu
def test_fp16_on_cuda_equals_a_plain_autocast_and_scaler_loop() -> None:
    data = make_data()
    ref, ref_opt = _setup()
    ref.cuda()
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
    ref_scaler = torch.amp.GradScaler("cuda")
    for x, y in data:
        x, y = x.cuda(), y.cuda()
        ref_opt.zero_grad()
        with torch.autocast("cuda", dtype=torch.float16):
            loss = nn.functional.cross_entropy(ref(x), y)
        ref_scaler.scale(loss).backward()
        ref_scaler.step(ref_opt)
        ref_scaler.update()

    model = make_model().cuda()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    report = adaptive_nb.train(
        ce_step,
        model=model,
        optimizer=opt,
        data=data,
        devices="0",
        policy="static",
        precision="fp16",
    )
    assert report.summary["steps"] == len(data)
    assert report.summary["final_loss"] == pytest.approx(float(loss.detach()), rel=1e-3)
    for a, b in zip(params_of(ref), params_of(model), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)


def test_reported_loss_is_unscaled_by_the_scale_the_step_used_when_the_scale_grows() -> None:
    # growth_interval=1: every applied step doubles the scale in scaler.update(), after the
    # step's losses were computed with the old one
    scaler = CountingScaler()
    scaler.inner = torch.amp.GradScaler("cpu", init_scale=2.0**4, growth_interval=1)
    seen: list[float] = []

    class Record:
        def on_step_end(self, step: int, loss: float, history: Any) -> None:
            seen.append(loss)

    model, opt = _setup()
    options = check_training_options(optimizer=opt, device_kind="cpu", callbacks=[Record()])
    run = static_run(ce_step, model, opt, make_data(), CpuEngine(), options, scaler=scaler)
    run.execute()

    ref, ref_opt = _setup()
    ref_scaler = torch.amp.GradScaler("cpu", init_scale=2.0**4, growth_interval=1)
    expected = []
    for x, y in make_data():
        ref_opt.zero_grad()
        loss = nn.functional.cross_entropy(ref(x), y)
        expected.append(float(loss.detach()))
        ref_scaler.scale(loss).backward()
        ref_scaler.step(ref_opt)
        ref_scaler.update()
    assert scaler.get_scale() == ref_scaler.get_scale() > 2.0**4
    assert seen == pytest.approx(expected, rel=1e-5)
