"""%load_ext adaptive_nb and %%adaptive_train through a real IPython shell."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from conftest import make_data, make_model, params_of, same_params
from IPython.core.error import UsageError as IPythonUsageError
from IPython.core.interactiveshell import InteractiveShell

from adaptive_nb import RunReport

BODY = "x, y = batch\nloss = torch.nn.functional.cross_entropy(model(x), y)\n"
OPTS = "--model net --optimizer opt --data loader --no-widget"


@pytest.fixture
def ip(capsys: pytest.CaptureFixture[str]) -> Iterator[InteractiveShell]:
    shell = InteractiveShell.instance()
    shell.run_line_magic("load_ext", "adaptive_nb")
    net = make_model()
    shell.user_ns.update(
        torch=torch,
        net=net,
        opt=torch.optim.SGD(net.parameters(), lr=0.1),
        loader=make_data(),
    )
    yield shell
    for name in ("net", "opt", "loader", "_adaptive", "model", "batch", "loss", "rep"):
        shell.user_ns.pop(name, None)


def test_load_ext_prints_a_machine_summary(capsys: pytest.CaptureFixture[str]) -> None:
    shell = InteractiveShell.instance()
    shell.run_line_magic("reload_ext", "adaptive_nb")
    out = capsys.readouterr().out
    if torch.cuda.is_available():
        assert re.match(r"adaptive_nb: \d+ GPUs?: GPU \S+ .+ [\d.]+ GB \(\d+% busy", out), out
    else:
        assert re.match(r"adaptive_nb: CPU only: \d+ cores, [\d.]+ GB RAM", out), out


def test_train_cell_stores_and_returns_the_report(ip: InteractiveShell) -> None:
    result = ip.run_cell_magic("adaptive_train", f"{OPTS} --steps 5", BODY)
    assert isinstance(result, RunReport)
    assert ip.user_ns["_adaptive"] is result
    assert result.summary["steps"] == 5
    # the body's variables stay in the run's namespace, shown on the report
    assert not {"model", "batch", "loss", "x", "y"} & set(ip.user_ns)
    last = result.last_step  # type: ignore[attr-defined]
    assert isinstance(last["loss"], float) and last["loss"] == result.summary["final_loss"]
    assert set(last) >= {"batch", "x", "y"} and "model" not in last


def test_out_and_loss_names(ip: InteractiveShell) -> None:
    body = "x, y = batch\nobjective = torch.nn.functional.cross_entropy(model(x), y)\n"
    ip.run_cell_magic("adaptive_train", f"{OPTS} --steps 2 --out rep --loss objective", body)
    assert ip.user_ns["rep"].summary["steps"] == 2


def test_a_notebook_variable_called_model_is_restored(ip: InteractiveShell) -> None:
    ip.user_ns["model"] = ip.user_ns["net"]
    ip.run_cell_magic(
        "adaptive_train", "--model model --optimizer opt --data loader --no-widget --steps 2", BODY
    )
    assert ip.user_ns["model"] is ip.user_ns["net"]


def test_body_equals_a_plain_loop(ip: InteractiveShell) -> None:
    ref = make_model()
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    for x, y in make_data()[:4]:
        ref_opt.zero_grad()
        torch.nn.functional.cross_entropy(ref(x), y).backward()
        ref_opt.step()
    ip.run_cell_magic("adaptive_train", f"{OPTS} --steps 4 --policy static", BODY)
    assert same_params(params_of(ref), params_of(ip.user_ns["net"]))


def test_magic_help_documents_every_option(ip: InteractiveShell) -> None:
    doc = ip.find_cell_magic("adaptive_train").__doc__ or ""
    for opt in (
        "--model",
        "--optimizer",
        "--data",
        "--epochs",
        "--steps",
        "--devices",
        "--policy",
        "--headroom",
        "--no-widget",
        "--out",
        "--loss",
        "--background",
        "--log",
    ):
        assert opt in doc, opt
    # the body's own namespace, and why once-per-step effects belong in callbacks
    assert "never overwritten" in doc and "_adaptive.last_step" in doc
    assert "more than once per applied step" in doc and "--callbacks" in doc
    assert "Call ``model(...)``, not your module's own variable" in doc


BAD: list[tuple[str, str, str]] = [
    ("--model nett --optimizer opt --data loader", BODY, "no variable `nett`.*Did you mean `net`"),
    ("--optimizer opt --data loader", BODY, "--model is missing"),
    ("--model loader --optimizer opt --data loader", BODY, "`loader` is a list, not a torch.nn"),
    ("--model net --optimizer net --data loader", BODY, "`net` is a TinyNet, not a torch.optim"),
    ("--model net --optimizer opt --data net", BODY, "cannot be iterated"),
    (f"{OPTS} --epochs 1 --steps 3", BODY, "either --epochs or --steps"),
    (f"{OPTS} --steps 0", BODY, "at least 1"),
    (f"{OPTS} --epochs -1", BODY, "at least 1"),
    (f"{OPTS} --devices 7", BODY, "GPU 7 does not exist"),
    (f"{OPTS} --policy greedy", BODY, "unknown policy 'greedy'"),
    (f"{OPTS} --headroom 1.5", BODY, "headroom"),
    (f"{OPTS} --steps 2", "\n# only a comment\n", "cell body is empty"),
    (f"{OPTS} --steps 2", "x, y = batch\nloss = (model(x)\n", "syntax error in line 3 of the cell"),
    (f"{OPTS} --steps two", BODY, "argument --steps"),
    (f"{OPTS} --steps 2 --log csv:", BODY, "name the file"),
]


@pytest.mark.parametrize(("line", "body", "message"), BAD)
def test_bad_input_is_a_clear_usage_error_and_changes_nothing(
    ip: InteractiveShell, line: str, body: str, message: str
) -> None:
    before = params_of(ip.user_ns["net"])
    with pytest.raises(IPythonUsageError, match=message):
        ip.run_cell_magic("adaptive_train", line, body)
    assert same_params(before, params_of(ip.user_ns["net"]))
    assert "_adaptive" not in ip.user_ns


def test_body_without_loss_fails_at_first_step(ip: InteractiveShell) -> None:
    before = params_of(ip.user_ns["net"])
    with pytest.raises(IPythonUsageError, match="never assigned `loss`"):
        ip.run_cell_magic("adaptive_train", f"{OPTS} --steps 3", "x, y = batch\nout = model(x)\n")
    assert same_params(before, params_of(ip.user_ns["net"]))


def test_user_error_keeps_its_type_and_line(ip: InteractiveShell) -> None:
    body = (
        "x, y = batch\nstep_no = globals().get('step_no', 0) + 1\nif step_no == 3:\n    1 / 0\n"
        + ("loss = torch.nn.functional.cross_entropy(model(x), y)\n")
    )
    ip.user_ns["step_no"] = 0
    with pytest.raises(ZeroDivisionError) as info:
        ip.run_cell_magic("adaptive_train", f"{OPTS} --steps 10", body)
    frames = [f for f in __import__("traceback").extract_tb(info.value.__traceback__)]
    user = [f for f in frames if f.line and "1 / 0" in f.line]
    assert user and user[-1].lineno == 5  # line 5 of the cell (line 1 is the magic)
    assert ip.user_ns["_adaptive"].summary["steps"] == 2  # the partial report is stored


def test_widget_run_completes_in_a_plain_shell(ip: InteractiveShell) -> None:
    result: Any = ip.run_cell_magic(
        "adaptive_train", "--model net --optimizer opt --data loader --steps 3", BODY
    )
    assert result.summary["steps"] == 3


def test_kernel_interrupt_keeps_the_partial_report(ip: InteractiveShell) -> None:
    body = (
        "import os, signal\n"
        "calls = globals().get('calls', 0) + 1\n"
        "if calls == 3:\n"
        "    os.kill(os.getpid(), signal.SIGINT)\n"
        "x, y = batch\n"
        "loss = torch.nn.functional.cross_entropy(model(x), y)\n"
    )
    ip.user_ns["calls"] = 0
    with pytest.raises(KeyboardInterrupt):
        ip.run_cell_magic("adaptive_train", f"{OPTS} --steps 50", body)
    report = ip.user_ns["_adaptive"]
    assert report.summary["steps"] == 3
    assert report.summary["ended"] == "interrupted"
    assert "model" not in ip.user_ns


def test_log_option_repeated_and_comma_separated(ip: InteractiveShell, tmp_path: Any) -> None:
    a, b, tb = tmp_path / "a.csv", tmp_path / "b.csv", tmp_path / "tb"
    ip.run_cell_magic(
        "adaptive_train", f"{OPTS} --steps 3 --log csv:{a},tensorboard:{tb} --log csv:{b}", BODY
    )
    for path in (a, b):
        steps = [ln.split(",")[1] for ln in path.read_text().splitlines() if ",loss," in ln]
        assert steps == ["1", "2", "3"]
    assert any(tb.iterdir())
    with pytest.raises(IPythonUsageError, match="unknown logger 'wandb'"):
        ip.run_cell_magic("adaptive_train", f"{OPTS} --steps 3 --log wandb", BODY)
