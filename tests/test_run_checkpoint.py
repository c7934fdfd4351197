"""Checkpoint and resume: N steps in one run equal k steps, a stop, and a resumed run to
N, bit for bit on CPU (model, optimizer, scheduler, history), with a shuffling DataLoader
and dropout (the RNG states and the epoch's batch order are restored); atomic files, the
newest ``keep`` kept; bad options and mismatched checkpoints are usage errors."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import params_of, same_params
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import adaptive_nb
from adaptive_nb.run.report import RunReport

N = 14


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 3))


def _loader(own_generator: bool = False) -> DataLoader[Any]:
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(96, 8, generator=g), torch.randint(0, 3, (96,), generator=g)
    shuffle_with = torch.Generator().manual_seed(5) if own_generator else None
    return DataLoader(TensorDataset(x, y), batch_size=16, shuffle=True, generator=shuffle_with)


def _step(model: nn.Module, batch: Any) -> torch.Tensor:
    x, y = batch
    return nn.functional.cross_entropy(model(x), y)


def _run(seed: int, steps: int, **kw: Any) -> tuple[nn.Module, Any, Any, RunReport]:
    model = _model(seed)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.7)
    report = adaptive_nb.train(
        _step,
        model=model,
        optimizer=opt,
        data=kw.pop("data", None) or _loader(),
        steps=steps,
        devices="cpu",
        policy="static",
        scheduler=sched,
        clip_grad_norm=1.0,
        **kw,
    )
    return model, opt, sched, report


@pytest.mark.parametrize("k", [4, 6, 9])
def test_stop_and_resume_equals_one_uninterrupted_run(tmp_path: Path, k: int) -> None:
    torch.manual_seed(123)
    ref, ref_opt, ref_sched, ref_report = _run(0, N)

    torch.manual_seed(123)
    _run(0, k, checkpoint_dir=tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir())[-1] == f"step-{k:09d}.pt"
    torch.manual_seed(999)  # whatever the RNG does in between is undone by the resume
    model, opt, sched, report = _run(7, N, checkpoint_dir=tmp_path, resume=True)

    assert same_params(params_of(ref), params_of(model))
    assert report.summary["steps"] == N and report.summary["resumed_from_step"] == k
    assert sched.state_dict() == ref_sched.state_dict()
    assert report.lr == ref_report.lr and report.grad_norm == ref_report.grad_norm
    ref_state, state = ref_opt.state_dict()["state"], opt.state_dict()["state"]
    assert all(
        torch.equal(ref_state[i][key], state[i][key]) for i in ref_state for key in ref_state[i]
    )


def test_every_n_steps_and_keep(tmp_path: Path) -> None:
    _, _, _, report = _run(0, 10, checkpoint_dir=tmp_path, checkpoint_every=3, keep=2)
    # written at steps 3, 6, 9 and at the end (10); the newest two are kept, no temp files
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-000000009.pt", "step-000000010.pt"]
    assert report.summary["checkpoints_written"] == 4
    assert report.summary["last_checkpoint"] == str(tmp_path / "step-000000010.pt")


def test_per_epoch_checkpoints_and_a_finished_run_resumes_to_nothing(tmp_path: Path) -> None:
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    adaptive_nb.train(
        _step,
        model=model,
        optimizer=opt,
        data=_loader(),
        epochs=2,
        devices="cpu",
        checkpoint_dir=tmp_path,
        keep=5,
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-000000006.pt", "step-000000012.pt"]
    before = params_of(model)
    report = adaptive_nb.train(
        _step,
        model=model,
        optimizer=opt,
        data=_loader(),
        epochs=2,
        devices="cpu",
        checkpoint_dir=tmp_path,
        resume=True,
    )
    assert report.summary["steps"] == 12 and report.summary["samples"] == 0
    assert same_params(before, params_of(model))
    again = adaptive_nb.train(
        _step,
        model=model,
        optimizer=opt,
        data=_loader(),
        epochs=3,
        devices="cpu",
        checkpoint_dir=tmp_path,
        resume=True,
    )  # one more epoch than before: exactly one epoch is left
    assert again.summary["steps"] == 18 and again.summary["samples"] == 96


def test_resume_true_without_a_checkpoint_starts_from_step_0(tmp_path: Path) -> None:
    _, _, _, report = _run(0, 3, checkpoint_dir=tmp_path / "new", resume=True)
    assert report.summary["steps"] == 3 and report.summary["resumed_from_step"] == 0
    assert any("no checkpoint" in e.detail for e in report.events)


def test_bad_checkpoint_options_are_usage_errors(tmp_path: Path) -> None:
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    a_file = tmp_path / "f.txt"
    a_file.write_text("x")
    for options, message in [
        ({"checkpoint_every": 5}, r"checkpoint_every=5 \(--checkpoint-every\) was given without"),
        ({"keep": 3}, "without checkpoint_dir"),
        ({"resume": True}, r"resume=True \(--resume\) needs checkpoint_dir"),
        ({"checkpoint_dir": a_file}, "is a file, not a directory"),
        ({"checkpoint_dir": tmp_path, "keep": 0}, r"keep=0 \(--keep\)"),
        ({"resume": tmp_path / "missing.pt"}, "no checkpoint file there"),
        ({"resume": a_file}, "cannot read the checkpoint"),
    ]:
        with pytest.raises(adaptive_nb.UsageError, match=message):
            adaptive_nb.train(
                _step, model=model, optimizer=opt, data=_loader(), devices="cpu", **options
            )


def test_a_checkpoint_of_another_setup_is_refused_before_anything_changes(tmp_path: Path) -> None:
    _run(0, 2, checkpoint_dir=tmp_path)
    other = nn.Sequential(nn.Linear(8, 5), nn.Linear(5, 3))
    opt = torch.optim.SGD(other.parameters(), lr=0.1)
    before = params_of(other)
    with pytest.raises(adaptive_nb.UsageError, match="different model"):
        adaptive_nb.train(
            _step,
            model=other,
            optimizer=opt,
            data=_loader(),
            devices="cpu",
            checkpoint_dir=tmp_path,
            resume=True,
        )
    assert same_params(before, params_of(other))
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(adaptive_nb.UsageError, match="scheduler state"):
        adaptive_nb.train(
            _step,
            model=model,
            optimizer=opt,
            data=_loader(),
            devices="cpu",
            checkpoint_dir=tmp_path,
            resume=True,
        )


class StopAt:
    """Early stopping from a callback: asks the active run to stop after step ``k``."""

    def __init__(self, k: int) -> None:
        self.k = k

    def on_step_end(self, step: int, loss: float | None, history: Any) -> None:
        if step == self.k:
            run = adaptive_nb.active_run()
            assert run is not None
            run.control.stop()


def test_a_run_stopped_by_a_callback_resumes_exactly_with_its_own_loader_generator(
    tmp_path: Path,
) -> None:
    """The loader shuffles with its own generator (``DataLoader(generator=…)``), whose
    state the checkpoint keeps too; the stop comes from a callback mid-epoch."""
    torch.manual_seed(1)
    ref, _, _, ref_report = _run(0, N, data=_loader(own_generator=True))
    torch.manual_seed(1)
    loader = _loader(own_generator=True)
    _, _, _, first = _run(0, N, data=loader, checkpoint_dir=tmp_path, callbacks=StopAt(8))
    assert first.summary["ended"] == "stopped" and first.summary["steps"] == 8
    loader.generator.manual_seed(77)  # type: ignore[union-attr]
    model, _, _, report = _run(3, N, data=loader, checkpoint_dir=tmp_path, resume=True)
    assert same_params(params_of(ref), params_of(model))
    assert report.lr == ref_report.lr


def test_the_report_names_the_checkpoint_and_the_resume(tmp_path: Path) -> None:
    _run(0, 2, checkpoint_dir=tmp_path)
    _, _, _, report = _run(0, 4, checkpoint_dir=tmp_path, resume=True)
    html = report._repr_html_()
    assert "Resumed from step" in html and "step-000000004.pt" in html
    assert report.summary["resumed_from"] == str(tmp_path / "step-000000002.pt")
    assert any("resumed from" in e.detail for e in report.events)
