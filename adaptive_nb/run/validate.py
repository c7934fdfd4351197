"""Checks of the user's input, made before anything runs. Each failure is a
:class:`~adaptive_nb.errors.UsageError` that names the user's variable and the fix."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..errors import UsageError
from ..policies import POLICIES

__all__ = ["DeviceSpec", "check_counts", "check_inputs", "check_policy", "parse_devices"]


@dataclass(frozen=True)
class DeviceSpec:
    """Where to train: ``kind`` is "cpu", "gpu" (with CUDA indices) or "sim" (with a path)."""

    kind: str
    gpu_ids: tuple[int, ...] = ()
    sim_path: str | None = None


def _name(names: Mapping[str, str] | None, role: str) -> str:
    if names and role in names:
        return f"`{names[role]}`"
    return f"`{role}`"


def check_inputs(
    *,
    model: Any,
    optimizer: Any,
    data: Any,
    names: Mapping[str, str] | None = None,
) -> None:
    """Type checks for model, optimizer and data (with the user's variable names)."""
    m, o, d = _name(names, "model"), _name(names, "optimizer"), _name(names, "data")
    if not isinstance(model, nn.Module):
        raise UsageError(
            f"{m} is a {type(model).__name__}, not a torch.nn.Module: pass the network "
            "you want to train (e.g. `net = MyNet()`)."
        )
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise UsageError(
            f"{o} is a {type(optimizer).__name__}, not a torch.optim.Optimizer: create one "
            f"over the model's parameters, e.g. `opt = torch.optim.SGD({m.strip('`')}"
            ".parameters(), lr=0.1)`."
        )
    if isinstance(data, (str, bytes)) or not isinstance(data, Iterable):
        raise UsageError(
            f"{d} is a {type(data).__name__}, which cannot be iterated over batches: pass a "
            "DataLoader or any iterable of batches."
        )
    model_params = {id(p) for p in model.parameters()}
    opt_params = [p for g in optimizer.param_groups for p in g["params"]]
    if model_params and opt_params and not any(id(p) in model_params for p in opt_params):
        raise UsageError(
            f"{o} does not update any parameter of {m}: build the optimizer from "
            f"{m.strip('`')}.parameters()."
        )


def check_counts(epochs: int | None, steps: int | None) -> None:
    if epochs is not None and steps is not None:
        raise UsageError("give either --epochs or --steps, not both (epochs=…, steps=…).")
    for label, value in (("epochs", epochs), ("steps", steps)):
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int):
            raise UsageError(f"--{label} must be a whole number, got {value!r}.")
        if value <= 0:
            raise UsageError(f"--{label} must be at least 1, got {value}.")


def check_policy(policy: str, headroom: float) -> None:
    if policy not in POLICIES:
        raise UsageError(f"unknown policy {policy!r}: choose one of {', '.join(POLICIES)}.")
    if isinstance(headroom, bool) or not isinstance(headroom, (int, float)):
        raise UsageError(f"--headroom must be a number in [0, 1), got {headroom!r}.")
    if not 0.0 <= float(headroom) < 1.0:
        raise UsageError(
            f"--headroom must be at least 0 and below 1 (a fraction of each GPU's memory "
            f"kept free), got {headroom}."
        )


def parse_devices(spec: str | Iterable[int] | None, cuda_count: int | None = None) -> DeviceSpec:
    """Parse ``auto`` | ``cpu`` | ``0,2`` | ``sim:PATH`` (or a list of GPU indices)."""
    n = torch.cuda.device_count() if cuda_count is None else cuda_count
    if spec is None or (isinstance(spec, str) and spec.strip().lower() == "auto"):
        return DeviceSpec("gpu", tuple(range(n))) if n > 0 else DeviceSpec("cpu")
    if isinstance(spec, str):
        text = spec.strip()
        if text.lower() == "cpu":
            return DeviceSpec("cpu")
        if text.lower().startswith("sim:"):
            path = text[4:].strip()
            if not path:
                raise UsageError("--devices sim: needs a scenario file, e.g. sim:fleet.json.")
            if not os.path.isfile(path):
                raise UsageError(
                    f"--devices {text}: no scenario file at {path!r} (relative paths start "
                    f"from {os.getcwd()})."
                )
            return DeviceSpec("sim", sim_path=path)
        parts = [p.strip() for p in text.replace("cuda:", "").split(",") if p.strip()]
        try:
            ids = [int(p) for p in parts]
        except ValueError:
            raise UsageError(
                f"--devices {spec!r} is not understood: use auto, cpu, a list of GPU indices "
                "such as 0,2, or sim:SCENARIO.json."
            ) from None
    else:
        ids = [int(i) for i in spec]
    if not ids:
        raise UsageError("--devices names no GPU: use auto, cpu, or indices such as 0,2.")
    if len(set(ids)) != len(ids):
        raise UsageError(f"--devices lists a GPU twice: {ids}.")
    for i in ids:
        if i < 0 or i >= n:
            have = f"GPUs 0–{n - 1}" if n > 1 else ("GPU 0" if n == 1 else "no CUDA GPU")
            visible = os.environ.get("CUDA_VISIBLE_DEVICES")
            env = f" (CUDA_VISIBLE_DEVICES={visible})" if visible is not None else ""
            raise UsageError(
                f"GPU {i} does not exist: this kernel sees {have}{env}. Use --devices auto or cpu."
            )
    return DeviceSpec("gpu", tuple(ids))
