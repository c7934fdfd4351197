"""%%adaptive_train's training-loop options through a real IPython shell: each reaches the
run (equal to a plain loop where that is checkable), and each bad one is a clear usage
error that changes nothing."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch
from conftest import make_data, make_model, params_of, same_params
from IPython.core.error import UsageError as IPythonUsageError
from IPython.core.interactiveshell import InteractiveShell
from torch import nn

BODY = "x, y = batch\nloss = torch.nn.functional.cross_entropy(model(x), y)\n"
OPTS = "--model net --optimizer opt --data loader --no-widget"


class Counter:
    def __init__(self) -> None:
        self.steps: list[int] = []
        self.metrics: list[dict[str, float]] = []

    def on_step_end(self, step: int, loss: float | None, history: Any) -> None:
        self.steps.append(step)

    def on_eval(self, metrics: dict[str, float]) -> None:
        self.metrics.append(metrics)


def _val(model: nn.Module) -> dict[str, float]:
    x, y = make_data(n=32, batch=32, seed=1)[0]
    return {"val_loss": float(nn.functional.cross_entropy(model(x), y))}


@pytest.fixture
def ip() -> Iterator[InteractiveShell]:
    shell = InteractiveShell.instance()
    shell.run_line_magic("load_ext", "adaptive_nb")
    net = make_model()
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    shell.user_ns.update(
        torch=torch,
        net=net,
        opt=opt,
        loader=make_data(),
        sched=torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5),
        plateau=torch.optim.lr_scheduler.ReduceLROnPlateau(opt, patience=0),
        val=_val,
        counter=Counter(),
    )
    yield shell
    for name in ("net", "opt", "loader", "sched", "plateau", "val", "counter", "_adaptive"):
        shell.user_ns.pop(name, None)
    for name in ("model", "batch", "loss"):
        shell.user_ns.pop(name, None)


def test_scheduler_clipping_and_accumulation_equal_a_plain_loop(ip: InteractiveShell) -> None:
    ref = make_model()
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
    ref_sched = torch.optim.lr_scheduler.StepLR(ref_opt, step_size=2, gamma=0.5)
    data = make_data()
    for start in range(0, len(data), 2):
        ref_opt.zero_grad()
        for x, y in data[start : start + 2]:
            (torch.nn.functional.cross_entropy(ref(x), y) * 0.5).backward()
        torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.5)
        ref_opt.step()
        ref_sched.step()

    report = ip.run_cell_magic(
        "adaptive_train",
        f"{OPTS} --policy static --scheduler sched --clip-grad-norm 0.5 --accumulate 2 "
        "--callbacks counter",
        BODY,
    )
    assert same_params(params_of(ref), params_of(ip.user_ns["net"]))
    assert report.summary["steps"] == 3 and len(report.grad_norm) == 3
    assert report.lr == [0.1, 0.1, 0.05]
    assert ip.user_ns["counter"].steps == [1, 2, 3]


def test_eval_precision_and_plateau_options_reach_the_run(ip: InteractiveShell) -> None:
    report = ip.run_cell_magic(
        "adaptive_train",
        f"{OPTS} --epochs 2 --eval val --eval-every 3 --precision bf16 --scheduler plateau "
        "--scheduler-metric val_loss --callbacks counter",
        BODY,
    )
    assert [e["step"] for e in report.evaluations] == [3, 6, 9, 12]
    assert report.summary["precision"] == "bf16"
    assert len(ip.user_ns["counter"].metrics) == 4


def test_epoch_interval(ip: InteractiveShell) -> None:
    report = ip.run_cell_magic(
        "adaptive_train", f"{OPTS} --epochs 2 --scheduler sched --scheduler-interval epoch", BODY
    )
    # two epoch steps of a step_size=2 StepLR: the lr halves after the last epoch only
    assert report.lr == [0.1] * 12 and report.summary["lr_final"] == 0.05


def test_help_documents_the_training_options(ip: InteractiveShell) -> None:
    doc = ip.find_cell_magic("adaptive_train").__doc__ or ""
    for opt in (
        "--scheduler",
        "--scheduler-interval",
        "--scheduler-metric",
        "--clip-grad-norm",
        "--precision",
        "--eval",
        "--eval-every",
        "--callbacks",
        "--accumulate",
        "--checkpoint",
        "--checkpoint-every",
        "--keep",
        "--resume",
    ):
        assert opt in doc, opt
    assert "more than once per applied step" in doc


BAD = [
    ("--scheduler schedd", "no variable `schedd`.*Did you mean `sched`"),
    ("--eval vall", "no variable `vall`"),
    ("--scheduler net", "`net` is a TinyNet, not a learning-rate scheduler"),
    ("--scheduler sched --scheduler-interval batch", r"--scheduler-interval\) is not understood"),
    ("--scheduler plateau --eval val", r"--scheduler-metric val_loss"),
    ("--scheduler plateau --scheduler-metric val_loss", r"--eval NAME"),
    ("--scheduler sched --scheduler-metric val_loss", "only for ReduceLROnPlateau"),
    ("--clip-grad-norm -1", r"--clip-grad-norm\) must be a positive finite number"),
    ("--clip-grad-norm big", "argument --clip-grad-norm"),
    ("--precision fp16", "needs CUDA GPUs.*bf16"),
    ("--precision half", "not understood"),
    ("--eval-every 2", "without an evaluation function"),
    ("--eval val --eval-every 0", r"--eval-every\) must be a whole number"),
    ("--eval net", "`net` is a TinyNet, not a function"),
    ("--callbacks loader", r"`loader`\[0\] is a tuple with none of the callback methods"),
    ("--accumulate 0", r"--accumulate\) must be a whole number"),
    ("--resume", r"--resume\) needs checkpoint_dir \(--checkpoint DIR\)"),
    ("--checkpoint-every 3", r"\(--checkpoint-every\) was given without checkpoint_dir"),
]


@pytest.mark.parametrize(("extra", "message"), BAD)
def test_bad_training_options_are_usage_errors_that_change_nothing(
    ip: InteractiveShell, extra: str, message: str
) -> None:
    before = params_of(ip.user_ns["net"])
    lr = ip.user_ns["opt"].param_groups[0]["lr"]
    with pytest.raises(IPythonUsageError, match=message):
        ip.run_cell_magic("adaptive_train", f"{OPTS} --steps 2 {extra}", BODY)
    assert same_params(before, params_of(ip.user_ns["net"]))
    assert ip.user_ns["opt"].param_groups[0]["lr"] == lr
    assert "_adaptive" not in ip.user_ns


def test_checkpoint_and_resume_options(ip: InteractiveShell, tmp_path: Any) -> None:
    ref = make_model()
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
    for x, y in make_data()[:5]:
        ref_opt.zero_grad()
        torch.nn.functional.cross_entropy(ref(x), y).backward()
        ref_opt.step()
    line = f"{OPTS} --policy static --checkpoint {tmp_path} --checkpoint-every 1 --keep 1"
    ip.run_cell_magic("adaptive_train", f"{line} --steps 2", BODY)
    assert [p.name for p in tmp_path.iterdir()] == ["step-000000002.pt"]
    net = make_model(seed=5)
    ip.user_ns["net"] = net
    ip.user_ns["opt"] = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    report = ip.run_cell_magic("adaptive_train", f"{line} --steps 5 --resume", BODY)
    assert report.summary["resumed_from_step"] == 2 and report.summary["steps"] == 5
    assert same_params(params_of(ref), params_of(net))
