"""DDP engine with ``precision="bf16"``: the ranks run the step under
``torch.autocast(bfloat16)`` (backward outside it), so the parameters equal a plain
single-process loop run under the same autocast, within bf16's tolerance (a rank's slice
rounds its partial gradient sums on its own); the step itself fails unless its logits
are bf16 (autocast did run on the ranks); with accumulation through ``train()`` too.
``precision="fp16"`` is refused before anything starts: its loss scaler would have to
decide on the ranks whether a step is skipped. The reference loops below share no code
with adaptive_nb."""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from ddp_support import accumulation_reference as reference
from ddp_support import group_of, labelled_batches, worker_children
from torch import nn

import adaptive_nb
from adaptive_nb import UsageError
from adaptive_nb.engine.ddp import DDPEngine, WorkerGroup
from adaptive_nb.layout import Plan

pytestmark = pytest.mark.timeout(300)

W = 2
BF16 = {"rtol": 1e-2, "atol": 1e-3}  # bf16 keeps 8 bits of mantissa (seen: ≤ 3e-4)


@pytest.fixture(scope="module")
def group() -> Iterator[WorkerGroup]:
    with group_of(W) as g:
        yield g


def classify(model: nn.Module, batch: Any) -> torch.Tensor:
    """The step, which fails unless it runs under bf16 autocast (its logits are bf16)."""
    x, y = batch
    logits = model(x)
    if logits.dtype != torch.bfloat16:
        raise RuntimeError(f"the step ran without bf16 autocast (logits {logits.dtype})")
    return F.cross_entropy(logits, y)


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 32), nn.Tanh(), nn.Linear(32, 3))


batches = labelled_batches


def test_bf16_on_the_ranks_equals_a_plain_loop_under_the_same_autocast(
    group: WorkerGroup,
) -> None:
    data = batches((12, 12, 12, 12))
    ref = mlp()
    reference(ref, torch.optim.SGD(ref.parameters(), lr=0.2), data, 1, autocast=True)

    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.2)
    engine = DDPEngine(
        classify,
        model=model,
        optimizer=optimizer,
        data=data,
        group=group,
        run_ahead=True,
        precision="bf16",
    )
    engine.apply_plan(Plan((0, 1), (0.75, 0.25), 1, 12))  # uneven: 9 and 3 samples
    engine.start()
    try:
        tokens = list(engine.iter_batches(data, 1))
        for i, token in enumerate(tokens):
            engine.expect_next(tokens[i + 1] if i + 1 < len(tokens) else None)
            out = engine.forward_backward(None, token)
            assert out.samples == 12 and math.isfinite(float(out.loss))
            engine.optimizer_step()
    finally:
        engine.close()
    assert engine.applied == len(data)
    for (name, p), q in zip(model.named_parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p, q, msg=name, **BF16)


def test_train_bf16_with_accumulate_on_ddp_equals_a_plain_loop() -> None:
    data = batches((10, 10, 6, 10, 10))  # accumulate=2: groups of 2, 2 and 1
    ref = mlp()
    ref_opt = torch.optim.Adam(ref.parameters(), lr=0.01)
    reference(ref, ref_opt, data, 2, autocast=True)

    model = mlp()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    shared = {p.pid for p in worker_children()}  # the module's group, if it runs
    report = adaptive_nb.train(
        classify,
        model=model,
        optimizer=optimizer,
        data=data,
        devices="cpu",
        engine="ddp",
        workers=W,
        precision="bf16",
        accumulate=2,
        control_interval=0.05,
    )
    s = report.summary
    assert s["ended"] == "completed", s.get("events")
    assert s["precision"] == "bf16" and s["accumulate"] == 2 and s["steps"] == 3
    for (name, p), q in zip(model.named_parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p, q, msg=name, **BF16)
    assert {p.pid for p in worker_children()} <= shared


def test_fp16_on_ddp_is_refused_before_anything_starts() -> None:
    model = mlp()
    before = [p.detach().clone() for p in model.parameters()]
    shared = {p.pid for p in worker_children()}
    with pytest.raises(UsageError) as err:
        adaptive_nb.train(
            classify,
            model=model,
            optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
            data=batches((4, 4)),
            devices="cpu",
            engine="ddp",
            precision="fp16",
        )
    message = str(err.value)
    assert "--precision fp16" in message and "precision='fp16'" in message
    assert "--precision bf16" in message and "DataParallel" in message
    assert "GradScaler" in message
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    assert {p.pid for p in worker_children()} <= shared
    with pytest.raises(UsageError, match="--precision bf16"):  # the engine itself, too
        DDPEngine(
            classify,
            model=model,
            optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
            data=batches((4,)),
            precision="fp16",
        )
