"""On a GPU, a cell body that calls the notebook's raw module instead of ``model`` under
weighted DataParallel is stopped on the first step, before anything is applied (core
imports only: this file runs under ``make gpu-check``, where no Jupyter package exists)."""

from __future__ import annotations

import pytest
import torch
from conftest import make_data, make_model, params_of, same_params

import adaptive_nb
from adaptive_nb.jupyter.cell_namespace import CellStep


@pytest.mark.gpu
def test_raw_module_call_under_dataparallel_is_a_usage_error() -> None:
    net = make_model().cuda()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    body = "x, y = batch\nloss = torch.nn.functional.cross_entropy(net(x), y)\n"
    step = CellStep(
        compile(body, "<cell>", "exec"),
        {"torch": torch, "net": net},
        loss_name="loss",
        raw=net,
        raw_name="net",
    )
    before = params_of(net)
    with pytest.raises(adaptive_nb.UsageError, match=r"`net\(\.\.\.\)` directly"):
        adaptive_nb.train(step, model=net, optimizer=opt, data=make_data(), steps=2, devices="0")
    assert same_params(before, params_of(net))
