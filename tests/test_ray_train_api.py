"""``adaptive_nb.train(..., engine="ray")`` and ``%%adaptive_train --engine ray`` on a
local Ray (one per module): the notebook's model holds the result of the run; a worker
killed mid-run is restarted by Ray Train from its checkpoint, the steps after it are
replayed, and the run completes with exactly the requested steps applied once (the same
parameters as the single-process full-batch reference); the report tells of the restart;
no Ray worker is left behind."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from typing import Any

import pytest
from IPython.core.interactiveshell import InteractiveShell
from ray_support import job, local_ray, max_diff, pids_alive, reference, slow_rank1_step, step

import adaptive_nb
from adaptive_nb import RunReport
from adaptive_nb.engine.ray_train import RayConnection

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def cluster() -> Iterator[RayConnection]:
    yield from local_ray()


class KillWorker:
    """A checkpoint once 2 steps are applied, then worker 1 killed once 5 are."""

    def __init__(self) -> None:
        self.pids: list[int] = []
        self.run_dir: str | None = None

    def on_step_end(self, step: int, loss: Any, history: Any) -> None:
        run = adaptive_nb.active_run()
        assert run is not None
        engine: Any = run.engine
        self.run_dir = engine.run_dir
        self.pids += [i["pid"] for i in engine.group.infos.values() if i["pid"] not in self.pids]
        if step == 2:
            engine.checkpoint_every_s = 0.0  # a checkpoint before the next step
        elif step == 3:
            engine.checkpoint_every_s = 1e9
        elif step == 5:
            # Ray Train registers a reported checkpoint at its next poll of the workers
            # (every 2 s) and writes its manager's snapshot then: wait for it
            snapshot = os.path.join(engine.run_dir, "checkpoint_manager_snapshot.json")
            deadline = time.monotonic() + 60
            while not os.path.exists(snapshot) and time.monotonic() < deadline:
                time.sleep(0.2)
            os.kill(engine.group.infos[1]["pid"], signal.SIGKILL)


def test_killed_worker_run_completes_with_every_step_applied_once(
    cluster: RayConnection,
) -> None:
    model, opt, data = job(9)
    killer = KillWorker()
    report = adaptive_nb.train(
        step,
        model=model,
        optimizer=opt,
        data=data,
        steps=9,
        engine="ray",
        workers=2,
        policy="static",
        callbacks=killer,
    )
    summary = report.summary
    assert summary["ended"] == "completed" and summary["steps"] == 9
    assert summary["ray_restarts"] == 1 and summary["ray_checkpoints"] == 1
    (restart,) = summary["ray_restart_history"]
    # on_step_end counts committed steps from 1: the checkpoint holds 2, the kill came
    # after 5, so steps 3-5 were replayed before step 6 ran
    assert restart["checkpoint_step"] == 2 and restart["at_step"] == 5
    assert restart["replayed"] == 3
    assert any("restarted the workers" in e.detail for e in report.events)
    assert any("Ray Train workers: 0: cpu" in e.detail for e in report.events)
    assert max_diff(model, reference(9)) < 1e-6  # the notebook's model holds the result
    assert pids_alive(killer.pids, 30.0) == []
    assert killer.run_dir is not None and not os.path.exists(killer.run_dir)  # removed


SETUP = """
import torch
from torch import nn

class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))
    def forward(self, x):
        return self.body(x)

def smooth_ce(logits, y):
    return nn.functional.cross_entropy(logits, y, label_smoothing=0.1)

g = torch.Generator().manual_seed(0)
loader = [(torch.randn(10, 6, generator=g), torch.randint(0, 3, (10,), generator=g))
          for _ in range(4)]
torch.manual_seed(3); net = Net()
opt = torch.optim.SGD(net.parameters(), lr=0.1)
torch.manual_seed(3); ref = Net()
ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1)
for xb, yb in loader:
    ref_opt.zero_grad(); smooth_ce(ref(xb), yb).backward(); ref_opt.step()
"""


def test_magic_runs_the_cell_on_ray_workers(cluster: RayConnection) -> None:
    ip = InteractiveShell.instance()
    ip.run_line_magic("load_ext", "adaptive_nb")
    ip.run_cell(SETUP)
    try:
        report = ip.run_cell_magic(
            "adaptive_train",
            "--model net --optimizer opt --data loader --no-widget --engine ray --workers 2",
            "x, y = batch\nloss = smooth_ce(model(x), y)\n",
        )
        assert isinstance(report, RunReport)
        assert report.summary["ended"] == "completed" and report.summary["steps"] == 4
        assert max_diff(ip.user_ns["net"], ip.user_ns["ref"]) < 1e-6
        assert "loss" not in ip.user_ns and "x" not in ip.user_ns
    finally:
        for name in ("Net", "smooth_ce", "g", "loader", "net", "opt", "ref", "ref_opt", "xb", "yb"):
            ip.user_ns.pop(name, None)


def test_planner_gives_a_slower_worker_a_smaller_share(cluster: RayConnection) -> None:
    """Heterogeneous workers: worker 1 takes 3 ms more per sample; the planner, fed each
    worker's measured step times every step, moves samples to worker 0. An evaluation
    sees the workers' state of its step."""
    model, opt, data = job(40, batch=32)
    report = adaptive_nb.train(
        slow_rank1_step,
        model=model,
        optimizer=opt,
        data=data,
        steps=40,
        engine="ray",
        workers=2,
        policy="weights",
        control_interval=0.2,
        evaluate=lambda m: {"w": float(m.body[0].weight.double().sum())},
        eval_every=20,
    )
    assert report.summary["ended"] == "completed"
    last = report.timeline[-1].shares
    assert last["ray worker 0"] > 0.6 > last["ray worker 1"], last
    assert max_diff(model, reference(40, batch=32)) < 1e-5
    # the evaluation after step 20 saw the workers' state of step 20
    at_20 = float(reference(20, batch=32).body[0].weight.double().sum())
    first = report.evaluations[0]
    assert first["step"] == 20 and abs(first["metrics"]["w"] - at_20) < 1e-4, first
