"""Mixed precision: ``torch.autocast`` around the step body, and for fp16 a GradScaler.

The engines call ``loss.backward()`` themselves (inside ``engine.forward_backward``), so
loss scaling is done by wrapping the step function: the loss it *returns* is
``scaler.scale(loss)``. The engines therefore report the scaled loss; the loop divides it
by ``scaler.get_scale()`` for the report and the progress line (the scale is fixed for
the whole optimizer step, since ``scaler.update()`` runs once per step, after it).

A step whose gradients overflowed is skipped by ``scaler.step`` (the scaler lowers its
scale): that is normal while fp16 finds its scale, so it is counted
(``summary["amp_skipped_steps"]``) and shown as an event, not raised. An out-of-memory
retry only re-runs forward/backward: ``scaler.update()`` is called once per optimizer step.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import torch
from torch import nn

from ..errors import UsageError
from ..step import StepFn

__all__ = ["PRECISIONS", "Precision", "Scaler", "autocast_step", "check_precision"]

PRECISIONS: dict[str, torch.dtype | None] = {
    "fp32": None,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
}


class Scaler(Protocol):
    """What the loop uses of ``torch.amp.GradScaler`` (a stub in CPU tests)."""

    def scale(self, outputs: torch.Tensor) -> torch.Tensor: ...
    def unscale_(self, optimizer: torch.optim.Optimizer) -> None: ...
    def step(self, optimizer: torch.optim.Optimizer) -> Any: ...
    def update(self) -> None: ...
    def get_scale(self) -> float: ...


def check_precision(precision: Any, device_kind: str) -> str:
    """``precision`` checked against the device kind ("cpu", "gpu", "sim")."""
    if precision not in PRECISIONS:
        raise UsageError(
            f"precision={precision!r} (--precision) is not understood: use fp32 (default), "
            "bf16 (autocast to bfloat16) or fp16 (autocast to float16 with loss scaling, "
            "CUDA only)."
        )
    if precision == "fp16" and device_kind != "gpu":
        where = "simulated devices (computed on the CPU)" if device_kind == "sim" else "the CPU"
        raise UsageError(
            f"precision='fp16' (--precision fp16) needs CUDA GPUs, and this run is on {where}: "
            "use --precision bf16 there (autocast to bfloat16), or fp32."
        )
    if precision == "bf16" and device_kind == "gpu" and not torch.cuda.is_bf16_supported():
        raise UsageError(
            "precision='bf16' (--precision bf16): this GPU has no bfloat16 support; use "
            "--precision fp16 (with loss scaling) or fp32."
        )
    return str(precision)


def autocast_step(step: StepFn, device_type: str, dtype: torch.dtype) -> StepFn:
    """``step`` run under ``torch.autocast(device_type, dtype)`` (backward stays outside,
    as PyTorch recommends: the engines call it on the returned loss)."""

    def autocast(model: nn.Module, batch: Any) -> torch.Tensor:
        with torch.autocast(device_type=device_type, dtype=dtype):
            return step(model, batch)

    return autocast


class Precision:
    """The run's precision: wraps the step body, scales the loss, applies the step."""

    def __init__(self, mode: str, device_type: str, scaler: Scaler | None = None) -> None:
        self.mode = mode
        self.device_type = device_type
        if scaler is None and mode == "fp16":
            scaler = torch.amp.GradScaler(device_type)
        self.scaler: Scaler | None = scaler
        self.step_scale = 1.0  # the scale the latest step's losses were multiplied by

    def wrap_body(self, step: StepFn) -> StepFn:
        dtype = PRECISIONS[self.mode]
        return step if dtype is None else autocast_step(step, self.device_type, dtype)

    def scale_loss(self) -> Callable[[torch.Tensor], torch.Tensor] | None:
        scaler = self.scaler
        return None if scaler is None else scaler.scale

    def unscale(self, optimizer: torch.optim.Optimizer) -> None:
        """Unscale the gradients in place (before clipping them)."""
        if self.scaler is not None:
            self.scaler.unscale_(optimizer)

    def step(
        self, optimizer: torch.optim.Optimizer, apply: Callable[[Callable[[], object]], None]
    ) -> tuple[bool, str]:
        """Apply the step (``apply`` runs the given update exactly once); with a scaler,
        (False, why) when it skipped an overflowed step."""
        scaler = self.scaler
        if scaler is None:
            apply(optimizer.step)
            return True, ""
        before = float(scaler.get_scale())
        self.step_scale = before  # update() below may change it: the losses used this one
        apply(lambda: scaler.step(optimizer))
        scaler.update()
        after = float(scaler.get_scale())
        if after < before:  # the scaler only lowers its scale after inf/NaN gradients
            return False, (
                f"fp16 gradients overflowed: step skipped by the GradScaler, loss scale "
                f"{before:g} → {after:g}"
            )
        return True, ""
