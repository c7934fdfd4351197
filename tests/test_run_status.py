"""Run status files: publish, throttled update, removal, stale cleanup of dead processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from adaptive_nb.events import Event, EventKind, Progress, RunInfo, TickRecord
from adaptive_nb.jupyter.run_status import (
    FILE_PREFIX,
    RunStatusPublisher,
    current_kernel_id,
    read_runs,
    status_path,
)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def info(simulated: bool = False) -> RunInfo:
    return RunInfo(
        run_id="r1",
        total_steps=400,
        epochs=None,
        policy="adaptive",
        devices=["GPU 0 (A100)", "GPU 1 (A100)"],
        simulated=simulated,
        global_batch=256,
        started_at=time.time(),
    )


def progress(step: int, rate: float = 800.0) -> Progress:
    return Progress(
        step=step,
        total_steps=400,
        epoch=0,
        samples=step * 256,
        elapsed_s=step * 0.1,
        samples_per_s=rate,
        eta_s=(400 - step) * 0.1,
        loss=0.5,
    )


def read(path: Path) -> dict:
    return json.loads(path.read_text())


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def pub(tmp_path: Path, clock: Clock) -> RunStatusPublisher:
    return RunStatusPublisher(
        kernel_id="k-123", notebook="work/train.ipynb", directory=tmp_path, clock=clock
    )


def test_start_publishes_file_with_run_fields(pub: RunStatusPublisher, tmp_path: Path) -> None:
    assert not pub.path.exists()
    pub.on_start(info(simulated=True))
    assert pub.path == tmp_path / f"{FILE_PREFIX}k-123.json"
    data = read(pub.path)
    assert data["kernel_id"] == "k-123"
    assert data["notebook"] == "work/train.ipynb"
    assert data["pid"] == os.getpid()
    assert data["total_steps"] == 400 and data["step"] == 0
    assert data["devices"] == ["GPU 0 (A100)", "GPU 1 (A100)"]
    assert data["policy"] == "adaptive"
    assert data["simulated"] is True
    assert data["started"] == pytest.approx(time.time(), abs=5)
    # no temp file left behind
    assert [p.name for p in tmp_path.iterdir()] == [pub.path.name]


def test_updates_are_throttled_to_one_per_second(pub: RunStatusPublisher, clock: Clock) -> None:
    pub.on_start(info())
    assert pub.writes == 1
    for i in range(1, 10):  # ten progress reports within 0.9 s
        clock.now += 0.1
        pub.on_progress(progress(i))
    assert pub.writes == 1
    assert read(pub.path)["step"] == 0
    clock.now += 0.15  # 1.05 s after the first write
    pub.on_progress(progress(10, rate=812.0))
    assert pub.writes == 2
    data = read(pub.path)
    assert data["step"] == 10 and data["samples_per_s"] == 812.0
    assert data["eta_s"] == pytest.approx(39.0)


def test_tick_and_events_update_shares_policy_pause(pub: RunStatusPublisher, clock: Clock) -> None:
    pub.on_start(info())
    clock.now += 2
    pub.on_tick(
        TickRecord(
            t=1.0,
            step=5,
            samples_per_s=700.0,
            loss=0.4,
            devices=["GPU 0 (A100)", "GPU 1 (A100)"],
            shares={"GPU 0 (A100)": 0.625, "GPU 1 (A100)": 0.375},
        )
    )
    assert read(pub.path)["shares"] == {"GPU 0 (A100)": 0.625, "GPU 1 (A100)": 0.375}
    clock.now += 2
    pub.on_event(Event(t=2.0, kind=EventKind.POLICY, detail="policy adaptive → static (requested)"))
    assert read(pub.path)["policy"] == "static"
    clock.now += 2
    pub.on_event(Event(t=3.0, kind=EventKind.PAUSE, detail="paused"))
    assert read(pub.path)["paused"] is True


def test_flush_writes_pending_change_despite_throttle(
    pub: RunStatusPublisher, clock: Clock
) -> None:
    pub.on_start(info())
    clock.now += 0.2
    pub.on_progress(progress(3))
    assert read(pub.path)["step"] == 0
    pub.flush()
    assert read(pub.path)["step"] == 3


def test_end_removes_file_and_later_updates_do_not_recreate_it(
    pub: RunStatusPublisher, clock: Clock
) -> None:
    pub.on_start(info())
    assert pub.path.exists()
    pub.on_end(None)  # type: ignore[arg-type]  # the report is not read
    assert not pub.path.exists()
    clock.now += 5
    pub.on_progress(progress(1))
    assert not pub.path.exists()
    pub.close()  # idempotent


def test_context_manager_removes_file_on_exception(tmp_path: Path) -> None:
    pub = RunStatusPublisher(kernel_id="k", directory=tmp_path)
    with pytest.raises(RuntimeError, match="boom"), pub:
        pub.on_start(info())
        assert pub.path.exists()
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_non_finite_numbers_are_written_as_null(pub: RunStatusPublisher, clock: Clock) -> None:
    pub.on_start(info())
    clock.now += 2
    pub.on_progress(
        Progress(
            step=1,
            total_steps=400,
            epoch=0,
            samples=256,
            elapsed_s=0.1,
            samples_per_s=float("inf"),
            eta_s=None,
            loss=float("nan"),
        )
    )
    data = read(pub.path)
    assert data["samples_per_s"] is None and data["loss"] is None


def test_read_runs_lists_live_runs_oldest_first(tmp_path: Path) -> None:
    a = RunStatusPublisher(kernel_id="a", directory=tmp_path)
    b = RunStatusPublisher(kernel_id="b", directory=tmp_path)
    b.on_start(info())
    time.sleep(0.01)
    a.on_start(info())
    runs = read_runs(tmp_path)
    assert [r["kernel_id"] for r in runs] == ["b", "a"]  # by start time (same started_at → stable)
    assert all("pid_started" not in r for r in runs)
    a.close()
    assert [r["kernel_id"] for r in read_runs(tmp_path)] == ["b"]


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_read_runs_removes_files_of_dead_processes(tmp_path: Path) -> None:
    live = RunStatusPublisher(kernel_id="live", directory=tmp_path)
    live.on_start(info())
    dead_path = status_path(tmp_path, "dead", 0)
    dead = read(live.path) | {"kernel_id": "dead", "pid": _dead_pid(), "pid_started": None}
    dead_path.write_text(json.dumps(dead))
    runs = read_runs(tmp_path)
    assert [r["kernel_id"] for r in runs] == ["live"]
    assert not dead_path.exists()
    assert live.path.exists()


def test_read_runs_removes_file_when_pid_was_reused(tmp_path: Path) -> None:
    path = status_path(tmp_path, "old", 0)
    # our pid, but "started" long before this process: the run's process is gone
    path.write_text(json.dumps({"pid": os.getpid(), "pid_started": 1000.0, "started": 1.0}))
    assert read_runs(tmp_path) == []
    assert not path.exists()


def test_read_runs_skips_young_partial_file_and_removes_old_one(tmp_path: Path) -> None:
    young = tmp_path / f"{FILE_PREFIX}young.json"
    old = tmp_path / f"{FILE_PREFIX}old.json"
    young.write_text("{not json")
    old.write_text("{not json")
    past = time.time() - 3600
    os.utime(old, (past, past))
    assert read_runs(tmp_path) == []
    assert young.exists() and not old.exists()


def test_read_runs_of_missing_directory_is_empty(tmp_path: Path) -> None:
    assert read_runs(tmp_path / "nope") == []


def test_defaults_outside_a_kernel(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(tmp_path))
    monkeypatch.setenv("JPY_SESSION_NAME", "nb/x.ipynb")
    assert current_kernel_id() is None
    pub = RunStatusPublisher()
    assert pub.kernel_id is None and pub.notebook == "nb/x.ipynb"
    assert pub.path == tmp_path / f"{FILE_PREFIX}pid-{os.getpid()}.json"


def test_train_publishes_while_running_and_removes_at_end(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    import adaptive_nb

    pub = RunStatusPublisher(kernel_id="k-train", directory=tmp_path, min_interval_s=0.0)
    seen: list[dict] = []

    class Spy(adaptive_nb.BaseObserver):
        def on_progress(self, progress: Progress) -> None:
            if pub.path.exists():
                seen.append(read(pub.path))

    model = torch.nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    data = [(torch.randn(8, 4), torch.randn(8, 1)) for _ in range(4)]

    def step(model, batch):  # type: ignore[no-untyped-def]
        x, y = batch
        return torch.nn.functional.mse_loss(model(x), y)

    adaptive_nb.train(
        step, model=model, optimizer=opt, data=data, steps=6, devices="cpu", observers=[pub, Spy()]
    )
    assert seen, "the status file was never visible during the run"
    assert seen[-1]["kernel_id"] == "k-train" and seen[-1]["total_steps"] == 6
    assert max(s["step"] for s in seen) >= 5
    assert not pub.path.exists()
