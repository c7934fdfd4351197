"""A non-primary device failing inside the real training loop (simulated fleet, real model
compute on CPU): the device is dropped, the batch it failed on is retried on the others
and applied exactly once, no batch is skipped or applied twice, and the run completes
with the requested steps and the parameters of a plain full-batch loop."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from torch import nn

import adaptive_nb
from adaptive_nb import EventKind

STEPS = 14
BATCH = 48


def _fleet(tmp_path: Path, *, memory_gb: float, fail_at_s: float | None, device: int = 1) -> str:
    """Three equal simulated GPUs, slow enough that the planner keeps all three busy;
    ``device`` (by default 1, not the primary that holds the model) fails at ``fail_at_s``
    virtual seconds."""
    spec = {
        "name": "device_failure_loop",
        "global_batch": BATCH,
        "steps": STEPS,
        "seed": 2,
        "noise": 0.02,
        "devices": [
            {"name": "A100 40GB PCIe", "memory_gb": memory_gb, "samples_per_s": 120, "alpha_ms": 5}
            for _ in range(3)
        ],
        "job": {"mem_base_gb": 1.0, "mem_per_sample_gb": 0.1},
        "comm": {"alpha_ms": 2.0, "per_device_ms": 2.0},
        "primary_extra_ms": 2.0,
        "primary_extra_gb": 0.5,
        "events": []
        if fail_at_s is None
        else [{"at_s": fail_at_s, "device": device, "fail": True}],
    }
    path = tmp_path / f"fleet_{memory_gb}_{fail_at_s}_{device}.json"
    path.write_text(json.dumps(spec))
    return str(path)


def _data() -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Batches carrying their own id in a third tensor (split with the samples)."""
    g = torch.Generator().manual_seed(7)
    return [
        (
            torch.randn(BATCH, 6, generator=g, dtype=torch.float64),
            torch.randint(0, 3, (BATCH,), generator=g),
            torch.full((BATCH,), i),
        )
        for i in range(STEPS)
    ]


def _model() -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 3)).double()
    return model, torch.optim.SGD(model.parameters(), lr=0.3, momentum=0.9)


def _loss(model: nn.Module, batch: Any) -> torch.Tensor:
    x, y, _ids = batch
    return nn.functional.cross_entropy(model(x), y)


def _reference() -> nn.Module:
    """A plain PyTorch loop: one optimizer step per batch on the whole batch."""
    model, opt = _model()
    for batch in _data():
        opt.zero_grad(set_to_none=True)
        _loss(model, batch).backward()
        opt.step()
    return model


def _train(path: str) -> tuple[nn.Module, Any, Counter[int], list[int]]:
    """Train one epoch on the fleet ``path``; return the model, the report, how often the
    step function was called per batch id, and the batch ids in the order their optimizer
    step was applied."""
    model, opt = _model()
    calls: Counter[int] = Counter()
    current: list[int] = []
    applied: list[int] = []

    def step(m: nn.Module, batch: Any) -> torch.Tensor:
        ids = batch[2]
        assert bool((ids == ids[0]).all())
        batch_id = int(ids[0])
        calls[batch_id] += 1
        current[:] = [batch_id]
        return _loss(m, batch)

    opt.register_step_post_hook(lambda _opt, _args, _kwargs: applied.append(current[0]))
    report = adaptive_nb.train(
        step,
        model=model,
        optimizer=opt,
        data=_data(),
        epochs=1,
        devices=f"sim:{path}",
        control_interval=0.2,
    )
    return model, report, calls, applied


def _dropped(report: Any) -> list[Any]:
    return [e for e in report.events if e.kind == EventKind.DEVICE_DROPPED]


def test_without_a_failure_every_step_uses_all_three_devices(tmp_path: Path) -> None:
    """The set-up of the tests below: device 1 is in use when it fails."""
    _, report, calls, applied = _train(_fleet(tmp_path, memory_gb=40, fail_at_s=None))
    assert report.summary["steps"] == STEPS and not _dropped(report)
    assert all(len([s for s in r.shares.values() if s > 0]) == 3 for r in report.timeline)
    assert calls == Counter(range(STEPS)) and applied == list(range(STEPS))


def test_failed_device_is_dropped_and_its_batch_applied_exactly_once(tmp_path: Path) -> None:
    model, report, calls, applied = _train(_fleet(tmp_path, memory_gb=40, fail_at_s=1.5))

    (dropped,) = _dropped(report)
    failed_batch = dropped.step  # steps completed before the failure = the id it hit
    assert 0 < failed_batch < STEPS - 1, "the failure must hit mid-run"
    assert report.info.devices[1] in dropped.detail
    # every batch applied exactly once, in order; only the failed one was run twice
    assert Counter(applied) == Counter(range(STEPS))
    assert applied == list(range(STEPS))
    assert calls == Counter({i: 2 if i == failed_batch else 1 for i in range(STEPS)})
    # the run went on without device 1 and completed
    assert report.summary["ended"] == "completed" and report.summary["steps"] == STEPS
    assert report.summary["device_failures"] == 1
    assert report.summary["devices_failed"] == [report.info.devices[1]]
    assert report.info.devices[1] not in report.summary["devices"]
    after = [r for r in report.timeline if r.step > failed_batch]
    assert after and all(r.shares.get(report.info.devices[1], 0.0) == 0.0 for r in after)
    # and trained exactly as a plain loop: the failed attempt's gradients were discarded
    for a, b in zip(model.parameters(), _reference().parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_failure_while_micro_batching_discards_the_partial_gradients(tmp_path: Path) -> None:
    """Memory too small for a third of the batch at once: each step runs as micro-batches,
    so the failure leaves gradients of part of the batch behind; they must not count."""
    model, report, _calls, applied = _train(_fleet(tmp_path, memory_gb=2.2, fail_at_s=1.5))
    assert report.summary["micro_batches"] >= 2
    (dropped,) = _dropped(report)
    assert 0 < dropped.step < STEPS - 1
    assert applied == list(range(STEPS))
    assert report.summary["ended"] == "completed" and report.summary["steps"] == STEPS
    for a, b in zip(model.parameters(), _reference().parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_primary_failure_stops_cleanly_after_the_last_applied_step(tmp_path: Path) -> None:
    """For contrast: the primary holds the model, so its failure ends the run, keeping every
    step applied so far (each exactly once) and no half-applied one."""
    path = _fleet(tmp_path, memory_gb=40, fail_at_s=1.5, device=0)
    _, report, _calls, applied = _train(path)
    assert report.summary["ended"] == "stopped: no usable device"
    steps = report.summary["steps"]
    assert 0 < steps < STEPS
    assert applied == list(range(steps))
