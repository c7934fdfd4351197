"""The simulated-fleet engine: timing, memory and faults come from the scenario on a
virtual clock; the model's forward and backward run for real on the CPU (or not at all in
the model-free benchmark path)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..batches import batch_size_of
from ..engine.base import Engine
from ..engine.microbatch import run_micro_batches
from ..layout import Plan, equal_split
from ..step import StepFn, StepOutcome
from .clock import VirtualClock
from .fleet import Fleet, FleetStep
from .scenario import Scenario

__all__ = ["SimulatedEngine"]

_ZERO = torch.zeros(())
MOVE_GBPS = 10.0  # simulated device-to-device copy rate of a primary move (PCIe class)


class SimulatedEngine(Engine):
    """An :class:`Engine` over a simulated fleet (device names say "sim").

    With ``compute=True`` the step runs on the CPU for real (micro-batches included, with
    the same gradient as the full batch); a simulated fault is raised after the real
    forward/backward of the micro-batch it hits, leaving partial gradients behind exactly
    as an out-of-memory in a real backward pass would (the loop zeroes them and retries).
    :meth:`simulate_step` is the model-free path used by the benchmark.

    The primary (the plan's first device) does the scenario's ``primary_extra_ms`` and
    holds ``primary_extra_gb`` wherever it is; a plan naming another primary moves it
    between steps, which costs :meth:`move_bytes` at :data:`MOVE_GBPS` on the virtual clock
    (``last_move_s``).
    """

    simulated = True
    movable_primary = True

    def __init__(
        self, scenario: Scenario, *, compute: bool = True, clock: VirtualClock | None = None
    ) -> None:
        self.scenario = scenario
        self.fleet = Fleet(scenario, clock)
        self.compute = compute
        self._names = [f"sim GPU {i} ({d.name})" for i, d in enumerate(scenario.devices)]
        n = len(scenario.devices)
        self.plan = Plan(
            devices=tuple(range(n)),
            shares=tuple(1.0 / n for _ in range(n)),
            micro_batches=1,
            batch=0,
        )
        self._model: nn.Module | None = None
        self.steps = 0
        self.last_batch = 0
        self.primary_moves = 0
        self.last_move_s: float | None = None
        self.last_move_bytes = 0

    # -- Engine ---------------------------------------------------------------------------
    def device_names(self) -> list[str]:
        return list(self._names)

    def monitor_keys(self) -> list[int | None]:
        return list(range(len(self._names)))

    def prepare(self, model: nn.Module) -> nn.Module:
        self._model = model
        return model

    def clock(self) -> float:
        return self.fleet.clock.now()

    def apply_plan(self, plan: Plan) -> None:
        if plan.primary != self.plan.primary and self.steps > 0:
            seconds = self.move_bytes() / (MOVE_GBPS * 1e9)
            self.fleet.clock.advance(seconds)  # the copy holds up training
            self.last_move_s = seconds
            self.last_move_bytes = self.move_bytes()
            self.primary_moves += 1
        self.plan = plan

    def move_bytes(self) -> int:
        """Bytes a primary move copies: the job's fixed memory (model, gradients) and the
        primary's extra (optimizer state)."""
        sc = self.scenario
        return int((sc.job.mem_base_gb + sc.primary_extra_gb) * 1e9)

    def speed_hints(self) -> list[float]:
        """Each device's unloaded samples/s at an equal share of the batch: the spec sheet
        a real engine would read (no external load in it)."""
        sc = self.scenario
        b = max(1.0, sc.global_batch / max(1, len(sc.devices)))
        return [1000.0 * b / max(d.idle_ms(b), 1e-9) for d in sc.devices]

    def layout(self, total: int) -> list[list[int]]:
        return self.plan.layout(total)

    def forward_backward(self, step: StepFn, batch: Any) -> StepOutcome:
        if not self.compute:
            return self.simulate_step(batch_size_of(batch))
        if self._model is None:
            raise RuntimeError("SimulatedEngine.prepare() must be called before forward_backward()")
        total = batch_size_of(batch)
        self.last_batch = total
        layout = self.layout(total)
        sim = self.fleet.run(layout, self.plan.primary, self._names)

        def before_each(index: int, size: int) -> None:
            if sim.fault is not None and index > sim.fault_micro:
                raise _Abort

        try:
            loss, _ = run_micro_batches(step, self._model, batch, len(layout), before_each)
        except _Abort:
            loss = _ZERO
        return self._finish(sim, total, loss)

    def simulate_step(self, total: int) -> StepOutcome:
        """One step with no model compute (benchmark path)."""
        self.last_batch = total
        layout = self.layout(total)
        sim = self.fleet.run(layout, self.plan.primary, self._names)
        return self._finish(sim, total, _ZERO)

    def _finish(self, sim: FleetStep, total: int, loss: torch.Tensor) -> StepOutcome:
        self.fleet.clock.advance(sim.wall_s)
        self.fleet.after_step()
        if sim.fault is not None:
            raise sim.fault
        self.steps += 1
        return StepOutcome(
            loss=loss,
            samples=total,
            wall_s=sim.wall_s,
            device_time_s=sim.device_time_s,
            device_batch=sim.device_batch,
            peak_mem_mb=sim.peak_mem_mb,
            micro_batches=sim.micro_batches,
            device_phase_s=sim.phase_s,
        )


class _Abort(Exception):
    """Stops the real compute after the micro-batch a simulated fault hit."""


def static_layout(n: int, total: int) -> list[list[int]]:
    """Plain DataParallel's split (equal, remainder to the first devices), one micro-batch."""
    return [equal_split(total, n)]
