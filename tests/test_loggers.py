"""``log=`` / ``--log``: TensorBoard, MLflow and CSV loggers, read back after a run; bad
specs are clear errors before anything runs; a failing logger never stops training."""

from __future__ import annotations

import csv
import logging
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import ce_step, make_data, make_model, params_of, same_params
from torch import nn

import adaptive_nb
from adaptive_nb.errors import UsageError
from adaptive_nb.events import RunInfo, TickRecord
from adaptive_nb.run import loggers as loggers_mod
from adaptive_nb.run.loggers import CsvLogger, build_loggers

STEPS = 6


def _evaluate(model: nn.Module) -> dict[str, float]:
    x, y = make_data(n=32, seed=1)[0]
    return {"val_loss": float(nn.functional.cross_entropy(model(x), y))}


def _reference() -> tuple[list[float], list[float]]:
    """Per-step loss and learning rate of the plain loop the run must equal."""
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    losses, lrs = [], []
    for x, y in make_data()[:STEPS]:
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
    return losses, lrs


def _train(log: Any, **kwargs: Any) -> adaptive_nb.RunReport:
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    return adaptive_nb.train(
        ce_step,
        model=model,
        optimizer=opt,
        data=make_data(),
        steps=STEPS,
        devices="cpu",
        policy="static",
        scheduler=torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5),
        clip_grad_norm=100.0,
        evaluate=_evaluate,
        eval_every=3,
        log=log,
        **kwargs,
    )


def test_csv_log_streams_every_series(tmp_path: Path) -> None:
    path = tmp_path / "logs" / "run.csv"
    report = _train(f"csv:{path}")
    with open(path, newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == ["wall_time", "step", "name", "value", "text"]
    series: dict[str, dict[int, float]] = defaultdict(dict)
    texts: list[str] = []
    for row in rows:
        if row["value"]:
            series[row["name"]][int(row["step"])] = float(row["value"])
        elif row["name"] == "events":
            texts.append(row["text"])
    losses, lrs = _reference()
    assert series["loss"] == {k + 1: v for k, v in enumerate(losses)}
    assert (
        series["lr"] == {k + 1: v for k, v in enumerate(lrs)} == dict(enumerate(report.lr, start=1))
    )
    assert series["grad_norm"] == dict(enumerate(report.grad_norm, start=1))
    evals = {e["step"]: e["metrics"]["val_loss"] for e in report.evaluations}
    assert series["eval/val_loss"] == evals and set(evals) == {3, 6}
    assert {"samples_per_s", "util_pct/cpu", "mem_used_mb/cpu"} <= set(series)
    assert any(t.startswith("eval: ") for t in texts)
    assert texts[-1].startswith("end: completed")


def test_tensorboard_log_reads_back(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    report = _train(f"tensorboard:{tmp_path / 'tb'}")
    acc = EventAccumulator(str(tmp_path / "tb"), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    losses, lrs = _reference()
    loss = acc.Scalars("loss")
    assert [e.step for e in loss] == list(range(1, STEPS + 1))
    assert [e.value for e in loss] == pytest.approx(losses, rel=1e-6)  # stored as float32
    assert [e.value for e in acc.Scalars("lr")] == pytest.approx(lrs, rel=1e-6)
    evals = acc.Scalars("eval/val_loss")
    assert [(e.step, pytest.approx(e.value, rel=1e-6)) for e in evals] == [
        (ev["step"], ev["metrics"]["val_loss"]) for ev in report.evaluations
    ]
    assert {"samples_per_s", "util_pct/cpu", "mem_used_mb/cpu"} <= set(acc.Tags()["scalars"])
    texts = [t.tensor_proto.string_val[0].decode() for t in acc.Tensors("events/text_summary")]
    assert any(t.startswith("end: completed") for t in texts)


def test_mlflow_log_reads_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 refuses it otherwise
    uri = (tmp_path / "mlruns").as_uri()
    report = _train(f"mlflow:{uri}")
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("adaptive_nb")
    assert experiment is not None
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.params["run_id"] == report.info.run_id
    assert run.data.params["policy"] == "static"
    losses, lrs = _reference()
    history = client.get_metric_history(run.info.run_id, "loss")
    assert sorted((m.step, m.value) for m in history) == list(
        zip(range(1, STEPS + 1), losses, strict=True)
    )
    lr = client.get_metric_history(run.info.run_id, "lr")
    assert [m.value for m in sorted(lr, key=lambda m: m.step)] == lrs
    evals = client.get_metric_history(run.info.run_id, "eval/val_loss")
    assert sorted((m.step, m.value) for m in evals) == [
        (e["step"], e["metrics"]["val_loss"]) for e in report.evaluations
    ]
    assert client.get_metric_history(run.info.run_id, "util_pct/cpu")
    events = Path(client.download_artifacts(run.info.run_id, "events.txt", str(tmp_path)))
    assert "end: completed" in events.read_text(encoding="utf-8")


def test_tick_series_per_device_with_names_every_backend_accepts(tmp_path: Path) -> None:
    """Shares, utilisation and memory of each device; "GPU 0 (A100)" → "GPU 0 _A100_"."""
    (logger,) = build_loggers(f"csv:{tmp_path / 'ticks.csv'}")
    names = ["GPU 0 (A100)", "GPU 1 (T4)"]
    logger.on_start(RunInfo("r1", 10, None, "adaptive", names, True, 64, 0.0))
    logger.on_tick(
        TickRecord(
            t=1.0,
            step=4,
            samples_per_s=100.0,
            loss=0.5,
            devices=names,
            shares={names[0]: 0.75, names[1]: 0.25},
            util_pct={names[0]: 90.0, names[1]: 40.0},
            mem_used_mb={names[0]: 1000.0, names[1]: 200.0},
            mem_other_mb={names[0]: 10.0, names[1]: 0.0},
            threads=None,
            predicted_step_s=0.2,
            measured_step_s=0.25,
        )
    )
    with open(tmp_path / "ticks.csv", newline="", encoding="utf-8") as fh:  # written live
        got = {r["name"]: float(r["value"]) for r in csv.DictReader(fh) if r["step"] == "4"}
    assert got == {
        "samples_per_s": 100.0,
        "share/GPU 0 _A100_": 0.75,
        "share/GPU 1 _T4_": 0.25,
        "util_pct/GPU 0 _A100_": 90.0,
        "util_pct/GPU 1 _T4_": 40.0,
        "mem_used_mb/GPU 0 _A100_": 1000.0,
        "mem_used_mb/GPU 1 _T4_": 200.0,
        "mem_other_mb/GPU 0 _A100_": 10.0,
        "mem_other_mb/GPU 1 _T4_": 0.0,
        "step_s/predicted": 0.2,
        "step_s/measured": 0.25,
    }
    logger.close("completed")


def test_several_specs_in_one_string_and_a_list(tmp_path: Path) -> None:
    uri = "mlflow:http://localhost:5000"
    built = build_loggers([f"csv:{tmp_path / 'a.csv'}, tensorboard:{tmp_path / 'tb'}", uri])
    assert [type(b).__name__ for b in built] == [
        "CsvLogger",
        "TensorBoardLogger",
        "MlflowLogger",
    ]
    assert build_loggers(None) == [] and build_loggers("") == []


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("wandb:x", "unknown logger 'wandb'"),
        ("tensorboard", "say where TensorBoard should write"),
        ("csv:", "name the file"),
        ("csv:{tmp}", "is a directory"),
        ("tensorboard:{tmp}/afile/tb", "is a file"),
    ],
)
def test_bad_specs_are_usage_errors_before_anything_runs(
    tmp_path: Path, spec: str, message: str
) -> None:
    (tmp_path / "afile").write_text("x")
    model = make_model()
    before = params_of(model)
    with pytest.raises(UsageError, match=message):
        adaptive_nb.train(
            ce_step,
            model=model,
            optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
            data=make_data(),
            steps=2,
            devices="cpu",
            log=spec.format(tmp=tmp_path),
        )
    assert same_params(before, params_of(model))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]  # nothing created


def test_unwritable_directory_and_missing_package(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    real_access = loggers_mod.os.access
    monkeypatch.setattr(
        loggers_mod.os, "access", lambda p, mode: Path(p) != locked and real_access(p, mode)
    )
    with pytest.raises(UsageError, match=r"directory .*locked \(where .*tb would be created\)"):
        build_loggers(f"tensorboard:{locked / 'tb'}")
    real_find = loggers_mod.importlib.util.find_spec
    monkeypatch.setattr(
        loggers_mod.importlib.util,
        "find_spec",
        lambda name, *a: None if name == "mlflow" else real_find(name, *a),
    )
    with pytest.raises(UsageError, match=r'pip install "adaptive_nb\[mlflow\]"'):
        build_loggers("mlflow")


def test_mlflow_database_store_without_sqlalchemy_is_said_up_front(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///mlflow.db")
    real_find = loggers_mod.importlib.util.find_spec
    monkeypatch.setattr(
        loggers_mod.importlib.util,
        "find_spec",
        lambda name, *a: None if name == "sqlalchemy" else real_find(name, *a),
    )
    with pytest.raises(UsageError, match="needs SQLAlchemy"):
        build_loggers("mlflow")
    with pytest.raises(UsageError, match="needs SQLAlchemy"):
        build_loggers("mlflow:postgresql+psycopg2://u@h/db")
    assert build_loggers("mlflow:http://localhost:5000")  # a server needs no driver


def test_mlflow_file_store_refused_by_mlflow_is_said_up_front(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    from mlflow import environment_variables

    if getattr(environment_variables, "MLFLOW_ALLOW_FILE_STORE", None) is None:
        pytest.skip("this MLflow accepts file stores without opting in")
    with pytest.raises(UsageError, match="MLFLOW_ALLOW_FILE_STORE=true"):
        build_loggers(f"mlflow:{(tmp_path / 'mlruns').as_uri()}")


def test_a_failing_logger_stops_logging_never_training(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    calls = {"n": 0}
    original = CsvLogger.scalars

    def flaky(self: CsvLogger, step: int, values: dict[str, float]) -> None:
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError("disk full")
        original(self, step, values)

    monkeypatch.setattr(CsvLogger, "scalars", flaky)
    with caplog.at_level(logging.WARNING, logger="adaptive_nb"):
        report = _train(f"csv:{tmp_path / 'run.csv'}")
    assert report.summary["steps"] == STEPS and report.summary["ended"] == "completed"
    warnings = [r for r in caplog.records if "CSV logging failed" in r.getMessage()]
    assert len(warnings) == 1 and "disk full" in warnings[0].getMessage()
    assert calls["n"] == 3  # nothing was written after the failure


def test_start_logs_a_background_run(tmp_path: Path) -> None:
    model = make_model()
    run = adaptive_nb.start(
        ce_step,
        model=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        data=make_data(),
        steps=4,
        devices="cpu",
        log=[f"csv:{tmp_path / 'bg.csv'}"],
    )
    report = run.wait(60)
    with open(tmp_path / "bg.csv", newline="", encoding="utf-8") as fh:
        losses = [r for r in csv.DictReader(fh) if r["name"] == "loss"]
    assert (
        [int(r["step"]) for r in losses]
        == [1, 2, 3, 4]
        == list(range(1, report.summary["steps"] + 1))
    )
