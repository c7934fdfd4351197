"""Policy and headroom changes requested during a run (``RunControl.set_policy`` /
``set_headroom``, as the dashboard and ``%adaptive`` post them from other threads) take
effect at the next step boundary: the event is logged at the step after which the request
was posted, every later step runs under the new setting, and no earlier step does."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from conftest import ce_step, make_data, make_model
from torch import nn

import adaptive_nb
from adaptive_nb import EventKind, RunControl
from adaptive_nb.events import Progress
from adaptive_nb.run.observers import BaseObserver


def _settings_now() -> tuple[str, float, dict[str, float]]:
    """The running controller's policy, headroom and shares, read from inside a step."""
    run = adaptive_nb.active_run()
    assert run is not None
    return run.controller.policy, run.controller.headroom, run.controller.shares()


def _events(report: Any, kind: str) -> list[Any]:
    return [e for e in report.events if e.kind == kind]


def test_policy_and_headroom_posted_in_step_4_apply_from_step_5_on_cpu() -> None:
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    control = RunControl()
    seen: list[tuple[str, float]] = []  # (policy, headroom) under which each step ran

    def step(m: nn.Module, batch: Any) -> torch.Tensor:
        policy, headroom, _ = _settings_now()
        seen.append((policy, headroom))
        if len(seen) == 4:  # posted while step 4 runs: step 4 completes under the old ones
            control.set_policy("static")
            control.set_headroom(0.3)
        return ce_step(m, batch)

    report = adaptive_nb.train(
        step,
        model=model,
        optimizer=opt,
        data=make_data(),
        steps=10,
        devices="cpu",
        policy="adaptive",
        headroom=0.1,
        control=control,
    )
    assert report.summary["steps"] == 10 and report.summary["ended"] == "completed"
    assert seen == [("adaptive", 0.1)] * 4 + [("static", 0.3)] * 6
    (policy_event,) = _events(report, EventKind.POLICY)
    (headroom_event,) = _events(report, EventKind.HEADROOM)
    assert policy_event.step == 4 and "adaptive → static" in policy_event.detail
    assert headroom_event.step == 4 and "0.10 → 0.30" in headroom_event.detail
    assert report.summary["policy"] == "static"
    assert report.info.policy == "adaptive"  # what the run started with


class _PostOnFirstProgress(BaseObserver):
    """Posts a policy change from the first progress update (the loop's observer hook,
    where the dashboard's handlers run) and remembers that update's step."""

    def __init__(self, control: RunControl, policy: str) -> None:
        self.control, self.policy = control, policy
        self.posted_at: int | None = None

    def on_progress(self, progress: Progress) -> None:
        if self.posted_at is None and not progress.paused:
            self.posted_at = progress.step
            self.control.set_policy(self.policy)


def test_policy_posted_from_an_observer_applies_at_that_step_boundary() -> None:
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    control = RunControl()
    observer = _PostOnFirstProgress(control, "weights")
    policies: list[str] = []

    def step(m: nn.Module, batch: Any) -> torch.Tensor:
        policies.append(_settings_now()[0])
        return ce_step(m, batch)

    report = adaptive_nb.train(
        step,
        model=model,
        optimizer=opt,
        data=make_data(),
        steps=8,
        devices="cpu",
        control=control,
        observers=[observer],
    )
    posted = observer.posted_at
    assert posted is not None and 1 <= posted < 8
    (event,) = _events(report, EventKind.POLICY)
    assert event.step == posted
    assert policies == ["adaptive"] * posted + ["weights"] * (8 - posted)
    assert report.summary["policy"] == "weights"


def _mixed_fleet(tmp_path: Path) -> str:
    """Three simulated GPUs of different speeds: the adaptive split is far from equal."""
    devices = [
        {"name": name, "memory_gb": 24, "samples_per_s": speed, "alpha_ms": 5}
        for name, speed in (("fast", 1753.0), ("mid", 882.0), ("slow", 274.0))
    ]
    spec = {
        "name": "requests_test",
        "global_batch": 96,
        "steps": 100,
        "seed": 5,
        "noise": 0.01,
        "devices": devices,
        "job": {"mem_base_gb": 1.0, "mem_per_sample_gb": 0.01},
        "comm": {"alpha_ms": 1.0, "per_device_ms": 1.0},
        "primary_extra_ms": 1.0,
        "primary_extra_gb": 0.5,
        "events": [],
    }
    path = tmp_path / "mixed.json"
    path.write_text(json.dumps(spec))
    return str(path)


def test_static_policy_requested_mid_run_on_a_simulated_fleet_splits_equally(
    tmp_path: Path,
) -> None:
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    data = [(x.repeat(6, 1), y.repeat(6)) for x, y in make_data()]  # batches of 96
    control = RunControl()
    seen: list[tuple[str, float, dict[str, float]]] = []
    post_after = 12

    def step(m: nn.Module, batch: Any) -> torch.Tensor:
        seen.append(_settings_now())
        if len(seen) == post_after:
            control.set_policy("static")
            control.set_headroom(0.25)
        return ce_step(m, batch)

    report = adaptive_nb.train(
        step,
        model=model,
        optimizer=opt,
        data=data,
        steps=30,
        devices=f"sim:{_mixed_fleet(tmp_path)}",
        control=control,
        control_interval=0.01,  # virtual seconds: the adaptive split is planned early
    )
    assert report.summary["steps"] == 30 and report.summary["ended"] == "completed"
    before, after = seen[:post_after], seen[post_after:]
    assert all(p == "adaptive" and h == 0.1 for p, h, _ in before)
    assert all(p == "static" and h == 0.25 for p, h, _ in after)
    # adaptive had moved work to the fast GPU; from the next step on the split is equal
    fast, slow = report.info.devices[0], report.info.devices[2]
    assert before[-1][2][fast] > before[-1][2][slow] + 0.2
    for _, _, shares in after:
        assert sorted(shares) == sorted(report.info.devices)
        for share in shares.values():
            assert abs(share - 1 / 3) < 0.02
    (policy_event,) = _events(report, EventKind.POLICY)
    (headroom_event,) = _events(report, EventKind.HEADROOM)
    assert policy_event.step == headroom_event.step == post_after
    assert report.summary["policy"] == "static"
