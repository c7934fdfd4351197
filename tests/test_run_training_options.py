"""Every training-loop option is checked before anything runs: a UsageError that names the
option (keyword and magic flag) and the fix, with the model, optimizer and scheduler
unchanged and no run started."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from conftest import ce_step, make_data, make_model, params_of, same_params

import adaptive_nb
from adaptive_nb.run.api import start


def _metrics(model: torch.nn.Module) -> dict[str, float]:
    return {"val_loss": 1.0}


def _cases(opt: torch.optim.Optimizer) -> list[tuple[str, dict[str, Any], str]]:
    """(name, options, message) with the schedulers built on ``opt``."""
    other = torch.optim.SGD(make_model(1).parameters(), lr=0.1)
    step_lr = torch.optim.lr_scheduler.StepLR
    plateau = torch.optim.lr_scheduler.ReduceLROnPlateau
    return [
        ("not a scheduler", {"scheduler": 3}, "not a learning-rate scheduler"),
        ("other optimizer", {"scheduler": step_lr(other, 2)}, "different optimizer"),
        (
            "interval",
            {"scheduler": step_lr(opt, 2), "scheduler_interval": "batch"},
            r"scheduler_interval='batch' \(--scheduler-interval\)",
        ),
        ("interval alone", {"scheduler_interval": "epoch"}, "without a scheduler"),
        ("metric alone", {"scheduler_metric": "val_loss"}, "without a scheduler"),
        (
            "metric for StepLR",
            {"scheduler": step_lr(opt, 2), "scheduler_metric": "val_loss"},
            "only for ReduceLROnPlateau",
        ),
        (
            "plateau without metric",
            {"scheduler": plateau(opt), "evaluate": _metrics},
            r"scheduler_metric='val_loss' \(--scheduler-metric val_loss\)",
        ),
        (
            "plateau without evaluate",
            {"scheduler": plateau(opt), "scheduler_metric": "val_loss"},
            r"needs evaluation metrics: pass evaluate=fn \(--eval NAME\)",
        ),
        (
            "plateau with interval",
            {
                "scheduler": plateau(opt),
                "scheduler_metric": "v",
                "evaluate": _metrics,
                "scheduler_interval": "epoch",
            },
            "drop scheduler_interval",
        ),
        ("negative clip", {"clip_grad_norm": -1.0}, r"clip_grad_norm=-1.0 \(--clip-grad-norm\)"),
        ("zero clip", {"clip_grad_norm": 0}, "positive finite"),
        ("nan clip", {"clip_grad_norm": float("nan")}, "positive finite"),
        ("text clip", {"clip_grad_norm": "1"}, "must be a positive number"),
        ("precision", {"precision": "fp64"}, r"precision='fp64' \(--precision\)"),
        ("fp16 on cpu", {"precision": "fp16"}, "needs CUDA GPUs"),
        ("evaluate", {"evaluate": "val"}, "not a function"),
        ("evaluate without argument", {"evaluate": lambda: {}}, "with the model alone"),
        ("eval_every alone", {"eval_every": 3}, "without an evaluation function"),
        ("eval_every zero", {"evaluate": _metrics, "eval_every": 0}, r"\(--eval-every\)"),
        ("callbacks", {"callbacks": object()}, "none of the callback methods"),
        ("accumulate", {"accumulate": 0}, r"\(--accumulate\)"),
    ]


def _names() -> list[str]:
    return [c[0] for c in _cases(torch.optim.SGD(make_model().parameters(), lr=0.1))]


@pytest.mark.parametrize("case", range(len(_names())), ids=_names())
def test_bad_options_are_usage_errors_before_anything_runs(case: int) -> None:
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    _, options, message = _cases(opt)[case]
    before = params_of(model)
    lr_before = opt.param_groups[0]["lr"]
    previous = adaptive_nb.last_run()
    for entry in (adaptive_nb.train, start):
        with pytest.raises(adaptive_nb.UsageError, match=message):
            entry(ce_step, model=model, optimizer=opt, data=make_data(), devices="cpu", **options)
    assert same_params(before, params_of(model))
    assert opt.param_groups[0]["lr"] == lr_before
    assert adaptive_nb.last_run() is previous and adaptive_nb.active_run() is None
