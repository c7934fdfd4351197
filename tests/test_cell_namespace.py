"""The ``%%adaptive_train`` body writes into a namespace of the run's own: the notebook's
``model``/``batch``/``loss`` are never touched (also from a background run), and a body
that calls the raw module instead of ``model`` is a clear error before anything trains."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest
import torch
from conftest import make_data, make_model, params_of, same_params
from IPython.core.error import UsageError as IPythonUsageError
from IPython.core.interactiveshell import InteractiveShell
from torch import nn

import adaptive_nb
from adaptive_nb.engine.cpu import CpuEngine
from adaptive_nb.jupyter.cell_namespace import RunNamespace

OPTS = "--model net --optimizer opt --data loader --no-widget"
USER = {"model": "user's model", "batch": "user's batch", "loss": "user's loss"}


@pytest.fixture
def ip() -> Iterator[InteractiveShell]:
    shell = InteractiveShell.instance()
    shell.run_line_magic("load_ext", "adaptive_nb")
    net = make_model()
    shell.user_ns.update(
        torch=torch,
        net=net,
        opt=torch.optim.SGD(net.parameters(), lr=0.1),
        loader=make_data(),
        **USER,
    )
    yield shell
    for name in ("net", "opt", "loader", "_adaptive", "seen", "gate", *USER):
        shell.user_ns.pop(name, None)


def test_exec_reads_missing_globals_from_the_fallback() -> None:
    """The interpreter honours ``__missing__`` of a dict subclass used as exec globals,
    at module level, in functions, lambdas and comprehensions; assignments stay local."""
    user = {"a": 1, "k": 3}
    ns = RunNamespace(user)
    src = (
        "b = a + 1\n"
        "def f():\n    return a * 10\n"
        "g = lambda: k\n"
        "c = [a + i for i in range(2)]\n"
        "d = f() + g()\n"
        "a = 5\n"
    )
    exec(compile(src, "<cell>", "exec"), ns)
    assert (ns["b"], ns["c"], ns["d"]) == (2, [1, 2], 13)
    assert ns["a"] == 5 and user == {"a": 1, "k": 3}  # the notebook's `a` untouched
    user["late"] = "seen"  # defined after the namespace was made: read at lookup time
    exec(compile("z = late", "<cell>", "exec"), ns)
    assert ns["z"] == "seen"
    with pytest.raises(NameError):
        exec(compile("nothing_here", "<cell>", "exec"), ns)


def test_foreground_body_never_touches_the_notebook_variables(ip: InteractiveShell) -> None:
    ip.user_ns["seen"] = []
    body = (
        "seen.append({k: get_ipython().user_ns[k] for k in ('model', 'batch', 'loss')})\n"
        "x, y = batch\n"
        "loss = torch.nn.functional.cross_entropy(model(x), y)\n"
    )
    report = ip.run_cell_magic("adaptive_train", f"{OPTS} --steps 3", body)
    assert len(ip.user_ns["seen"]) == 3
    assert all(s == USER for s in ip.user_ns["seen"])  # during the run
    assert {k: ip.user_ns[k] for k in USER} == USER  # after it
    assert "x" not in ip.user_ns
    assert report.last_step["loss"] == report.summary["final_loss"]


def test_background_run_leaves_the_notebook_alone_and_keeps_a_reassigned_model(
    ip: InteractiveShell,
) -> None:
    started, proceed = threading.Event(), threading.Event()
    ip.user_ns["gate"] = (started, proceed)
    body = (
        "gate[0].set()\n"
        "assert gate[1].wait(30)\n"
        "x, y = batch\n"
        "loss = torch.nn.functional.cross_entropy(model(x), y)\n"
    )
    ip.run_cell_magic("adaptive_train", f"{OPTS} --steps 4 --background", body)
    run = adaptive_nb.last_run()
    assert run is not None
    try:
        assert started.wait(30)
        # the first step's body is running on the worker thread right now
        assert {k: ip.user_ns[k] for k in USER} == USER
        mine = nn.Linear(2, 2)
        ip.user_ns["model"] = mine  # the user reassigns `model` while it trains
    finally:
        proceed.set()
        report = run.wait(60)
    assert report.summary["steps"] == 4
    assert ip.user_ns["model"] is mine
    assert ip.user_ns["batch"] == USER["batch"] and ip.user_ns["loss"] == USER["loss"]
    assert ip.user_ns["_adaptive"] is report
    assert report.last_step["loss"] == report.summary["final_loss"]


class _Wrapper(nn.Module):
    """Stands in for weighted DataParallel on CPU: ``model`` is not the user's module."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x)  # type: ignore[no-any-return]


@pytest.fixture
def wrapping_engine(monkeypatch: pytest.MonkeyPatch) -> None:
    def prepare(self: CpuEngine, model: nn.Module) -> nn.Module:
        self._model = _Wrapper(model)
        return self._model

    monkeypatch.setattr(CpuEngine, "prepare", prepare)


@pytest.mark.usefixtures("wrapping_engine")
def test_calling_the_raw_module_is_a_clear_error_before_any_step(ip: InteractiveShell) -> None:
    before = params_of(ip.user_ns["net"])
    body = "x, y = batch\nloss = torch.nn.functional.cross_entropy(net(x), y)\n"
    with pytest.raises(IPythonUsageError) as err:
        ip.run_cell_magic("adaptive_train", f"{OPTS} --steps 3", body)
    message = str(err.value)
    assert "`net(...)` directly" in message and "call `model(...)`" in message
    assert same_params(before, params_of(ip.user_ns["net"]))  # nothing applied
    assert not ip.user_ns["opt"].state  # the optimizer never stepped


@pytest.mark.usefixtures("wrapping_engine")
def test_calling_model_through_a_wrapper_trains(ip: InteractiveShell) -> None:
    ref = make_model()
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    for x, y in make_data()[:3]:
        ref_opt.zero_grad()
        torch.nn.functional.cross_entropy(ref(x), y).backward()
        ref_opt.step()
    body = "x, y = batch\nloss = torch.nn.functional.cross_entropy(model(x), y)\n"
    report = ip.run_cell_magic("adaptive_train", f"{OPTS} --steps 3 --policy static", body)
    assert report.summary["steps"] == 3
    assert same_params(params_of(ref), params_of(ip.user_ns["net"]))
