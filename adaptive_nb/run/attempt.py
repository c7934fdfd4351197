"""One optimizer step's forward + backward, with the checks and retries that keep a step
applied exactly once: the loss is checked before ``backward``, and after an out-of-memory
or a dropped device the controller re-plans and the *same* batch is retried with the
gradients cleared."""

from __future__ import annotations

import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..errors import DeviceFailure, OutOfMemory, is_oom
from ..events import Event
from ..step import StepFn, StepOutcome, check_loss
from .rollback import OptimizerRollback, StepRollback, devices_of, optimizer_params

__all__ = [
    "MAX_RETRIES",
    "align_optimizer_state",
    "apply_optimizer_step",
    "checked_step",
    "forward_backward",
]

MAX_RETRIES = 8


def checked_step(step: StepFn, loss_name: str) -> StepFn:
    """``step`` whose result is checked to be a usable scalar loss (else LossError)."""

    def checked(model: nn.Module, batch: Any) -> torch.Tensor:
        return check_loss(step(model, batch), loss_name)

    return checked


def align_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """Move optimizer state (e.g. Adam moments from an earlier CPU run) to the device its
    parameter now lives on; scalar entries such as Adam's ``step`` stay where they are."""
    for param, state in optimizer.state.items():
        if not isinstance(param, torch.Tensor):
            continue
        for key, value in state.items():
            if isinstance(value, torch.Tensor) and value.dim() > 0 and value.device != param.device:
                state[key] = value.to(param.device)


def _state_follows_params(optimizer: torch.optim.Optimizer) -> None:
    """Align the optimizer state when the parameters moved (a new primary device): every
    parameter moves with the module, so the first tensor state tells (O(1) per step)."""
    for param, state in optimizer.state.items():
        if not isinstance(param, torch.Tensor):
            continue
        for value in state.values():
            if isinstance(value, torch.Tensor) and value.dim() > 0:
                if value.device != param.device:
                    align_optimizer_state(optimizer)
                return


def forward_backward(
    run_step: Callable[[], StepOutcome],
    zero_grad: Callable[[], None],
    *,
    on_oom: Callable[[OutOfMemory], Sequence[Event]],
    on_device_failure: Callable[[DeviceFailure], Sequence[Event]],
    rollback: StepRollback | None = None,
) -> tuple[StepOutcome, int]:
    """Run ``run_step`` (gradients cleared first), retrying the same batch after each
    out-of-memory or dropped device the controller re-planned around (``on_oom`` /
    ``on_device_failure`` re-plan, or re-raise when they cannot). Returns the outcome and
    the number of out-of-memory errors recovered on the way; re-raises after
    :data:`MAX_RETRIES` retries.

    Given a ``rollback`` (:class:`.rollback.StepRollback`, kept across steps so that its
    buffer copies are reused), a retry starts from exactly the state the first attempt saw:
    buffers (batch-norm running statistics) and the gradients of parameters outside the
    optimizer are restored."""
    if rollback is not None:
        rollback.take()
    retries = 0
    ooms = 0
    tried: list[str] = []
    while True:
        zero_grad()
        try:
            return run_step(), ooms
        except OutOfMemory as err:
            retries += 1
            _drop_traceback(err)
            _undo(zero_grad, rollback)  # also when giving up: the model is as before the step
            if retries > MAX_RETRIES:
                why = f"still out of memory after {MAX_RETRIES} retries"
                raise _gave_up(err, tried, why) from err
            try:
                events = on_oom(err)
            except OutOfMemory as final:
                raise _gave_up(final, tried, "no plan left that fits") from final
            tried.extend(e.detail for e in events if e.detail not in tried)
            ooms += 1
        except DeviceFailure as err:
            retries += 1
            _drop_traceback(err)
            _undo(zero_grad, rollback)
            on_device_failure(err)
            if retries > MAX_RETRIES:
                raise


def _gave_up(err: OutOfMemory, tried: list[str], why: str) -> OutOfMemory:
    """The out-of-memory the run stops with: what happened, what was tried, and that the
    step was not applied."""
    steps = "; ".join(tried[-4:]) if tried else "nothing (the controller could not re-plan)"
    first = (str(err).splitlines() or ["out of memory"])[0]
    return OutOfMemory(
        f"{first} — {why}. Tried: {steps}. The step was not applied (parameters, gradients "
        "and buffers are as before it): free GPU memory, lower the batch size or use a "
        "smaller model.",
        device=err.device,
    )


def _undo(zero_grad: Callable[[], None], rollback: StepRollback | None) -> None:
    zero_grad()
    if rollback is not None:
        rollback.restore()


def _drop_traceback(err: BaseException) -> None:
    """Let the failed attempt's frames (and the tensors they hold) go before anything tries
    to free device memory; the message and the error type stay."""
    seen: set[int] = set()
    e: BaseException | None = err
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        e.__traceback__ = None
        e = e.__cause__ or e.__context__


_STEPPED: weakref.WeakSet[torch.optim.Optimizer] = weakref.WeakSet()

# a later step on a GPU is copied when the copy costs ≤ 0.5 % of the step period (half the
# project's 1 % overhead budget at most)
GUARD_BUDGET = 0.005


@dataclass
class _Guard:
    """What decides whether a later optimizer step is copied first (see
    :func:`apply_optimizer_step`)."""

    last_t: float | None = None  # when the previous step began (perf_counter)
    copy_s: float | None = None  # measured seconds of one copy
    reserved: dict[torch.device, int] = field(default_factory=dict)  # after the last step
    devices: list[torch.device] = field(default_factory=list)  # of the parameters
    first_device: torch.device | None = None  # the first parameter's, when ``devices`` was read

    def cuda_devices(self, optimizer: torch.optim.Optimizer) -> list[torch.device]:
        """The CUDA devices of the parameters, re-read only when the first parameter moved
        (the whole model moves with it: O(1) per step)."""
        params = optimizer.param_groups[0]["params"] if optimizer.param_groups else []
        first = params[0].device if params else None
        if first != self.first_device:
            self.first_device = first
            self.devices = [d for d in _devices(optimizer) if d.type == "cuda"]
        return self.devices

    def cache_released(self, optimizer: torch.optim.Optimizer) -> bool:
        """Whether the allocator gave memory back since the previous step (``empty_cache``
        after an out-of-memory, a dropped device, a moved primary): the blocks the step's
        scratch was cached in may now belong to another process."""
        if not self.reserved or not torch.cuda.is_available():
            return False
        return any(
            torch.cuda.memory_reserved(d) < self.reserved.get(d, 0)
            for d in self.cuda_devices(optimizer)
        )

    def remember(self, optimizer: torch.optim.Optimizer) -> None:
        """The allocator's reserve after a completed step, per CUDA device."""
        if torch.cuda.is_available():
            self.reserved = {d: torch.cuda.memory_reserved(d) for d in self.cuda_devices(optimizer)}


_GUARDS: weakref.WeakKeyDictionary[torch.optim.Optimizer, _Guard] = weakref.WeakKeyDictionary()


def _rollback_for(optimizer: torch.optim.Optimizer) -> OptimizerRollback | None:
    """The host copy that makes this step recoverable, or None (see
    :func:`apply_optimizer_step`)."""
    guard = _GUARDS.get(optimizer)
    if guard is None:
        guard = _GUARDS[optimizer] = _Guard()
    now = time.perf_counter()
    period = None if guard.last_t is None else now - guard.last_t
    guard.last_t = now
    first = optimizer not in _STEPPED
    # parameters in host memory: the copy would take the memory that ran short; only the
    # first step (which allocates the state) is copied
    on_gpu = bool(guard.cuda_devices(optimizer))
    cheap = on_gpu and (
        guard.copy_s is None or (period is not None and guard.copy_s <= GUARD_BUDGET * period)
    )
    if not (first or cheap or guard.cache_released(optimizer)):
        return None
    rollback = OptimizerRollback(optimizer)
    if not first:  # the first step has no state yet: its copy says nothing of later ones
        taken = time.perf_counter() - now
        guard.copy_s = taken if guard.copy_s is None else 0.8 * guard.copy_s + 0.2 * taken
    return rollback


def _devices(optimizer: torch.optim.Optimizer) -> list[torch.device]:
    return devices_of(optimizer_params(optimizer))


def _free_cache(devices: Sequence[torch.device]) -> None:
    if not torch.cuda.is_available():
        return
    for dev in devices:
        if dev.type == "cuda":
            with torch.cuda.device(dev):
                torch.cuda.empty_cache()


def _per_parameter_updates(optimizer: torch.optim.Optimizer) -> bool:
    """Switch multi-tensor (``foreach``) updates off: they allocate temporaries for all
    parameters at once; the per-parameter loop needs one parameter's worth. True if any
    group changed."""
    changed = False
    for group in optimizer.param_groups:
        if "foreach" in group and group["foreach"] is not False:
            group["foreach"] = False
            changed = True
    return changed


def apply_optimizer_step(
    optimizer: torch.optim.Optimizer,
    *,
    on_oom: Callable[[OutOfMemory], object] | None = None,
    step: Callable[[], object] | None = None,
) -> int:
    """``optimizer.step()`` (or ``step()``, e.g. an engine's timed wrapper of it) applied
    exactly once, recovering an out-of-memory where that can be done exactly.

    No half-applied step: torch updates parameters and state in place, group by group
    and tensor by tensor, so an out-of-memory part-way leaves some updated. A step is
    therefore guarded by a host-memory copy of the parameters it updates and their
    optimizer state (:class:`.rollback.OptimizerRollback`) whenever it may run out of
    memory or the copy is cheap:

    * the *first* step of an optimizer, which allocates its state (Adam: two tensors per
      parameter);
    * a later step after the allocator gave memory back (an out-of-memory recovered in
      forward/backward, a dropped device or a moved primary empty the cache): the blocks
      the step's scratch used may now be another process's;
    * any later step on a GPU while one copy costs at most :data:`GUARD_BUDGET` of the
      step period (measured: the first later step is copied to measure it). Parameters in
      host memory are not copied after the first step: the copy would need the memory
      that ran short.

    After an out-of-memory in a guarded step the parameters and state are restored
    exactly, the failed attempt's references dropped and the device caches emptied, and
    the step retried; then retried once more with per-parameter (``foreach=False``)
    updates, which need far less scratch; if that fails too the run stops with nothing
    applied. An unguarded step (a large model whose cache was never released: its
    scratch blocks stay cached from the steps before, so it allocates nothing new) that
    still runs out of memory stops the run with a message saying that the update may be
    partly applied. ``on_oom`` hears of each recovered out-of-memory (the loop lets the
    controller leave room on the primary). Returns the number recovered.

    When the parameters moved to another device since the last step (a new primary), the
    optimizer state follows them first (outside ``step``, so its copy is not timed as
    the update)."""
    run = step if step is not None else optimizer.step
    _state_follows_params(optimizer)
    rollback = _rollback_for(optimizer)
    first = optimizer not in _STEPPED
    tried: list[str] = []
    while True:
        try:
            run()
        except Exception as exc:
            if not is_oom(exc):
                raise
            first_line = (str(exc).splitlines() or ["out of memory"])[0]
            _drop_traceback(exc)
            del exc
            if rollback is None:
                raise OutOfMemory(
                    f"optimizer.step() ran out of memory ({first_line}) after earlier steps "
                    "had fitted, on a step that was not copied beforehand (parameters in "
                    "host memory, or a copy of this model and its optimizer state costing "
                    f"more than {GUARD_BUDGET:.1%} of a step): the update may be partly "
                    "applied (torch updates parameters in place), so training stops here. "
                    "Free memory held elsewhere (other tensors or processes) or use an "
                    "optimizer with foreach=False."
                ) from None
            rollback.restore()
            _free_cache(devices_of(optimizer_params(optimizer)))
            if not tried:
                tried.append("emptied the allocator cache")
            elif len(tried) == 1 and _per_parameter_updates(optimizer):
                tried.append("switched to per-parameter updates (foreach=False)")
            else:
                which = "on its first step" if first else "again"
                advice = (
                    "The optimizer state does not fit next to the model: use a lighter "
                    "optimizer (e.g. SGD) or a smaller model."
                    if first
                    else "Free GPU memory held elsewhere (other tensors or processes), lower "
                    "the batch size or use a lighter optimizer."
                )
                raise OutOfMemory(
                    f"optimizer.step() ran out of memory {which} ({first_line}): "
                    f"tried: {'; '.join(tried)}. Nothing was applied: parameters and "
                    f"optimizer state are as before the step. {advice}"
                ) from None
            if on_oom is not None:
                on_oom(OutOfMemory(f"optimizer.step() ran out of memory; {tried[-1]}, retrying"))
            continue
        _STEPPED.add(optimizer)
        guard = _GUARDS.get(optimizer)
        if guard is not None:
            guard.remember(optimizer)
        return len(tried)
