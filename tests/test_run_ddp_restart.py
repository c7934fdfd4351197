"""``train(engine="ddp")`` with checkpoints and ``max_restarts`` (CPU, gloo): a checkpoint
holds the ranks' state of a completed step in the DataParallel engine's format (a run
resumes under either engine); a rank killed mid-run with ``max_restarts=1`` restarts the
group on the remaining ranks from the newest checkpoint and replays the steps after it
on the same batches (a shuffling DataLoader included), so the parameters equal a
single-process full-batch loop and every step counts once; with ``max_restarts=0`` the
run stops cleanly at the last completed step. No rank is left running."""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

import pytest
import torch
from ddp_support import worker_children
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

import adaptive_nb
from adaptive_nb import UsageError

pytestmark = pytest.mark.timeout(240)

BATCH = 9


def _model() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))


def _loader() -> DataLoader[Any]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4 * BATCH, 4, generator=g)
    y = torch.randint(0, 3, (4 * BATCH,), generator=g)
    return DataLoader(
        TensorDataset(x, y),
        batch_size=BATCH,
        shuffle=True,
        generator=torch.Generator().manual_seed(7),
    )


def _step(model: nn.Module, batch: Any) -> torch.Tensor:
    x, y = batch
    return F.cross_entropy(model(x), y)


def _setup() -> tuple[nn.Module, torch.optim.Optimizer, Any]:
    net = _model()
    opt = torch.optim.SGD(net.parameters(), lr=0.2, momentum=0.9)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)
    return net, opt, sched


def _reference(steps: int) -> nn.Module:
    """A plain single-process loop over the same loader (same shuffled order)."""
    net, opt, sched = _setup()
    loader = _loader()
    done = 0
    while done < steps:
        for batch in loader:
            opt.zero_grad()
            _step(net, batch).backward()
            opt.step()
            sched.step()
            done += 1
            if done == steps:
                break
    return net


def _assert_same(net: nn.Module, ref: nn.Module) -> None:
    for (name, p), q in zip(net.named_parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)


class KillRank:
    """Kills one rank (SIGKILL) right after step ``at`` and records every step it is told of."""

    def __init__(self, at: int, victim: int) -> None:
        self.at, self.victim = at, victim
        self.steps: list[int] = []
        self.killed: int | None = None

    def on_step_end(self, step: int, loss: float | None, history: Any) -> None:
        self.steps.append(step)
        if step == self.at and self.killed is None:
            run = adaptive_nb.last_run()
            assert run is not None
            self.killed = run.engine.group.pids[self.victim]  # type: ignore[attr-defined]
            os.kill(self.killed, signal.SIGKILL)


def _train(tmp_path: Path, steps: int, **kwargs: Any) -> tuple[Any, nn.Module, Any]:
    net, opt, sched = _setup()
    report = adaptive_nb.train(
        _step,
        model=net,
        optimizer=opt,
        data=_loader(),
        steps=steps,
        devices="cpu",
        scheduler=sched,
        control_interval=0.05,
        checkpoint_dir=tmp_path,
        **kwargs,
    )
    return report, net, opt


def test_a_checkpoint_holds_the_ranks_completed_step_and_resumes_under_either_engine(
    tmp_path: Path,
) -> None:
    first, net, _ = _train(tmp_path / "ddp", 3, engine="ddp", workers=2, checkpoint_every=2)
    assert first.summary["ended"] == "completed" and first.summary["steps"] == 3
    _assert_same(net, _reference(3))
    saved = torch.load(tmp_path / "ddp" / "step-000000002.pt", weights_only=True)
    ref2 = _reference(2)
    for name, value in ref2.state_dict().items():
        torch.testing.assert_close(saved["model"][name], value, rtol=1e-5, atol=1e-6)
    assert saved["step"] == 2 and saved["optimizer"]["state"]  # momentum buffers included

    # a DDP checkpoint resumed by the DataParallel engine (the CPU here) ...
    _, net, _ = _train(tmp_path / "ddp", 6, resume=True)
    _assert_same(net, _reference(6))
    # ... and a DataParallel checkpoint resumed by DDP ranks
    _train(tmp_path / "dp", 5)
    report, net, _ = _train(tmp_path / "dp", 7, engine="ddp", workers=2, resume=True)
    assert report.summary["resumed_from_step"] == 5 and report.summary["steps"] == 7
    _assert_same(net, _reference(7))
    assert worker_children() == []


def test_a_killed_rank_restarts_the_group_from_the_checkpoint_and_replays_exactly(
    tmp_path: Path,
) -> None:
    killer = KillRank(at=5, victim=1)
    report, net, opt = _train(
        tmp_path,
        8,
        engine="ddp",
        workers=3,
        checkpoint_every=2,
        max_restarts=1,
        callbacks=[killer],
    )
    summary = report.summary
    assert summary["ended"] == "completed", report.events
    assert summary["steps"] == 8 and summary["samples"] == 8 * BATCH
    assert summary["restarts"] == 1
    (restart,) = summary["restart_history"]
    assert restart["lost"] == "rank 1 (cpu)" and restart["ranks"] == 2
    assert restart["back_to_step"] == 4 and restart["at_step"] in (5, 6)
    assert killer.steps == list(range(1, 9))  # each step told once, replayed ones not again
    _assert_same(net, _reference(8))
    assert opt.param_groups[0]["lr"] == pytest.approx(0.2 * 0.5**2)
    told = [e.detail for e in report.events if "restart 1 of 1" in e.detail]
    assert len(told) == 1 and "goes back to" in told[0] and "step-000000004.pt" in told[0]
    assert "rank 1 (cpu)" in summary["devices_failed"]
    assert worker_children() == []


def test_a_killed_rank_without_restarts_stops_at_the_last_completed_step(
    tmp_path: Path,
) -> None:
    killer = KillRank(at=3, victim=2)
    report, net, _ = _train(
        tmp_path, 8, engine="ddp", workers=3, checkpoint_every=2, callbacks=[killer]
    )
    summary = report.summary
    assert summary["ended"] == "stopped: no usable device"
    assert summary["steps"] == 3 and "restarts" in summary and summary["restarts"] == 0
    _assert_same(net, _reference(3))
    assert worker_children() == []


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"engine": "ddp", "max_restarts": 1}, "needs checkpoint_dir (--checkpoint DIR)"),
        ({"max_restarts": 1, "checkpoint_dir": "x"}, "restarts the rank processes"),
        ({"engine": "ddp", "max_restarts": -1}, "max_restarts (--max-restarts) must be"),
    ],
)
def test_restart_options_are_refused_before_anything_starts(
    kwargs: dict[str, Any], needle: str
) -> None:
    net, opt, _ = _setup()
    with pytest.raises(UsageError) as err:
        adaptive_nb.train(_step, model=net, optimizer=opt, data=_loader(), devices="cpu", **kwargs)
    assert needle in str(err.value)
    assert worker_children() == []
