"""Measured backward reaches the planner: in a whole run on the stubbed DataParallel
engine (CPU, per-device fake clocks, see ``test_backward_timing``), a device whose
backward alone is slow loses its share."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from test_backward_timing import BWD, FWD, DeviceClocks, Takes, TimedNet, _stub
from torch import nn

from adaptive_nb.engine.dataparallel import DataParallelEngine
from adaptive_nb.plan.allocation import AllocationController
from adaptive_nb.run.loop import Run


class PerSample(torch.autograd.Function):
    """Like :class:`Takes`, with times per sample of the chunk."""

    @staticmethod
    def forward(
        ctx: Any, x: torch.Tensor, clocks: DeviceClocks, device: int, fwd: float, bwd: float
    ) -> torch.Tensor:
        n = x.shape[0]
        ctx.info = (clocks, device, bwd * n)
        clocks.advance(device, fwd * n)
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> Any:
        clocks, device, bwd = ctx.info
        clocks.advance(device, bwd)
        return grad, None, None, None, None


def test_in_a_run_a_device_whose_backward_is_slow_loses_its_share(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The whole loop (Run + AllocationController) on the stubbed engine: device B has the
    same forward as A and C but a 10x slower backward. Timing forward and assuming
    backward = 2 x forward would see three equal devices; measured, B's share falls."""
    clocks = DeviceClocks()
    _stub(monkeypatch, clocks)
    monkeypatch.setattr(Takes, "apply", PerSample.apply)
    for d, b in ((0, 2e-4), (1, 2e-3), (2, 2e-4)):
        monkeypatch.setitem(FWD, d, 1e-4)
        monkeypatch.setitem(BWD, d, b)

    class CpuStubEngine(DataParallelEngine):
        def prepare(self, model: nn.Module) -> nn.Module:
            wrapper = self.wrap(model)
            wrapper.device_ids, wrapper.dim, wrapper.output_device = [0, 1, 2], 0, 0
            wrapper.src_device_obj = torch.device("cpu")
            return wrapper

        def primary_device(self) -> torch.device:
            return torch.device("cpu")

    engine = CpuStubEngine([0, 1, 2], clock=clocks, names=["A", "B", "C"], min_chunk=1)
    controller = AllocationController(
        engine, policy="adaptive", control_interval=0.0, snapshots=None
    )
    model = TimedNet(clocks)
    g = torch.Generator().manual_seed(0)
    data = [
        (torch.randn(60, 4, generator=g), torch.randint(0, 3, (60,), generator=g))
        for _ in range(12)
    ]
    report = Run(
        lambda m, b: nn.functional.cross_entropy(m(b[0]), b[1]),
        model=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.01),
        data=data,
        epochs=None,
        steps=len(data),
        engine=engine,
        controller=controller,
        snapshots=None,
        policy="adaptive",
        headroom=0.1,
        control_interval=0.0,
        handle_interrupt=False,
    ).execute()
    shares = [t.shares.get("B", 0.0) for t in report.timeline]
    assert shares[0] == pytest.approx(1 / 3)
    assert min(shares[:6]) < 0.2, shares  # within a few ticks of the first measurement
    final = report.timeline[-1].shares
    assert final["B"] < 0.2 and final["A"] > 0.3 and final["C"] > 0.3
