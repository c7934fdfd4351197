"""The dashboard's learning-rate and evaluation curves, skipped non-finite steps, and the
note shown when the kernel cannot deliver clicks while a cell runs (no browser)."""

from __future__ import annotations

import importlib.metadata
import threading

import pytest
import torch
from conftest import ce_step, make_data, make_model
from torch import nn

import adaptive_nb
from adaptive_nb.events import Event, EventKind, Progress, RunInfo
from adaptive_nb.jupyter.dashboard import Dashboard, click_delivery
from adaptive_nb.run.control import RunControl
from adaptive_nb.run.report import RunReport


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def make(clock: FakeClock | None = None) -> Dashboard:
    return Dashboard(RunControl(), ["cpu"], False, clock=clock or FakeClock(), use_timer=False)


def progress(step: int, lr: float | None) -> Progress:
    return Progress(step, 100, 0, step * 16, step * 0.1, 160.0, 9.0, 0.5, False, lr)


def info() -> RunInfo:
    return RunInfo("r1", 100, 1, "adaptive", ["cpu"], False, 16, 0.0)


def test_eval_curves_take_the_events_numbers_not_its_text() -> None:
    dash = make()
    dash.on_start(info())
    # text that would read differently: the numbers travel in Event.metrics
    detail = "evaluate after step 2: val_loss 9, top 1 acc 9"
    dash.on_event(Event(0.1, EventKind.EVAL, detail, 2, {"val_loss": 0.98, "top 1 acc": 0.5}))
    dash.on_event(Event(0.2, EventKind.EVAL, "evaluate after step 3: nothing", 3, None))
    dash.on_event(Event(0.3, EventKind.EVAL, "text", 4, {"val_loss": 0.75, "top 1 acc": 0.625}))
    dash.flush()
    curves = dash.curves
    assert curves is not None
    assert list(curves.eval_lines.labels) == ["val_loss", "top 1 acc"]
    assert list(curves.eval_lines.x) == [2.0, 4.0]
    assert curves.eval_lines.y.tolist() == [[0.98, 0.75], [0.5, 0.625]]


def test_lr_and_eval_curves_from_progress_and_events() -> None:
    clock = FakeClock()
    dash = make(clock)
    dash.on_start(info())
    for step in range(1, 11):
        clock.now += 1.0
        dash.on_progress(progress(step, 0.1 / step))
        if step % 5 == 0:
            metrics = {"val_loss": float(f"{1.0 / step:.4g}"), "acc": step / 10}
            detail = f"evaluate after step {step}: val_loss {1.0 / step:.4g}, acc {step / 10:.4g}"
            dash.on_event(Event(step * 0.1, EventKind.EVAL, detail, step, metrics))
    dash.flush()
    curves = dash.curves
    assert curves is not None
    assert list(curves.lr_line.x) == list(range(1, 11))
    assert list(curves.lr_line.y) == pytest.approx([0.1 / s for s in range(1, 11)])
    assert list(curves.eval_lines.labels) == ["val_loss", "acc"]
    assert list(curves.eval_lines.x) == [5.0, 10.0]
    assert curves.eval_lines.y.tolist() == [[0.2, 0.1], [0.5, 1.0]]
    assert "val_loss (right)" in curves.legend.value and "acc (right)" in curves.legend.value
    assert "lr 0.01" in dash.stats.value
    assert curves.panel in dash.widget.children[-3].children  # shown in the figure grid


def test_the_end_replaces_samples_with_the_reports_exact_series() -> None:
    dash = make()
    dash.on_start(info())
    dash.on_progress(progress(3, 0.1))
    detail = "evaluate after step 3: val_loss 0.1235"
    dash.on_event(Event(0.1, EventKind.EVAL, detail, 3, {"val_loss": 0.1235}))

    report = RunReport(
        info=info(),
        summary={"ended": "completed", "steps": 4, "samples": 64},
        lr=[0.1, 0.1, 0.05, 0.05],
        evaluations=[{"step": 3, "epoch": 0, "metrics": {"val_loss": 0.123456789}}],
    )
    dash.on_end(report)
    curves = dash.curves
    assert curves is not None
    assert list(curves.lr_line.x) == [1, 2, 3, 4] and list(curves.lr_line.y) == report.lr
    assert list(curves.eval_lines.y) == [0.123456789]  # one metric: a vector, exact


def test_nonfinite_steps_are_counted_and_logged() -> None:
    dash = make()
    dash.on_start(info())
    dash.on_progress(progress(4, 0.1))
    detail = "gradient norm is nan: step skipped (model and optimizer unchanged)"
    for step in (3, 4):
        dash.on_event(Event(step * 0.1, EventKind.NONFINITE, detail, step))
    dash.flush()
    assert "2 steps skipped (non-finite gradients)" in dash.stats.value
    assert "step skipped" in dash.event_log.value and "×2" in dash.event_log.value


def test_curves_keep_the_update_rate_at_most_4_per_second() -> None:
    clock = FakeClock()
    dash = make(clock)
    dash.on_start(info())
    start = dash.flushes
    for step in range(1, 201):  # two seconds of records, 100 per second
        clock.now += 0.01
        dash.on_progress(progress(step, 0.1))
        if step % 10 == 0:
            detail = f"e after step {step}: m {step}"
            dash.on_event(Event(clock.now, EventKind.EVAL, detail, step, {"m": step}))
    assert dash.flushes - start <= 2 * 4 + 1


def test_a_real_run_draws_its_lr_schedule_and_evaluations() -> None:
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    dash = Dashboard(RunControl(), ["cpu"], False, use_timer=False)

    def evaluate(m: nn.Module) -> dict[str, float]:
        x, y = make_data(n=16, seed=2)[0]
        return {"val_loss": float(nn.functional.cross_entropy(m(x), y))}

    report = adaptive_nb.train(
        ce_step,
        model=model,
        optimizer=opt,
        data=make_data(),
        steps=6,
        devices="cpu",
        scheduler=torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5),
        evaluate=evaluate,
        eval_every=2,
        observers=[dash],
    )
    curves = dash.curves
    assert curves is not None
    assert list(curves.lr_line.y) == report.lr == [0.1, 0.1, 0.05, 0.05, 0.025, 0.025]
    assert list(curves.eval_lines.x) == [2.0, 4.0, 6.0]
    assert list(curves.eval_lines.y) == [e["metrics"]["val_loss"] for e in report.evaluations]


# -- clicks that cannot arrive while the cell runs ---------------------------------------
def _no_live_clicks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(
        click_delivery, "clicks_during_cell", lambda: (False, "ipykernel 6.29.5, before 7")
    )


def test_the_dashboard_says_when_controls_act_only_after_the_cell(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _no_live_clicks(monkeypatch)
    dash = make()
    assert dash.controls is not None
    note = dash.controls.delivery_note
    assert "ipykernel 6.29.5" in note.value and "controls act after the cell" in note.value
    assert "--background" in note.value and note.layout.display != "none"
    dash.on_start(info())  # a foreground run: on the main thread
    dash.flush()
    assert note.layout.display != "none"


def test_the_note_is_hidden_for_a_background_run(monkeypatch: pytest.MonkeyPatch) -> None:
    _no_live_clicks(monkeypatch)
    dash = make()
    worker = threading.Thread(target=dash.on_start, args=(info(),))
    worker.start()
    worker.join()
    dash.flush()
    assert dash.controls is not None and dash.controls.delivery_note.layout.display == "none"


@pytest.mark.parametrize("answer", [(True, ""), (None, "")])
def test_no_note_when_clicks_arrive_or_outside_a_kernel(
    monkeypatch: pytest.MonkeyPatch, answer: tuple[bool | None, str]
) -> None:
    monkeypatch.setattr(click_delivery, "clicks_during_cell", lambda: answer)
    dash = make()
    assert dash.controls is not None
    assert dash.controls.delivery_note.value == ""
    assert dash.controls.delivery_note.layout.display == "none"


def test_detection_reads_the_kernel_version_and_its_comm_routing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from ipykernel.comm.comm import BaseComm
    from ipykernel.kernelbase import Kernel

    assert click_delivery.clicks_during_cell() == (None, "")  # no kernel in this process
    monkeypatch.setattr(Kernel, "initialized", classmethod(lambda cls: True))
    versions = {"ipykernel": "6.29.5"}
    monkeypatch.setattr(importlib.metadata, "version", lambda name: versions[name])
    assert click_delivery.clicks_during_cell() == (False, "ipykernel 6.29.5, before 7")
    versions["ipykernel"] = "7.1.0"
    if hasattr(BaseComm, "_reply_subshell_for"):
        assert click_delivery.clicks_during_cell() == (True, "")
        monkeypatch.delattr(BaseComm, "_reply_subshell_for")
    live, why = click_delivery.clicks_during_cell()
    assert live is False and "without comm routing" in why
