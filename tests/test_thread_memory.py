"""What a CPU thread probe learned is reused by the next run of the same model, batch size
and cores in this process (no second probe), and probed again when the external CPU load is
no longer what it was learned under."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from torch import nn

import adaptive_nb
from adaptive_nb.events import EventKind
from adaptive_nb.plan.thread_probe import Learned, forget_learned, learned, model_signature
from adaptive_nb.plan.thread_probe import remember as remember_threads
from adaptive_nb.plan.threads import ThreadController, _usable_cores
from tests.conftest import ce_step, make_data, make_model
from tests.test_thread_probe_budget import FakeThreads, host, run


@pytest.fixture(autouse=True)
def _fresh_memory() -> Iterator[None]:
    forget_learned()
    yield
    forget_learned()


ONE_WINS = {1: 0.020, 2: 0.032}


def mlp(width: int = 16) -> nn.Module:
    return nn.Sequential(nn.Linear(8, width), nn.ReLU(), nn.Linear(width, 3))


def learn(t: FakeThreads, model: nn.Module, external: float | None = None) -> ThreadController:
    ctl = ThreadController(
        cores=2, model=model, expected_steps=10_000, set_threads=t.set, get_threads=t.get
    )
    snap = host(external_pct=external) if external is not None else None
    run(ctl, t, ONE_WINS, 40, snap=snap)
    assert ctl.probes == 1 and t.n == 1
    return ctl


def test_the_same_model_run_again_holds_the_learned_count_without_probing() -> None:
    learn(FakeThreads(2), mlp())
    t = FakeThreads(2)
    again = ThreadController(
        cores=2, model=mlp(), expected_steps=10_000, set_threads=t.set, get_threads=t.get
    )  # a new instance of the same architecture: same signature
    ran_with, events = run(again, t, ONE_WINS, 200)
    assert again.probes == 0
    assert ran_with[0] == 2 and set(ran_with[1:]) == {1}  # from the second step on
    assert again.summary()["thread_decision"] == "learned earlier"
    hold = [e for e in events if e.kind == EventKind.HOLD]
    assert len(hold) == 1 and "learned by an earlier run" in hold[0].detail


def test_a_different_model_or_batch_size_is_probed_afresh() -> None:
    learn(FakeThreads(2), mlp(16))
    t = FakeThreads(2)
    other = ThreadController(
        cores=2, model=mlp(32), expected_steps=10_000, set_threads=t.set, get_threads=t.get
    )
    run(other, t, ONE_WINS, 40)
    assert other.probes == 1
    assert len(learned()) == 2
    key = next(iter(learned()))
    assert key == (model_signature(mlp(16)), 100, 2)  # model, batch size, usable cores


def test_a_changed_external_load_probes_again_after_a_recall() -> None:
    learn(FakeThreads(2), mlp(), external=30.0)  # learned under some load...
    t = FakeThreads(2)
    again = ThreadController(
        cores=2, model=mlp(), expected_steps=10_000, set_threads=t.set, get_threads=t.get
    )
    run(again, t, ONE_WINS, 5)
    assert again.probes == 0 and t.n == 1
    _, events = run(again, t, ONE_WINS, 30, snap=host(external_pct=90.0))  # ...busier now
    assert again.probes == 1
    assert any(e.kind == EventKind.NOTICE and "re-probing" in e.detail for e in events)


def test_the_same_load_keeps_the_recall() -> None:
    learn(FakeThreads(2), mlp(), external=30.0)
    t = FakeThreads(2)
    again = ThreadController(
        cores=2, model=mlp(), expected_steps=10_000, set_threads=t.set, get_threads=t.get
    )
    run(again, t, ONE_WINS, 100, snap=host(external_pct=40.0))  # within 25 %
    assert again.probes == 0 and t.n == 1


def test_train_reads_the_model_of_the_run_and_recalls_its_count() -> None:
    # the backend's controller finds the run's model itself (train() needs no new argument)
    model, data = make_model(), make_data()
    remember_threads(
        (model_signature(model), len(data[0][0]), _usable_cores()),
        Learned(threads=1, external_pct=None, rates=((1, 900.0), (2, 500.0))),
    )
    before = torch.get_num_threads()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    report = adaptive_nb.train(ce_step, model=model, optimizer=opt, data=data, devices="cpu")
    assert report.summary["thread_decision"] == "learned earlier"
    assert report.summary["threads"] == 1 and report.summary["thread_probes"] == 0
    assert torch.get_num_threads() == before  # restored after the run
