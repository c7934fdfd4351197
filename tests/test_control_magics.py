"""``%adaptive status|pause|resume|stop`` and ``%%adaptive_monitor`` through an IPython
shell."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from IPython.core.error import UsageError
from IPython.core.interactiveshell import InteractiveShell
from torch import nn

import adaptive_nb
from adaptive_nb.events import EventKind
from adaptive_nb.jupyter.control_magics import ControlMagics, format_status
from adaptive_nb.monitor.report import MonitorReport


@pytest.fixture(scope="module")
def shell() -> InteractiveShell:
    sh = InteractiveShell.instance()
    sh.register_magics(ControlMagics)
    return sh


@pytest.fixture
def slow_run() -> Iterator[Any]:
    """A background run of 5 ms steps that lasts until stopped."""
    torch.manual_seed(0)
    net = nn.Linear(4, 2)
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    data = [(torch.randn(8, 4), torch.randint(0, 2, (8,))) for _ in range(4)]

    def step(model: nn.Module, batch: Any) -> torch.Tensor:
        time.sleep(0.005)
        x, y = batch
        return nn.functional.cross_entropy(model(x), y)

    run = adaptive_nb.start(
        step,
        model=net,
        optimizer=opt,
        data=data,
        steps=100_000,
        devices="cpu",
        control_interval=0.05,
    )
    yield run
    run.control.stop()
    run.wait(30)


def _wait(cond: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.01)


def test_status_without_a_run(shell: InteractiveShell, capsys: pytest.CaptureFixture[str]) -> None:
    shell.run_line_magic("adaptive", "status")
    assert "no run in progress" in capsys.readouterr().out


@pytest.mark.parametrize("command", ["pause", "resume", "stop"])
def test_control_without_a_run_is_a_usage_error(shell: InteractiveShell, command: str) -> None:
    with pytest.raises(UsageError, match="no adaptive_nb run is in progress"):
        shell.run_line_magic("adaptive", command)


def test_unknown_command(shell: InteractiveShell) -> None:
    with pytest.raises(UsageError, match="unknown command"):
        shell.run_line_magic("adaptive", "halt")


def test_pause_resume_stop_a_background_run(
    shell: InteractiveShell, slow_run: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    run = slow_run
    _wait(lambda: run.step >= 3)
    shell.run_line_magic("adaptive", "status")
    out = capsys.readouterr().out
    assert f"run {run.run_id}" in out and "running" in out and "background" in out
    shell.run_line_magic("adaptive", "pause")
    _wait(lambda: run.control.paused)
    paused_at = run.step
    time.sleep(0.2)
    assert run.step == paused_at  # no step while paused
    shell.run_line_magic("adaptive", "status")
    assert "paused" in capsys.readouterr().out
    shell.run_line_magic("adaptive", "resume")
    _wait(lambda: run.step >= paused_at + 3)
    shell.run_line_magic("adaptive", "stop")
    report = run.wait(10)
    assert report.summary["ended"] == "stopped"
    assert report.summary["steps"] < 100_000
    kinds = [e.kind for e in report.events]
    assert EventKind.PAUSE in kinds and EventKind.RESUME in kinds and EventKind.STOP in kinds
    assert adaptive_nb.active_run() is None


def test_format_status_is_one_readable_line() -> None:
    line = format_status(
        {
            "run_id": "r1",
            "step": 5,
            "total_steps": 10,
            "epoch": 0,
            "samples_per_s": 12.5,
            "paused": False,
            "ended": "running",
            "policy": "weights",
            "devices": ["GPU 0", "GPU 1"],
            "shares": {"GPU 0": 0.6, "GPU 1": 0.4},
            "simulated": True,
            "background": False,
        }
    )
    assert line == (
        "adaptive_nb: run r1 · running · step 5/10 · epoch 1 · 12.5 samples/s · policy weights"
        " · devices: GPU 0 0.60, GPU 1 0.40 · SIMULATED devices"
    )


def test_monitor_cell_returns_its_value_and_stores_a_report(shell: InteractiveShell) -> None:
    shell.user_ns.pop("_adaptive_monitor", None)
    value = shell.run_cell_magic(
        "adaptive_monitor", "--rate 20 --no-widget", "import time\ntime.sleep(0.3)\n6 * 7"
    )
    assert value == 42
    report = shell.user_ns["_adaptive_monitor"]
    assert isinstance(report, MonitorReport)
    assert report.duration_s == pytest.approx(0.3, abs=0.25)
    assert report.samples >= 3
    assert report.cpu is not None and report.cpu.mem_total_mb > 0


def test_monitor_cell_error_propagates_and_still_reports(shell: InteractiveShell) -> None:
    shell.user_ns.pop("_mon", None)
    with pytest.raises(ZeroDivisionError):
        shell.run_cell_magic("adaptive_monitor", "--no-widget --out _mon", "1 / 0")
    assert isinstance(shell.user_ns["_mon"], MonitorReport)


def test_monitor_rejects_a_bad_rate(shell: InteractiveShell) -> None:
    with pytest.raises(UsageError, match="--rate"):
        shell.run_cell_magic("adaptive_monitor", "--rate 0", "pass")


def test_adaptive_stop_ends_a_background_train_cell(shell: InteractiveShell) -> None:
    shell.run_line_magic("load_ext", "adaptive_nb")
    torch.manual_seed(0)
    shell.user_ns.update(
        net=nn.Linear(4, 2),
        data=[(torch.randn(8, 4), torch.randint(0, 2, (8,))) for _ in range(4)],
        time=time,
        nn=nn,
    )
    shell.user_ns["opt"] = torch.optim.SGD(shell.user_ns["net"].parameters(), lr=0.01)
    shell.user_ns.pop("_bg", None)
    shell.run_cell_magic(
        "adaptive_train",
        "--model net --optimizer opt --data data --steps 100000 --devices cpu "
        "--background --no-widget --out _bg",
        "time.sleep(0.005)\nx, y = batch\nloss = nn.functional.cross_entropy(model(x), y)",
    )
    run = adaptive_nb.active_run()
    assert run is not None
    _wait(lambda: run.step >= 3)
    shell.run_line_magic("adaptive", "stop")
    report = run.wait(10)
    _wait(lambda: "_bg" in shell.user_ns)
    assert shell.user_ns["_bg"] is report
    assert report.summary["ended"] == "stopped" and report.summary["steps"] < 100_000
