"""What a failed attempt may have changed, and how to put it back exactly.

A retried step must leave the model as *one* successful step would. A forward pass that
ran out of memory half-way has already updated batch-norm running statistics (and
``num_batches_tracked``) in place, and a backward that failed half-way has left partial
gradients, also in parameters the optimizer does not own (its ``zero_grad`` never sees
them). :class:`StepRollback` records both before the first attempt and restores them before
each retry.

Cost: a model without buffers costs nothing. A model with buffers gets one preallocated
copy of them, refreshed with ``copy_`` before each step (no allocation after the first
step; batch-norm statistics are two vectors per layer). Gradients of parameters outside the
optimizer are saved only when they exist (usually they are None).

:class:`OptimizerRollback` does the same for an optimizer step that runs out of memory (see
:func:`~adaptive_nb.run.attempt.apply_optimizer_step`).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

__all__ = ["OptimizerRollback", "StepRollback", "optimizer_params"]


def optimizer_params(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [p for group in optimizer.param_groups for p in group["params"]]


class StepRollback:
    """Buffers and foreign gradients of ``model`` as they were before a step's first
    attempt (see module doc). ``take()`` before the first attempt, ``restore()`` before
    each retry."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer | None) -> None:
        self.model = model
        owned = {id(p) for p in optimizer_params(optimizer)} if optimizer is not None else set()
        self._foreign = [p for p in model.parameters() if id(p) not in owned]
        self._buffers: list[tuple[nn.Module, str, torch.Tensor, torch.Tensor]] = []
        self._sources: list[torch.Tensor] = []  # the buffers, and their kept copies
        self._copies: list[torch.Tensor] = []
        self._grads: list[torch.Tensor | None] = []
        self._takes = 0

    def take(self) -> None:
        """Copy the buffers into the kept copies (no allocation once shapes are known) and
        the foreign gradients that exist. The module tree is walked on the first call and
        again whenever a kept buffer is no longer in its module (replaced or removed), or
        every :attr:`REWALK` calls (buffers registered later)."""
        self._takes += 1
        if self._stale() or self._takes % self.REWALK == 1:
            self._walk()
        if self._sources:
            with torch.no_grad():
                _copy_all(self._copies, self._sources)
        self._grads = [None if p.grad is None else p.grad.detach().clone() for p in self._foreign]

    REWALK = 100

    def _stale(self) -> bool:
        return any(m._buffers.get(name) is not buf for m, name, buf, _ in self._buffers)

    def _walk(self) -> None:
        kept: list[tuple[nn.Module, str, torch.Tensor, torch.Tensor]] = []
        old = {(id(m), name): copy for m, name, _, copy in self._buffers}
        for module in self.model.modules():
            for name, buf in module._buffers.items():
                if buf is None:
                    continue
                copy = old.get((id(module), name))
                if copy is None or (copy.shape, copy.dtype, copy.device) != (
                    buf.shape,
                    buf.dtype,
                    buf.device,
                ):
                    copy = torch.empty_like(buf)
                kept.append((module, name, buf, copy))
        self._buffers = kept
        self._sources = [buf for _, _, buf, _ in kept]
        self._copies = [copy for _, _, _, copy in kept]

    def restore(self) -> None:
        """Put every buffer (in place: replicas and user references stay valid) and every
        gradient of a parameter outside the optimizer back as they were."""
        with torch.no_grad():
            for module, name, buf, copy in self._buffers:
                buf.copy_(copy)
                if module._buffers.get(name) is not buf:  # replaced: put the original back
                    module._buffers[name] = buf
        for p, g in zip(self._foreign, self._grads, strict=True):
            p.grad = None if g is None else g.clone()


def _host_copy(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    return value


class OptimizerRollback:
    """Parameters and optimizer state copied to host memory (never to the device that just
    ran out of memory), restorable in place."""

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.optimizer = optimizer
        self._params = [p for p in optimizer_params(optimizer) if p.grad is not None]
        self._values = [_host_copy(p) for p in self._params]
        self._had_state = {id(p) for p in optimizer_params(optimizer) if p in optimizer.state}
        self._state = {
            id(p): {k: _host_copy(v) for k, v in optimizer.state[p].items()}
            for p in self._params
            if p in optimizer.state
        }
        self._groups = [
            {k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups
        ]

    def restore(self) -> None:
        opt = self.optimizer
        with torch.no_grad():
            for p, v in zip(self._params, self._values, strict=True):
                p.copy_(v)
        for p in list(opt.state.keys()):
            if isinstance(p, torch.Tensor) and id(p) not in self._had_state:
                del opt.state[p]  # state the failed step began to allocate
        for p in self._params:
            saved = self._state.get(id(p))
            if saved is None:
                continue
            state = opt.state[p]
            for key in list(state.keys()):
                if key not in saved:
                    del state[key]
            for key, value in saved.items():
                current = state.get(key)
                if isinstance(value, torch.Tensor) and isinstance(current, torch.Tensor):
                    if current.shape == value.shape:
                        current.copy_(value)
                        continue
                    state[key] = value.to(current.device)
                else:
                    state[key] = value
        for group, saved_group in zip(opt.param_groups, self._groups, strict=True):
            group.update(saved_group)


def devices_of(tensors: Iterable[torch.Tensor]) -> list[torch.device]:
    seen: list[torch.device] = []
    for t in tensors:
        if t.device not in seen:
            seen.append(t.device)
    return seen


def _copy_all(dst: list[torch.Tensor], src: list[torch.Tensor]) -> None:
    """``dst[i].copy_(src[i])`` for all ``i``: one multi-tensor kernel where torch has it
    (one launch per step instead of one per buffer)."""
    foreach_copy = getattr(torch, "_foreach_copy_", None)
    if foreach_copy is not None:
        foreach_copy(dst, src)
        return
    for d, s in zip(dst, src, strict=True):
        d.copy_(s)
