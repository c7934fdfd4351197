"""``gpus_per_worker``: Ray gives each Ray Train worker a GPU (nccl); the worker runs its
slice on its own device and reports the GPU's name; the result is the full-batch result.
GPU machines only (``make gpu-check``); one worker per visible GPU, at most 2."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from ray_support import job, local_ray, max_diff, reference, step

import adaptive_nb
from adaptive_nb.engine.ray_train import RayConnection

pytestmark = [pytest.mark.gpu, pytest.mark.timeout(300)]


@pytest.fixture(scope="module")
def cluster() -> Iterator[RayConnection]:
    yield from local_ray()


def test_gpu_workers_report_their_device_and_match_full_batch(cluster: RayConnection) -> None:
    workers = min(2, torch.cuda.device_count())
    model, opt, data = job(4)
    report = adaptive_nb.train(
        step,
        model=model,
        optimizer=opt,
        data=data,
        engine="ray",
        workers=workers,
        gpus_per_worker=1,
        policy="weights",
    )
    assert report.summary["ended"] == "completed" and report.summary["steps"] == 4
    notice = next(e.detail for e in report.events if "Ray Train workers:" in e.detail)
    assert notice.count("(cuda:") == workers, notice
    assert max_diff(model, reference(4)) < 1e-5
