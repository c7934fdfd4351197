"""The live dashboard driven with synthetic run records, and its controls."""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import ipywidgets
import pytest
import torch
from torch import nn

import adaptive_nb
from adaptive_nb.events import Event, EventKind, Progress, RunInfo, TickRecord
from adaptive_nb.jupyter.dashboard import Dashboard
from adaptive_nb.jupyter.dashboard.buffers import MultiSeries, Series
from adaptive_nb.run.control import RunControl

GPUS = ["GPU 0 (A100)", "GPU 1 (A100)"]


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Report:
    def __init__(self, ended: str, steps: int) -> None:
        self.summary = {"ended": ended, "steps": steps, "samples": steps * 64}
        self.timeline: list[TickRecord] = []
        self.events: list[Event] = []


def info(total: int | None = 100, epochs: int | None = 1, simulated: bool = False) -> RunInfo:
    return RunInfo("run1", total, epochs, "adaptive", list(GPUS), simulated, 64, time.time())


def progress(step: int, total: int | None = 100, epoch: int = 0, paused: bool = False) -> Progress:
    return Progress(step, total, epoch, step * 64, step * 0.1, 640.0, 5.0, 1.0 / (step + 1), paused)


def tick(t: float, share0: float = 0.5) -> TickRecord:
    return TickRecord(
        t=t,
        step=int(t * 10),
        samples_per_s=640.0,
        loss=0.5,
        devices=list(GPUS),
        shares={GPUS[0]: share0, GPUS[1]: 1.0 - share0},
        util_pct={GPUS[0]: 90.0, GPUS[1]: 40.0},
        mem_used_mb={GPUS[0]: 10240.0, GPUS[1]: 8192.0},
        mem_other_mb={GPUS[0]: 0.0, GPUS[1]: 40960.0},
        mem_total_mb={GPUS[0]: 81920.0, GPUS[1]: 81920.0},
    )


def make(clock: FakeClock | None = None, **kw: Any) -> tuple[Dashboard, RunControl]:
    control = RunControl()
    kw.setdefault("use_timer", False)
    dash = Dashboard(control, list(GPUS), False, clock=clock or FakeClock(), **kw)
    return dash, control


@pytest.fixture
def sent(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every widget state message (one per ``send_state`` call), by model name."""
    calls: list[str] = []
    original = ipywidgets.Widget.send_state

    def counting(self: ipywidgets.Widget, key: Any = None) -> None:
        calls.append(type(self).__name__)
        original(self, key)

    monkeypatch.setattr(ipywidgets.Widget, "send_state", counting)
    return calls


def test_records_show_in_the_widgets() -> None:
    clock = FakeClock()
    dash, _ = make(clock)
    dash.on_start(info(simulated=True))
    for i in range(1, 31):
        clock.now = i * 0.3
        dash.on_progress(progress(i))
        dash.on_tick(tick(i * 0.3, share0=0.7))
    dash.on_event(
        Event(2.0, EventKind.REALLOCATE, "GPU 1: external job at 60% → share 0.5 → 0.3", 20)
    )
    dash.flush()
    assert "SIMULATED" in dash.header.value
    assert "step <b>30</b> / 100" in dash.stats.value
    assert "640 samples/s" in dash.stats.value
    assert dash.progress_bar.value == 30 and dash.progress_bar.max == 100
    assert list(dash.figures.share_bars.y) == pytest.approx([0.7, 0.3])
    run, other, free = dash.figures.mem_bars.y
    assert list(other) == pytest.approx([0.0, 40.0])  # GiB held by other processes
    assert list(run + other + free) == pytest.approx([80.0, 80.0])
    assert dash.figures.util_lines.y.shape == (2, 30)
    assert "external job at 60%" in dash.event_log.value
    assert "reallocate" in dash.event_log.value


def test_no_simulated_label_on_real_devices() -> None:
    dash, _ = make()
    dash.on_start(info(simulated=False))
    assert "SIMULATED" not in dash.header.value


def test_unknown_epoch_length_shows_epochs() -> None:
    dash, _ = make()
    dash.on_start(info(total=None, epochs=3))
    dash.on_progress(progress(7, total=None, epoch=1))
    dash.flush()
    assert "length unknown" in dash.stats.value and "epoch 2 / 3" in dash.stats.value
    assert (dash.progress_bar.value, dash.progress_bar.max) == (1, 3)
    dash.on_end(Report("completed", 20))
    assert dash.progress_bar.bar_style == "success"
    assert dash.progress_bar.value == dash.progress_bar.max


def test_stopped_run_ends_with_a_partial_bar_and_disabled_controls() -> None:
    dash, _ = make()
    dash.on_start(info())
    dash.on_progress(progress(10))
    dash.on_event(Event(1.0, EventKind.STOP, "stop requested: stopping after step 12", 12))
    dash.on_end(Report("stopped", 12))
    assert dash.progress_bar.bar_style == "warning"
    assert dash.progress_bar.value == 12
    assert "stopped" in dash.status.value
    assert dash.controls is not None
    assert all(w.disabled for w in dash.controls.widgets())


def test_throttling_bounds_flushes_and_messages(sent: list[str]) -> None:
    clock = FakeClock()
    dash, _ = make(clock, update_hz=4.0)
    dash.on_start(info())
    sent.clear()
    flushes0 = dash.flushes
    for i in range(1, 1001):  # 1000 steps over 10 s: 100 steps/s
        clock.now = i * 0.01
        dash.on_progress(progress(i, total=1000))
        dash.on_tick(tick(i * 0.01))
    flushes = dash.flushes - flushes0
    assert 35 <= flushes <= 41  # ≤ 4 Hz over 10 s
    per_flush = len(sent) / flushes
    assert per_flush <= 16  # one message per changed widget, not per trait
    assert len(sent) <= 41 * 16

    # without throttling the same run would send far more
    clock2 = FakeClock()
    fast, _ = make(clock2, update_hz=1000.0)
    fast.on_start(info())
    sent.clear()
    for i in range(1, 1001):
        clock2.now = i * 0.01
        fast.on_progress(progress(i, total=1000))
        fast.on_tick(tick(i * 0.01))
    assert len(sent) > 10 * 41 * 4


def test_ring_buffers_bound_points() -> None:
    clock = FakeClock()
    dash, _ = make(clock, max_points=100)
    dash.on_start(info(total=None, epochs=None))
    for i in range(1, 5001):
        clock.now = i * 0.3  # every call may flush
        dash.on_progress(progress(i, total=None))
        dash.on_tick(tick(i * 0.3))
    dash.flush()
    assert dash.figures.util_lines.x.shape[0] <= 100
    assert dash.figures.tput_line.x.shape[0] <= 100
    # the plot still covers the whole run: first and newest points are kept
    assert dash.figures.util_lines.x[0] == pytest.approx(0.3)
    assert dash.figures.util_lines.x[-1] == pytest.approx(1500.0)


def test_series_halves_when_full() -> None:
    s = Series(max_points=10)
    for i in range(1000):
        s.append(float(i), float(i))
    x, y = s.data()
    assert len(x) <= 10 and x[0] == 0.0 and x[-1] == 999.0 and x == y
    assert x == sorted(x)
    m = MultiSeries(max_points=8)
    m.append(0.0, {"a": 1.0})
    m.append(1.0, {"a": 2.0, "b": 3.0})  # a device that appears later
    xs, (a, b) = m.data(["a", "b"])
    assert xs == [0.0, 1.0] and a == [1.0, 2.0] and b[1] == 3.0 and b[0] != b[0]  # NaN gap


def test_a_raising_widget_never_propagates(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    clock = FakeClock()
    dash, _ = make(clock)
    dash.on_start(info())

    def boom(*_a: Any, **_k: Any) -> None:
        raise RuntimeError("renderer exploded")

    monkeypatch.setattr(dash.figures, "update_util", boom)
    with caplog.at_level(logging.WARNING, logger="adaptive_nb.dashboard"):
        for i in range(1, 50):
            clock.now = i * 1.0
            dash.on_tick(tick(float(i)))  # must not raise
            dash.on_progress(progress(i))
            dash.on_event(Event(float(i), EventKind.HOLD, "nothing to gain", i))
        dash.on_end(Report("completed", 49))
    assert dash.disabled
    records = [r for r in caplog.records if "dashboard stopped updating" in r.getMessage()]
    assert len(records) == 1
    assert "training continues" in dash.status.value


def test_send_failure_also_disables(monkeypatch: pytest.MonkeyPatch) -> None:
    dash, _ = make()

    def broken(self: Any, key: Any = None) -> None:
        raise OSError("comm closed")

    monkeypatch.setattr(ipywidgets.Widget, "send_state", broken)
    dash.on_start(info())  # no exception
    assert dash.disabled


def test_timer_sends_the_last_pending_update() -> None:
    dash = Dashboard(RunControl(), list(GPUS), False, update_hz=10.0)
    dash.on_start(info())
    dash.on_progress(progress(1))
    dash.on_progress(progress(2))  # within 0.1 s: held back, timer armed
    deadline = time.monotonic() + 2.0
    while "step <b>2</b>" not in dash.stats.value and time.monotonic() < deadline:
        time.sleep(0.02)
    assert "step <b>2</b>" in dash.stats.value


def test_control_handlers_post_requests() -> None:
    dash, control = make()
    c = dash.controls
    assert c is not None
    c.pause_button.click()
    assert control.take().pause is True
    c.resume_button.click()
    assert control.take().pause is False
    c.policy.value = "static"
    assert control.take().policy == "static"
    c.headroom.value = 0.25
    assert control.take().headroom == pytest.approx(0.25)
    c.device_toggles[1].value = False
    assert control.take().device_enabled == {1: False}
    c.stop_button.click()
    assert control.take().stop is True
    assert control.take().empty()


def test_buttons_follow_the_run_state() -> None:
    dash, _ = make()
    c = dash.controls
    assert c is not None
    dash.on_start(info())
    assert not c.pause_button.disabled and c.resume_button.disabled
    dash.on_event(Event(1.0, EventKind.PAUSE, "paused at step 3 (requested)", 3))
    dash.flush()
    assert c.pause_button.disabled and not c.resume_button.disabled
    assert "Paused" in dash.status.value
    dash.on_event(Event(2.0, EventKind.POLICY, "policy adaptive → weights (requested)", 3))
    dash.flush()
    assert c.policy.value == "weights"
    # reflecting the run's policy does not post a new request
    assert dash.control is not None and dash.control.take().policy is None


def test_the_loop_obeys_widget_clicks_at_the_next_step() -> None:
    torch.manual_seed(0)
    net = nn.Linear(4, 2)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    data = [(torch.randn(8, 4), torch.randint(0, 2, (8,))) for _ in range(5)]
    control = RunControl()
    dash = Dashboard(control, ["cpu"], False, update_hz=50.0)
    assert dash.controls is not None
    controls = dash.controls
    seen: list[int] = []

    def resume_later() -> None:
        time.sleep(0.3)
        controls.resume_button.click()  # from another thread, like a widget subshell

    def step(model: nn.Module, batch: Any) -> torch.Tensor:
        x, y = batch
        seen.append(len(seen) + 1)
        if len(seen) == 5:
            controls.pause_button.click()
            threading.Thread(target=resume_later, daemon=True).start()
        if len(seen) == 12:
            controls.stop_button.click()
        return nn.functional.cross_entropy(model(x), y)

    report = adaptive_nb.train(
        step,
        model=net,
        optimizer=opt,
        data=data,
        steps=100,
        devices="cpu",
        observers=[dash],
        control=control,
        control_interval=0.05,
    )
    kinds = [(e.kind, e.step) for e in report.events]
    assert (EventKind.PAUSE, 5) in kinds
    assert (EventKind.RESUME, 5) in kinds
    assert (EventKind.STOP, 12) in kinds
    assert report.summary["steps"] == 12
    assert report.summary["ended"] == "stopped"
    assert dash.progress_bar.bar_style == "warning"
    assert "stopped" in dash.status.value


def test_report_plot_returns_the_evaluation_figures() -> None:
    from adaptive_nb.run.report import RunReport

    timeline = [tick(float(t), share0=0.5 if t < 5 else 0.8) for t in range(10)]
    events = [Event(5.0, EventKind.REALLOCATE, "GPU 1: external job → share 0.5 → 0.2", 50)]
    report = RunReport(
        info=info(simulated=True), summary={"ended": "completed"}, timeline=timeline, events=events
    )
    figs = report.plot()
    assert [f.title for f in figs] == [
        "Throughput (simulated)",
        "Utilisation per device (%) (simulated)",
        "Allocation timeline: share of the global batch (simulated)",
    ]
    alloc = figs[2].marks
    assert alloc[0].labels == GPUS and alloc[0].y.shape == (2, 10)
    assert list(alloc[0].y[0][[0, 9]]) == pytest.approx([0.5, 0.8])
    assert list(alloc[1].x) == [5.0]  # the reallocation is marked
    # a report loaded back from JSON plots the same
    again = RunReport.from_json(report.to_json())
    assert again.plot()[2].marks[0].y.shape == (2, 10)
