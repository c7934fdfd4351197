"""``min_chunk=`` / ``--min-chunk``: checked before anything runs, and handed to the weighted
DataParallel engine of a GPU run."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from conftest import ce_step, make_data, make_model, params_of, same_params
from IPython.core.error import UsageError as IPythonUsageError
from IPython.core.interactiveshell import InteractiveShell

import adaptive_nb
from adaptive_nb.run import backend


@pytest.mark.parametrize("bad", [0, -2, 1.5, True])
def test_bad_min_chunk_is_refused_before_anything_runs(bad: Any) -> None:
    net = make_model()
    before = params_of(net)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    with pytest.raises(adaptive_nb.UsageError, match=r"min_chunk \(--min-chunk\)"):
        adaptive_nb.train(
            ce_step, model=net, optimizer=opt, data=make_data(), devices="cpu", min_chunk=bad
        )
    assert same_params(before, params_of(net))


def test_min_chunk_reaches_the_dataparallel_engine(monkeypatch: pytest.MonkeyPatch) -> None:
    made: list[tuple[list[int], int | None]] = []

    class Recorder:
        def __init__(self, device_ids: list[int], min_chunk: int | None = None) -> None:
            made.append((list(device_ids), min_chunk))

    def controller(engine: Any, **kwargs: Any) -> str:
        return "controller"

    monkeypatch.setattr(backend, "DataParallelEngine", Recorder)
    monkeypatch.setattr(backend, "AllocationController", controller)
    backend.build_gpu_run(
        [0, 1], policy="adaptive", headroom=0.1, control_interval=2.0, snapshots=None, min_chunk=4
    )
    assert made == [([0, 1], 4)]


def test_magic_min_chunk_option_is_checked() -> None:
    shell = InteractiveShell.instance()
    shell.run_line_magic("load_ext", "adaptive_nb")
    net = make_model()
    shell.user_ns.update(net=net, opt=torch.optim.SGD(net.parameters(), lr=0.1), loader=make_data())
    try:
        with pytest.raises(IPythonUsageError, match=r"min_chunk \(--min-chunk\)"):
            shell.run_cell_magic(
                "adaptive_train",
                "--model net --optimizer opt --data loader --no-widget --min-chunk 0",
                "x, y = batch\nloss = torch.nn.functional.cross_entropy(model(x), y)\n",
            )
    finally:
        for name in ("net", "opt", "loader"):
            shell.user_ns.pop(name, None)
