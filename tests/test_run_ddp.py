"""``train(engine="ddp")``: the same loop, planner and report over DDP rank processes
(CPU, gloo): the parameters equal a plain single-process loop's, the scheduler's learning
rate and the clipping reach the ranks, nothing is left running, and options the engine
cannot honour are refused before any process starts."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from ddp_support import worker_children
from torch import nn
from torch.nn import functional as F

import adaptive_nb
from adaptive_nb import UsageError

pytestmark = pytest.mark.timeout(180)


def _model() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))


def _data() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [
        (torch.randn(9, 4, generator=g), torch.randint(0, 3, (9,), generator=g)) for _ in range(6)
    ]


def test_train_on_ddp_ranks_equals_a_plain_loop() -> None:
    data = _data()
    ref = _model()
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.2, momentum=0.9)
    ref_sched = torch.optim.lr_scheduler.StepLR(ref_opt, step_size=2, gamma=0.5)
    for x, y in data:
        ref_opt.zero_grad()
        F.cross_entropy(ref(x), y).backward()
        nn.utils.clip_grad_norm_(ref.parameters(), 0.5)
        ref_opt.step()
        ref_sched.step()

    net = _model()
    opt = torch.optim.SGD(net.parameters(), lr=0.2, momentum=0.9)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)

    def step(model: nn.Module, batch: Any) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(model(x), y)

    report = adaptive_nb.train(
        step,
        model=net,
        optimizer=opt,
        data=data,
        devices="cpu",
        engine="ddp",
        workers=2,
        scheduler=sched,
        clip_grad_norm=0.5,
        control_interval=0.05,
    )
    assert report.summary["ended"] == "completed"
    assert report.summary["steps"] == len(data)
    assert report.summary["samples"] == 9 * len(data)
    assert all(name.startswith("rank") for name in report.info.devices), report.info.devices
    for (name, p), q in zip(net.named_parameters(), ref.parameters(), strict=True):
        assert torch.allclose(p, q, atol=1e-5), name
    assert opt.param_groups[0]["lr"] == pytest.approx(ref_opt.param_groups[0]["lr"])
    assert worker_children() == []


def test_evaluation_on_ddp_sees_the_ranks_state_of_its_step() -> None:
    """evaluate= runs in this process on the notebook's model, brought up to date from
    the ranks first: the metrics equal a plain loop's after the same steps."""
    data = _data()
    held_out = _data()[0]

    def evaluate(model: nn.Module) -> dict[str, float]:
        x, y = held_out
        with torch.no_grad():
            return {"val_loss": float(F.cross_entropy(model(x), y))}

    ref = _model()
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.2, momentum=0.9)
    expected = []
    for i, (x, y) in enumerate(data, start=1):
        ref_opt.zero_grad()
        F.cross_entropy(ref(x), y).backward()
        ref_opt.step()
        if i % 2 == 0:
            expected.append(evaluate(ref)["val_loss"])

    net = _model()
    opt = torch.optim.SGD(net.parameters(), lr=0.2, momentum=0.9)
    report = adaptive_nb.train(
        lambda m, b: F.cross_entropy(m(b[0]), b[1]),
        model=net,
        optimizer=opt,
        data=data,
        devices="cpu",
        engine="ddp",
        workers=2,
        evaluate=evaluate,
        eval_every=2,
        control_interval=0.05,
    )
    assert report.summary["ended"] == "completed"
    assert [e["step"] for e in report.evaluations] == [2, 4, 6]
    got = [e["metrics"]["val_loss"] for e in report.evaluations]
    assert got == pytest.approx(expected, rel=1e-5)
    assert worker_children() == []


def test_a_stop_acts_at_the_step_boundary_although_the_next_step_was_sent_ahead() -> None:
    """The stop comes from a callback after step 3, when step 4 already left with step 3's
    update: it runs on the ranks but is never applied; the notebook gets step 3's state."""
    data = _data()
    ref = _model()
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.2, momentum=0.9)
    for x, y in data[:3]:
        ref_opt.zero_grad()
        F.cross_entropy(ref(x), y).backward()
        ref_opt.step()

    class StopAt3:
        def on_step_end(self, step: int, loss: float | None, history: Any) -> None:
            if step == 3:
                run = adaptive_nb.last_run()
                assert run is not None
                assert run.engine._ahead is not None  # type: ignore[attr-defined]  # step 4
                run.control.stop()

    net = _model()
    opt = torch.optim.SGD(net.parameters(), lr=0.2, momentum=0.9)
    report = adaptive_nb.train(
        lambda m, b: F.cross_entropy(m(b[0]), b[1]),
        model=net,
        optimizer=opt,
        data=data,
        devices="cpu",
        engine="ddp",
        workers=2,
        callbacks=[StopAt3()],
        control_interval=0.05,
    )
    assert report.summary["ended"] == "stopped" and report.summary["steps"] == 3
    for p, q in zip(net.parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    assert worker_children() == []


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"engine": "ddpp"}, "unknown engine 'ddpp'"),
        ({"workers": 3}, "workers= (--workers) sets the ranks of engine='ddp'"),
        ({"engine": "ddp", "workers": 0}, "workers must be a whole number"),
        ({"sync_bn": True}, "sync_bn=True (--sync-bn) needs engine='ddp'"),
        ({"engine": "ddp", "sync_bn": True}, "sync_bn=True needs one GPU per rank"),
        ({"engine": "ddp", "precision": "fp16"}, "Use --precision bf16"),
        (
            {"engine": "ddp", "devices": "sim:benchmarks/scenarios/single_gpu.json"},
            "simulated fleet",
        ),
    ],
)
def test_engine_options_are_refused_before_anything_starts(
    kwargs: dict[str, Any], needle: str
) -> None:
    net = _model()
    before = [p.detach().clone() for p in net.parameters()]
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    options: dict[str, Any] = {"devices": "cpu", **kwargs}
    with pytest.raises(UsageError) as err:
        adaptive_nb.train(
            lambda m, b: F.cross_entropy(m(b[0]), b[1]),
            model=net,
            optimizer=opt,
            data=_data(),
            **options,
        )
    assert needle in str(err.value)
    assert all(torch.equal(a, b) for a, b in zip(before, net.parameters(), strict=True))
    assert worker_children() == []
