"""The loop's bookkeeping: what the summary counts, the active-run slot, interrupts while
the report is assembled. Engines and controllers here are small fakes."""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from conftest import ce_step, make_data, make_model
from run_support import OomEngine, Planner
from torch import nn

import adaptive_nb
from adaptive_nb.engine.cpu import CpuEngine
from adaptive_nb.errors import OutOfMemory, UsageError
from adaptive_nb.events import Event, EventKind
from adaptive_nb.plan.base import Controller
from adaptive_nb.run import api, loop
from adaptive_nb.run.observers import BaseObserver
from adaptive_nb.run.report import RunReport


def _run(engine: Any, controller: Controller, steps: int | None = 3, **kw: Any) -> loop.Run:
    model = make_model()
    return loop.Run(
        ce_step,
        model=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        data=kw.pop("data", make_data()),
        epochs=kw.pop("epochs", None),
        steps=steps,
        engine=engine,
        controller=controller,
        snapshots=None,
        policy="adaptive",
        headroom=0.1,
        **kw,
    )


def test_oom_recovered_counts_only_recoveries_that_succeeded() -> None:
    ok = _run(OomEngine(fail=1), Planner(), steps=3)
    report = ok.execute()
    assert report.summary["oom_recovered"] == 3 and report.summary["steps"] == 3

    hopeless = _run(OomEngine(fail=10**6), Planner(), steps=3)
    with pytest.raises(OutOfMemory):
        hopeless.execute()
    assert hopeless.report is not None
    assert hopeless.report.summary["steps"] == 0
    assert hopeless.report.summary["oom_recovered"] == 0  # none of the retries worked
    assert adaptive_nb.active_run() is None


def test_reallocations_count_decisions_not_event_lines() -> None:
    # one re-plan that changes the set, the micro-batches and re-admits a device is one
    # reallocation; a requested exclusion (echoed by the loop) plus its re-plan is one more
    kinds = [EventKind.DEVICES, EventKind.MICROBATCH, EventKind.DEVICE_READMITTED]
    run = _run(CpuEngine(), Planner(kinds), steps=4)
    run.control.set_device_enabled(0, False)
    report = run.execute()
    assert report.summary["reallocations"] == 2

    readmit_only = _run(CpuEngine(), Planner([EventKind.DEVICE_READMITTED]), steps=2)
    assert readmit_only.execute().summary["reallocations"] == 1


def test_epochs_started_counts_epochs_that_produced_a_batch() -> None:
    data = make_data()
    run = _run(CpuEngine(), Planner(), steps=None, data=iter(data), epochs=3)
    report = run.execute()
    assert report.summary["steps"] == len(data)
    assert report.summary["epochs_started"] == 1  # the iterator was spent after one epoch

    run = _run(CpuEngine(), Planner(), steps=None, data=data, epochs=2)
    assert run.execute().summary["epochs_started"] == 2


def test_a_second_ctrl_c_while_the_report_is_assembled_keeps_the_report() -> None:
    class CtrlCAtEnd(BaseObserver):
        def on_event(self, event: Event) -> None:
            if event.kind == EventKind.END:  # the user presses Ctrl-C twice, impatiently
                signal.raise_signal(signal.SIGINT)
                signal.raise_signal(signal.SIGINT)

    run = _run(CpuEngine(), Planner(), steps=5, observers=[CtrlCAtEnd()])
    report = run.execute()
    assert isinstance(report, RunReport) and report.summary["steps"] == 5
    assert run.report is report
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def _gated_backend(gate: threading.Barrier) -> Any:
    real = api.build_backend

    def build(*args: Any, **kwargs: Any) -> Any:
        gate.wait(5)  # both callers are past their checks before either claims the slot
        return real(*args, **kwargs)

    return build


@pytest.fixture
def no_run_left() -> Iterator[None]:
    yield
    active = adaptive_nb.active_run()
    if active is not None:
        active.control.stop()
        active.wait(30)


def test_two_concurrent_starts_cannot_both_claim_the_run_slot(
    monkeypatch: pytest.MonkeyPatch, no_run_left: None
) -> None:
    monkeypatch.setattr(api, "build_backend", _gated_backend(threading.Barrier(2)))
    release = threading.Event()

    def slow(m: nn.Module, batch: Any) -> torch.Tensor:
        release.wait(10)
        return ce_step(m, batch)

    results: list[Any] = []

    def starter(seed: int) -> None:
        model = make_model(seed)
        try:
            results.append(
                adaptive_nb.start(
                    slow,
                    model=model,
                    optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                    data=make_data(),
                    steps=2,
                    devices="cpu",
                )
            )
        except UsageError as exc:
            results.append(exc)

    threads = [threading.Thread(target=starter, args=(s,)) for s in (1, 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    release.set()
    runs = [r for r in results if isinstance(r, loop.Run)]
    refused = [r for r in results if isinstance(r, UsageError)]
    assert len(runs) == 1 and len(refused) == 1, results
    assert "still running" in str(refused[0])
    runs[0].wait(30)
    assert adaptive_nb.active_run() is None


def test_a_run_refused_at_execute_is_done_and_releases_its_engine(
    no_run_left: None,
) -> None:
    release = threading.Event()

    def slow(m: nn.Module, batch: Any) -> torch.Tensor:
        release.wait(10)
        return ce_step(m, batch)

    closed: list[bool] = []

    class Tracked(CpuEngine):
        def close(self) -> None:
            closed.append(True)

    model = make_model()
    first = adaptive_nb.start(
        slow,
        model=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        data=make_data(),
        steps=2,
        devices="cpu",
    )
    late = _run(Tracked(), Planner(), steps=1)  # prepared before `first` claimed the slot
    try:
        with pytest.raises(UsageError, match="still running"):
            late.execute()
        assert late.done and closed == [True]
        assert adaptive_nb.active_run() is first
    finally:
        release.set()
    first.wait(30)
    assert adaptive_nb.active_run() is None


def test_time_spent_paused_is_neither_throughput_nor_overhead() -> None:
    run = _run(CpuEngine(), Planner(), steps=6)
    run.control.pause()  # paused before the first step, resumed 0.5 s later
    timer = threading.Timer(0.5, run.control.resume)
    timer.start()
    try:
        s = run.execute().summary
    finally:
        timer.cancel()
    assert s["steps"] == 6
    assert s["paused_s"] >= 0.45
    assert s["samples_per_s"] == pytest.approx(s["samples"] / (s["wall_s"] - s["paused_s"]), 0.05)
    assert s["samples"] / s["wall_s"] < 0.5 * s["samples_per_s"]
    assert s["controller_overhead_pct"] < 50  # the wait is not adaptive_nb's overhead
