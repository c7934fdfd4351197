"""The training loop: plain-loop equivalence, counts, stop/pause, errors, interruption."""

from __future__ import annotations

import math
import os
import signal
import threading
import time
from collections import Counter
from typing import Any

import pytest
import torch
from conftest import ce_step, make_data, make_model, params_of, same_params
from torch import nn

import adaptive_nb
from adaptive_nb import EventKind, LossError, RunControl, UsageError
from adaptive_nb.events import Progress
from adaptive_nb.run.observers import BaseObserver


def plain_loop(
    model: nn.Module, opt: torch.optim.Optimizer, batches: list[Any], steps: int
) -> None:
    done = 0
    while done < steps:
        for b in batches:
            if done >= steps:
                break
            opt.zero_grad(set_to_none=True)
            ce_step(model, b).backward()
            opt.step()
            done += 1


@pytest.mark.parametrize("policy", ["adaptive", "static", "weights"])
def test_parameters_equal_a_plain_pytorch_loop(policy: str) -> None:
    data = make_data()
    ref = make_model()
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
    plain_loop(ref, ref_opt, data, steps=15)

    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    report = adaptive_nb.train(
        ce_step, model=model, optimizer=opt, data=data, steps=15, devices="cpu", policy=policy
    )
    assert report.summary["steps"] == 15
    # same batches, same order, one optimizer step each. (Thread-count changes may reorder
    # float reductions, hence a tolerance at float32 round-off rather than bitwise equality.)
    for a, b in zip(ref.parameters(), model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_epochs_count_every_batch_once(tiny: Any) -> None:
    model, opt, data = tiny
    seen: list[int] = []

    def step(m: nn.Module, batch: Any) -> torch.Tensor:
        # which batch of `data` this is, by content (the batches are distinct random draws)
        seen.append(next(i for i, (x, _) in enumerate(data) if torch.equal(x, batch[0])))
        return ce_step(m, batch)

    report = adaptive_nb.train(step, model=model, optimizer=opt, data=data, epochs=2)
    assert report.summary["steps"] == 2 * len(data)
    assert report.summary["samples"] == 2 * sum(len(b[0]) for b in data)
    assert report.info.total_steps == 2 * len(data)
    # each batch exactly once per epoch: every batch id seen exactly twice, in order
    assert Counter(seen) == {i: 2 for i in range(len(data))}
    assert seen == list(range(len(data))) * 2
    assert report.summary["ended"] == "completed"


def test_steps_cycle_over_a_short_loader(tiny: Any) -> None:
    model, opt, data = tiny
    report = adaptive_nb.train(ce_step, model=model, optimizer=opt, data=data, steps=20)
    assert report.summary["steps"] == 20
    assert report.info.total_steps == 20


def test_default_is_one_epoch(tiny: Any) -> None:
    model, opt, data = tiny
    report = adaptive_nb.train(ce_step, model=model, optimizer=opt, data=data)
    assert report.summary["steps"] == len(data)


def test_one_shot_iterator_ends_with_a_notice(tiny: Any) -> None:
    model, opt, data = tiny
    report = adaptive_nb.train(ce_step, model=model, optimizer=opt, data=iter(data), epochs=3)
    assert report.summary["steps"] == len(data)
    assert any(e.kind == EventKind.NOTICE and "ran out" in e.detail for e in report.events)


def test_unknown_length_data_has_no_total(tiny: Any) -> None:
    model, opt, data = tiny
    gen = (b for b in data)
    report = adaptive_nb.train(ce_step, model=model, optimizer=opt, data=gen, epochs=1)
    assert report.info.total_steps is None
    assert report.summary["steps"] == len(data)


BAD_INPUTS: list[tuple[dict[str, Any], str]] = [
    ({"model": "net"}, "not a torch.nn.Module"),
    ({"optimizer": 3}, "not a torch.optim.Optimizer"),
    ({"data": 5}, "cannot be iterated"),
    ({"data": "abc"}, "cannot be iterated"),
    ({"epochs": 1, "steps": 2}, "either --epochs or --steps"),
    ({"steps": 0}, "at least 1"),
    ({"epochs": -2}, "at least 1"),
    ({"steps": 2.5}, "whole number"),
    ({"devices": "3"}, "GPU 3 does not exist"),
    ({"devices": "gpu-ish"}, "not understood"),
    ({"devices": "sim:/no/such/file.json"}, "no scenario file"),
    ({"policy": "fastest"}, "unknown policy"),
    ({"headroom": 1.0}, "headroom"),
    ({"headroom": -0.1}, "headroom"),
]


@pytest.mark.parametrize(("override", "message"), BAD_INPUTS)
def test_bad_input_is_a_usage_error_and_changes_nothing(
    tiny: Any, override: dict[str, Any], message: str
) -> None:
    model, opt, data = tiny
    before = params_of(model)
    state_before = str(opt.state_dict())
    kwargs: dict[str, Any] = {"model": model, "optimizer": opt, "data": data, **override}
    with pytest.raises(UsageError, match=message):
        adaptive_nb.train(ce_step, **kwargs)
    assert same_params(before, params_of(model))
    assert str(opt.state_dict()) == state_before
    assert adaptive_nb.active_run() is None


def test_optimizer_of_another_model_is_refused(tiny: Any) -> None:
    model, _, data = tiny
    other = make_model(1)
    opt = torch.optim.SGD(other.parameters(), lr=0.1)
    with pytest.raises(UsageError, match="does not update any parameter"):
        adaptive_nb.train(ce_step, model=model, optimizer=opt, data=data, names={"model": "net"})


def test_errors_use_the_notebook_names(tiny: Any) -> None:
    _, opt, data = tiny
    with pytest.raises(UsageError, match="`net` is a str"):
        adaptive_nb.train(ce_step, model="x", optimizer=opt, data=data, names={"model": "net"})


def test_empty_data_is_reported_before_any_step(tiny: Any) -> None:
    model, opt, _ = tiny
    before = params_of(model)
    with pytest.raises(UsageError, match="produced no batches"):
        adaptive_nb.train(ce_step, model=model, optimizer=opt, data=[], names={"data": "loader"})
    assert same_params(before, params_of(model))


@pytest.mark.parametrize(
    ("loss_value", "message"),
    [
        (None, "never assigned"),
        (1.5, "not a loss tensor"),
        ("vector", "must be a scalar"),
        ("detached", "does not require grad"),
    ],
)
def test_bad_loss_fails_at_first_step_without_change(
    tiny: Any, loss_value: Any, message: str
) -> None:
    model, opt, data = tiny
    before = params_of(model)

    def step(m: nn.Module, batch: Any) -> Any:
        out = m(batch[0])
        if loss_value == "vector":
            return out.sum(1)
        if loss_value == "detached":
            return out.sum().detach()
        return loss_value

    with pytest.raises(LossError, match=message):
        adaptive_nb.train(step, model=model, optimizer=opt, data=data, steps=3)
    assert same_params(before, params_of(model))
    run = adaptive_nb.last_run()
    assert run is not None and run.report is not None
    assert run.report.summary["steps"] == 0


def test_user_exception_propagates_after_exactly_the_completed_steps(tiny: Any) -> None:
    model, opt, data = tiny
    snapshots: list[list[torch.Tensor]] = []

    def step(m: nn.Module, batch: Any) -> torch.Tensor:
        snapshots.append(params_of(m))
        if len(snapshots) == 4:
            raise ZeroDivisionError("user bug on step 4")
        return ce_step(m, batch)

    with pytest.raises(ZeroDivisionError, match="user bug"):
        adaptive_nb.train(step, model=model, optimizer=opt, data=data, steps=10)
    # 3 steps were applied; the failing 4th left the parameters as they were after step 3
    assert same_params(snapshots[3], params_of(model))
    run = adaptive_nb.last_run()
    assert run is not None and run.report is not None
    assert run.report.summary["steps"] == 3
    assert run.report.summary["ended"] == "error: ZeroDivisionError"
    assert adaptive_nb.active_run() is None


class _StopAt(BaseObserver):
    def __init__(self, control: RunControl, step: int) -> None:
        self.control, self.step = control, step

    def on_progress(self, progress: Progress) -> None:
        if progress.step >= self.step:
            self.control.stop()


def test_stop_request_finishes_the_current_step_and_keeps_the_report(tiny: Any) -> None:
    model, opt, data = tiny
    control = RunControl()
    calls = 0

    def step(m: nn.Module, batch: Any) -> torch.Tensor:
        nonlocal calls
        calls += 1
        if calls == 5:
            control.stop()  # posted from inside step 5: step 5 completes, then stop
        return ce_step(m, batch)

    report = adaptive_nb.train(
        step, model=model, optimizer=opt, data=data, steps=50, control=control
    )
    assert report.summary["steps"] == 5
    assert calls == 5
    assert report.summary["ended"] == "stopped"
    assert any(e.kind == EventKind.STOP for e in report.events)


def test_pause_and_resume_from_another_thread(tiny: Any) -> None:
    model, opt, data = tiny
    control = RunControl()
    paused_at: list[int] = []
    calls = 0

    def step(m: nn.Module, batch: Any) -> torch.Tensor:
        nonlocal calls
        calls += 1
        if calls == 3:
            control.pause()

            def later() -> None:
                time.sleep(0.3)
                paused_at.append(calls)  # no step ran while paused
                control.resume()

            threading.Thread(target=later).start()
        return ce_step(m, batch)

    t0 = time.perf_counter()
    report = adaptive_nb.train(
        step, model=model, optimizer=opt, data=data, steps=8, control=control
    )
    assert time.perf_counter() - t0 >= 0.3
    assert paused_at == [3]
    assert report.summary["steps"] == 8
    kinds = [e.kind for e in report.events]
    assert kinds.index(EventKind.PAUSE) < kinds.index(EventKind.RESUME)


def test_kernel_interrupt_stops_at_a_step_boundary(tiny: Any) -> None:
    model, opt, data = tiny
    after_step: list[list[torch.Tensor]] = []
    calls = 0

    def step(m: nn.Module, batch: Any) -> torch.Tensor:
        nonlocal calls
        calls += 1
        if calls == 4:
            os.kill(os.getpid(), signal.SIGINT)  # as Jupyter's interrupt does, mid-step
        loss = ce_step(m, batch)
        after_step.append(params_of(m))
        return loss

    with pytest.raises(KeyboardInterrupt):
        adaptive_nb.train(step, model=model, optimizer=opt, data=data, steps=30)
    run = adaptive_nb.last_run()
    assert run is not None and run.report is not None
    assert run.report.summary["steps"] == 4  # the interrupted step completed, no more ran
    assert run.report.summary["ended"] == "interrupted"
    assert calls == 4
    assert adaptive_nb.active_run() is None
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_a_second_run_while_one_is_active_is_refused(tiny: Any) -> None:
    model, opt, data = tiny
    gate = threading.Event()

    def slow(m: nn.Module, batch: Any) -> torch.Tensor:
        gate.wait(5)
        return ce_step(m, batch)

    run = adaptive_nb.start(slow, model=model, optimizer=opt, data=data, steps=3)
    try:
        assert adaptive_nb.active_run() is run
        other = make_model(2)
        with pytest.raises(UsageError, match="still running"):
            adaptive_nb.train(
                ce_step,
                model=other,
                optimizer=torch.optim.SGD(other.parameters(), lr=0.1),
                data=data,
                steps=1,
            )
    finally:
        gate.set()
    report = run.wait(30)
    assert report.summary["steps"] == 3
    assert adaptive_nb.active_run() is None


def test_background_run_can_be_stopped_through_its_control(tiny: Any) -> None:
    model, opt, data = tiny

    def slow(m: nn.Module, batch: Any) -> torch.Tensor:
        time.sleep(0.01)
        return ce_step(m, batch)

    run = adaptive_nb.start(slow, model=model, optimizer=opt, data=data, steps=10_000)
    deadline = time.monotonic() + 30  # wait for the first steps, however loaded the machine
    while run.status()["step"] == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert run.status()["step"] > 0
    run.control.stop()
    report = run.wait(30)
    assert report.summary["ended"] == "stopped"
    assert 0 < report.summary["steps"] < 10_000


def test_a_failing_observer_never_stops_training(tiny: Any) -> None:
    model, opt, data = tiny

    class Broken(BaseObserver):
        def on_progress(self, progress: Progress) -> None:
            raise RuntimeError("widget exploded")

    report = adaptive_nb.train(
        ce_step, model=model, optimizer=opt, data=data, steps=12, observers=[Broken()]
    )
    assert report.summary["steps"] == 12
    assert any("widget exploded" in e.detail for e in report.events)


def test_ticks_make_a_timeline_with_shares_and_threads(tiny: Any) -> None:
    model, opt, data = tiny

    def slow(m: nn.Module, batch: Any) -> torch.Tensor:
        time.sleep(0.005)
        return ce_step(m, batch)

    report = adaptive_nb.train(
        slow, model=model, optimizer=opt, data=data, steps=30, control_interval=0.02
    )
    assert len(report.timeline) >= 3
    rec = report.timeline[-1]
    assert rec.shares == {"cpu": 1.0}
    assert rec.threads is not None and rec.threads >= 1
    assert rec.samples_per_s > 0
    assert [r.step for r in report.timeline] == sorted(r.step for r in report.timeline)
    overhead = report.summary["controller_overhead_pct"]
    assert isinstance(overhead, float) and math.isfinite(overhead) and 0 <= overhead < 100
