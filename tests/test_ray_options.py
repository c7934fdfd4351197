"""``engine="ray"`` options are checked before anything starts (no Ray is started or
joined by a refused call): worker counts ``N`` / ``MIN:MAX``, Ray-only options with
another engine, Ray not installed, token authentication switched off, and the options
the engine does not support."""

from __future__ import annotations

import importlib.util
from typing import Any

import pytest
import torch
from IPython.core.error import UsageError as IPythonUsageError
from IPython.core.interactiveshell import InteractiveShell
from ray_support import job, ray, step

import adaptive_nb
from adaptive_nb.errors import UsageError
from adaptive_nb.run.ray_backend import parse_workers

pytestmark = pytest.mark.timeout(60)


@pytest.mark.parametrize(
    ("given", "expected"),
    [(3, (3, 3)), ("3", (3, 3)), ("2:4", (2, 4)), (" 1:1 ", (1, 1)), ((2, 5), (2, 5))],
)
def test_worker_counts_parse(given: Any, expected: tuple[int, int]) -> None:
    assert parse_workers(given) == expected


@pytest.mark.parametrize("given", [0, "0", "4:2", "0:2", "2:", ":3", "a:b", "1:2:3", True, 2.5])
def test_bad_worker_counts_are_refused(given: Any) -> None:
    with pytest.raises(UsageError, match="MIN:MAX"):
        parse_workers(given)


def _train(**options: Any) -> None:
    model, opt, data = job(2)
    adaptive_nb.train(step, model=model, optimizer=opt, data=data, **options)


def _unchanged(model: torch.nn.Module, before: list[torch.Tensor]) -> bool:
    return all(torch.equal(p, q) for p, q in zip(model.parameters(), before, strict=True))


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"engine": "ray", "workers": "3:1"}, "MIN:MAX"),
        ({"engine": "ddp", "ray_address": "head:6379"}, "ray_address .* engine='ray'"),
        ({"gpus_per_worker": 1}, r"gpus_per_worker \(--gpus-per-worker\) belong"),
        ({"engine": "ray", "gpus_per_worker": -1}, "number ≥ 0"),
        ({"engine": "ray", "ray_address": "  "}, "Ray address"),
        ({"engine": "ray", "accumulate": 2}, r"does not support accumulate > 1"),
        ({"engine": "ray", "checkpoint_dir": "ckpt"}, "Ray Train checkpoints the workers"),
        ({"engine": "ray", "precision": "bf16"}, "precision other than fp32"),
        ({"engine": "ray", "devices": "cpu", "gpus_per_worker": 1}, "Ray places the workers"),
        ({"engine": "ray", "max_restarts": 1}, "Ray Train restarts the workers itself"),
    ],
)
def test_bad_options_are_refused_before_ray_starts(options: dict[str, Any], message: str) -> None:
    model, opt, data = job(2)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(UsageError, match=message):
        adaptive_nb.train(step, model=model, optimizer=opt, data=data, **options)
    assert _unchanged(model, before)
    assert not ray.is_initialized()


def test_ray_not_installed_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec

    def missing(name: str, *args: Any) -> Any:
        return None if name.split(".")[0] == "ray" else real(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", missing)
    with pytest.raises(UsageError, match=r"pip install 'adaptive_nb\[ray\]'"):
        _train(engine="ray")


@pytest.mark.parametrize("address", [None, "head:6379"])
def test_token_authentication_switched_off_is_refused(
    monkeypatch: pytest.MonkeyPatch, address: str | None
) -> None:
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    with pytest.raises(UsageError, match="without token authentication"):
        _train(engine="ray", ray_address=address)
    assert not ray.is_initialized()


def test_magic_passes_min_max_workers_to_the_check() -> None:
    ip = InteractiveShell.instance()
    ip.run_line_magic("load_ext", "adaptive_nb")
    model, opt, data = job(2)
    ip.user_ns.update(rnet=model, ropt=opt, rdata=data)
    try:
        with pytest.raises(IPythonUsageError, match="MIN:MAX"):
            ip.run_cell_magic(
                "adaptive_train",
                "--model rnet --optimizer ropt --data rdata --no-widget --engine ray "
                "--workers 4:2 --gpus-per-worker 0",
                "x, y = batch\nloss = torch.nn.functional.cross_entropy(model(x), y)\n",
            )
    finally:
        for name in ("rnet", "ropt", "rdata"):
            ip.user_ns.pop(name, None)
    assert not ray.is_initialized()
