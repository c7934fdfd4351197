"""The training-loop options over a simulated device that runs out of memory: the batch is
retried and split into micro-batches, and accumulation, clipping and the scheduler still
give the plain loop's result (up to float summation order)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from conftest import ce_step, make_data, make_model
from torch import nn

import adaptive_nb
from adaptive_nb.events import EventKind


def _tight_fleet(tmp_path: Path) -> str:
    spec = {
        "name": "tight",
        "global_batch": 16,
        "steps": 200,
        "seed": 3,
        "noise": 0.0,
        "devices": [
            {"name": "A100 40GB PCIe", "memory_gb": 4, "samples_per_s": 900, "alpha_ms": 8}
        ],
        "job": {"mem_base_gb": 2.0, "mem_per_sample_gb": 0.2},  # 16 samples need 5.2 GB
        "comm": {"alpha_ms": 4.0, "per_device_ms": 6.0},
        "primary_extra_ms": 0.0,
        "primary_extra_gb": 0.0,
        "events": [],
    }
    path = tmp_path / "tight.json"
    path.write_text(json.dumps(spec))
    return str(path)


def test_accumulation_clipping_and_scheduler_over_micro_batches(tmp_path: Path) -> None:
    data = make_data()
    ref = make_model()
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
    ref_sched = torch.optim.lr_scheduler.StepLR(ref_opt, step_size=1, gamma=0.8)
    for _ in range(2):
        for start in range(0, len(data), 2):
            ref_opt.zero_grad()
            for x, y in data[start : start + 2]:
                (nn.functional.cross_entropy(ref(x), y) * 0.5).backward()
            torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.5)
            ref_opt.step()
            ref_sched.step()

    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.8)
    report = adaptive_nb.train(
        ce_step,
        model=model,
        optimizer=opt,
        data=data,
        epochs=2,
        devices=f"sim:{_tight_fleet(tmp_path)}",
        accumulate=2,
        clip_grad_norm=0.5,
        scheduler=sched,
    )
    assert report.summary["oom_recovered"] >= 1  # the first batch did not fit whole
    assert any(e.kind == EventKind.MICROBATCH for e in report.events)
    assert report.summary["steps"] == 6 and sched.last_epoch == 6
    for a, b in zip(ref.parameters(), model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
