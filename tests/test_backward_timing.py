"""The DataParallel engine measures each device's forward *and* backward (no assumed
backward/forward ratio), charges the loss and the optimizer update to the primary, and
frees a failed attempt's tensors before emptying the cache. CPU: device events come from a
fake clock with one timeline per device, advanced by layers that "take" a set time; the
CUDA parts of ``nn.DataParallel.forward`` are stubbed."""

from __future__ import annotations

import weakref
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from adaptive_nb.engine.dataparallel import DataParallelEngine
from adaptive_nb.errors import OutOfMemory
from adaptive_nb.layout import Plan


class DeviceClocks:
    """One timeline per device; an event is (device, time) read when marked."""

    def __init__(self) -> None:
        self.now: dict[int, float] = {}
        self.marks: list[tuple[int, float]] = []

    def advance(self, device: int, seconds: float) -> None:
        self.now[device] = self.now.get(device, 0.0) + seconds

    def mark(self, device: int) -> Any:
        event = (device, self.now.get(device, 0.0))
        self.marks.append(event)
        return event

    def done(self, event: Any) -> bool:
        return True

    def seconds(self, start: Any, end: Any) -> float:
        assert start[0] == end[0], "an interval must start and end on one device"
        return float(end[1] - start[1])


class Takes(torch.autograd.Function):
    """Identity that advances ``device``'s clock by ``fwd`` in forward, ``bwd`` in backward."""

    @staticmethod
    def forward(
        ctx: Any, x: torch.Tensor, clocks: DeviceClocks, device: int, fwd: float, bwd: float
    ) -> torch.Tensor:
        ctx.info = (clocks, device, bwd)
        clocks.advance(device, fwd)
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> Any:
        clocks, device, bwd = ctx.info
        clocks.advance(device, bwd)
        return grad, None, None, None, None


class TimedNet(nn.Module):
    def __init__(self, clocks: DeviceClocks) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(4, 3)
        self.clocks = clocks
        self.device = 0
        self.fwd = 0.0
        self.bwd = 0.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return Takes.apply(self.lin(x), self.clocks, self.device, self.fwd, self.bwd)


FWD = {0: 0.010, 1: 0.010, 2: 0.005}
BWD = {0: 0.020, 1: 0.200, 2: 0.010}  # device 1's backward is slow
LOSS = (0.001, 0.002)  # the loss on the primary: forward, backward
OPT = 0.004


class CpuBroadcast(torch.autograd.Function):
    """``Broadcast`` on the CPU: ``n`` copies of each parameter from one autograd node,
    whose backward (like ``ReduceAddCoalesced``) runs only once every replica's gradient
    is in."""

    @staticmethod
    def forward(ctx: Any, n: int, *params: torch.Tensor) -> Any:
        ctx.n, ctx.k = n, len(params)
        return tuple(p.view_as(p) for _ in range(n) for p in params)

    @staticmethod
    def backward(ctx: Any, *grads: Any) -> Any:
        sums = []
        for i in range(ctx.k):
            parts = [g for g in grads[i :: ctx.k] if g is not None]
            sums.append(torch.stack(parts).sum(0) if parts else None)
        return (None, *sums)


def cpu_replicate(module: Any, n: int) -> list[Any]:
    """What ``torch.nn.parallel.replicate`` makes, on the CPU: replicas whose
    ``_parameters`` are empty and whose parameters are non-leaf copies from one shared
    broadcast node, kept in ``_former_parameters``."""
    params = list(module.parameters())
    copies = CpuBroadcast.apply(n, *params)
    index = {id(p): i for i, p in enumerate(params)}

    def build(m: Any, j: int) -> Any:
        r = m._replicate_for_data_parallel()
        r._former_parameters = OrderedDict()
        for key, param in m._parameters.items():
            copy = None if param is None else copies[j * len(params) + index[id(param)]]
            setattr(r, key, copy)
            if copy is not None:
                r._former_parameters[key] = copy
        for name, child in m._modules.items():
            r._modules[name] = build(child, j)
        return r

    return [build(module, j) for j in range(n)]


def _stub(monkeypatch: pytest.MonkeyPatch, clocks: DeviceClocks) -> None:
    def scatter(
        devices: Sequence[int], sizes: Sequence[int], dim: int, t: torch.Tensor
    ) -> list[torch.Tensor]:
        return list(torch.split(t, list(sizes), dim=dim))

    def replicate(self: Any, module: TimedNet, ids: Sequence[int]) -> list[TimedNet]:
        replicas = cpu_replicate(module, len(ids))
        for r, d in zip(replicas, ids, strict=True):
            r.device, r.fwd, r.bwd = d, FWD[d], BWD[d]
        return replicas

    def parallel_apply(self: Any, replicas: Any, inputs: Any, kwargs: Any) -> list[Any]:
        return [r(*i, **k) for r, i, k in zip(replicas, inputs, kwargs, strict=True)]

    monkeypatch.setattr("adaptive_nb.engine.weighted._torch_scatter", scatter)
    monkeypatch.setattr(nn.DataParallel, "replicate", replicate)
    monkeypatch.setattr(nn.DataParallel, "parallel_apply", parallel_apply)
    monkeypatch.setattr(nn.DataParallel, "gather", lambda self, outs, dev: torch.cat(outs))
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda d: None)
    monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda d: 0)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda d: 0)


def _engine(clocks: DeviceClocks, shares: tuple[float, ...]) -> tuple[DataParallelEngine, Any]:
    engine = DataParallelEngine(
        [0, 1, 2], clock=clocks, names=["GPU 0", "GPU 1", "GPU 2"], min_chunk=1
    )
    model = TimedNet(clocks)
    model.fwd, model.bwd = FWD[0], BWD[0]
    wrapper = engine.wrap(model)
    wrapper.device_ids, wrapper.dim, wrapper.output_device = [0, 1, 2], 0, 0  # as with CUDA
    wrapper.src_device_obj = torch.device("cpu")
    engine.apply_plan(Plan((0, 1, 2), shares, 1, 12))
    return engine, wrapper


def _loss(clocks: DeviceClocks) -> Any:
    def step(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x, y = batch
        out = Takes.apply(model(x), clocks, 0, *LOSS)
        return nn.functional.cross_entropy(out, y)

    return step


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(2)
    return torch.randn(12, 4, generator=g), torch.randint(0, 3, (12,), generator=g)


def test_forward_and_backward_are_bracketed_per_device_and_a_slow_backward_shows(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    clocks = DeviceClocks()
    _stub(monkeypatch, clocks)
    engine, _ = _engine(clocks, (0.5, 0.25, 0.25))
    step, batch = _loss(clocks), _batch()
    first = engine.forward_backward(step, batch)
    assert first.device_time_s == {}  # warm-up: not measured
    engine.forward_backward(step, batch)
    update = engine.timed_update(lambda: clocks.advance(0, OPT))
    update()  # the optimizer step of the second step, charged to its primary
    out = engine.forward_backward(step, batch)  # reports the second step (read late)
    phases = out.device_phase_s
    assert set(phases) == {0, 1, 2}
    for d in (0, 1, 2):
        assert phases[d]["forward"] == pytest.approx(FWD[d])
        assert phases[d]["backward"] == pytest.approx(BWD[d])
    assert phases[0]["loss"] == pytest.approx(sum(LOSS))
    assert phases[0]["optimizer"] == pytest.approx(OPT)
    assert out.device_time_s[1] == pytest.approx(FWD[1] + BWD[1])  # measured, not 3 × forward
    assert out.device_time_s[0] == pytest.approx(FWD[0] + BWD[0] + sum(LOSS) + OPT)
    assert max(out.device_time_s, key=out.device_time_s.__getitem__) == 1
    assert out.device_batch == {0: 6, 1: 3, 2: 3}


def test_replicas_like_torch_replicate_still_give_the_full_batch_gradient(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    clocks = DeviceClocks()
    _stub(monkeypatch, clocks)
    engine, wrapper = _engine(clocks, (0.5, 0.25, 0.25))
    step, batch = _loss(clocks), _batch()
    reference = TimedNet(DeviceClocks())
    step(reference, batch).backward()
    engine.forward_backward(step, batch)
    for a, b in zip(wrapper.module.parameters(), reference.parameters(), strict=True):
        assert a.grad is not None and b.grad is not None
        torch.testing.assert_close(a.grad, b.grad)
    assert wrapper.hook_handles == []  # hooks removed after the step


def test_one_device_alone_is_timed_too(monkeypatch: pytest.MonkeyPatch) -> None:
    clocks = DeviceClocks()
    _stub(monkeypatch, clocks)
    engine, _ = _engine(clocks, (1.0, 0.0, 0.0))
    step, batch = _loss(clocks), _batch()
    for _ in range(3):
        out = engine.forward_backward(step, batch)
    assert out.device_phase_s[0]["forward"] == pytest.approx(FWD[0])
    assert out.device_phase_s[0]["backward"] == pytest.approx(BWD[0])
    assert out.device_phase_s[0]["loss"] == pytest.approx(sum(LOSS))
    assert set(out.device_time_s) == {0}


def test_micro_batches_add_up_their_passes(monkeypatch: pytest.MonkeyPatch) -> None:
    clocks = DeviceClocks()
    _stub(monkeypatch, clocks)
    engine, _ = _engine(clocks, (0.5, 0.25, 0.25))
    engine.apply_plan(Plan((0, 1, 2), (0.5, 0.25, 0.25), 2, 12))
    step, batch = _loss(clocks), _batch()
    for _ in range(3):
        out = engine.forward_backward(step, batch)
    assert out.micro_batches == 2
    assert out.device_phase_s[1]["backward"] == pytest.approx(2 * BWD[1])


def test_an_oom_in_the_loss_frees_the_attempt_before_emptying_the_cache(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    clocks = DeviceClocks()
    _stub(monkeypatch, clocks)
    engine, _ = _engine(clocks, (0.5, 0.25, 0.25))
    held: list[weakref.ref[torch.Tensor]] = []
    alive_at_release: list[bool] = []

    class _Device:
        def __init__(self, index: int) -> None:
            pass

        def __enter__(self) -> None:
            pass

        def __exit__(self, *exc: object) -> None:
            pass

    monkeypatch.setattr(torch.cuda, "device", _Device)
    monkeypatch.setattr(
        torch.cuda, "empty_cache", lambda: alive_at_release.append(held[0]() is not None)
    )

    def greedy_loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        out = model(batch[0])
        workspace = torch.empty(1000)
        held.append(weakref.ref(workspace))
        raise torch.cuda.OutOfMemoryError(
            f"CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has ... {out.shape}"
        )

    with pytest.raises(OutOfMemory) as err:
        engine.forward_backward(greedy_loss, _batch())
    assert err.value.device == 0
    assert alive_at_release == [False, False, False]  # every device, after the tensors went
    assert err.value.__traceback__ is not None and err.value.__cause__ is None


def test_each_replicas_backward_is_bracketed_by_its_own_nodes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """On one autograd thread (as when replicas share a GPU) the replicas' backward passes
    run one after another: each one's end must be marked before the next one starts, not
    when the shared broadcast node finally runs after all of them."""
    clocks = DeviceClocks()
    _stub(monkeypatch, clocks)
    engine, wrapper = _engine(clocks, (0.5, 0.25, 0.25))
    marks: list[str] = []
    inner = wrapper.on_mark
    assert inner is not None

    def logged(position: int, what: str) -> None:
        marks.append(f"{what} {position}")
        inner(position, what)

    wrapper.on_mark = logged
    engine.forward_backward(_loss(clocks), _batch())
    backward = [m for m in marks if m.startswith("backward")]
    assert len(backward) == 6
    for start, end in zip(backward[::2], backward[1::2], strict=True):
        assert start.startswith("backward_start") and end.startswith("backward_end")
        assert start.split()[1] == end.split()[1], backward


@pytest.mark.gpu
def test_on_a_real_gpu_every_phase_is_measured_from_events() -> None:
    engine = DataParallelEngine([0])
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    engine.prepare(model)
    g = torch.Generator().manual_seed(0)
    batch = (torch.randn(512, 64, generator=g).cuda(0), torch.randint(0, 4, (512,)).cuda(0))

    def ce(m: nn.Module, b: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return nn.functional.cross_entropy(m(b[0]), b[1])

    for _ in range(4):
        opt.zero_grad(set_to_none=True)
        engine.forward_backward(ce, batch)
        engine.timed_update(opt.step)()
    torch.cuda.synchronize()
    out = engine.forward_backward(ce, batch)
    phases = out.device_phase_s[0]
    assert set(phases) == {"forward", "backward", "loss", "optimizer"}
    assert all(v > 0 for v in phases.values()), phases
    assert out.device_time_s[0] == pytest.approx(sum(phases.values()))


def test_the_timing_hooks_cost_script_runs(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parent.parent / "benchmarks"))
    import timing_hooks_cost

    timing_hooks_cost.main(repeats=2)
    out = capsys.readouterr().out
    assert "161 parameter tensors" in out and "with marks" in out


def test_an_oom_in_the_gather_on_the_primary_is_an_out_of_memory_there(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    clocks = DeviceClocks()
    _stub(monkeypatch, clocks)
    engine, _ = _engine(clocks, (0.5, 0.25, 0.25))
    released: list[int] = []
    monkeypatch.setattr(engine, "release_device", released.append)

    def gather_oom(self: Any, outs: Any, dev: int) -> Any:
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 4 GiB. GPU 0")

    monkeypatch.setattr(nn.DataParallel, "gather", gather_oom)
    with pytest.raises(OutOfMemory) as err:
        engine.forward_backward(_loss(clocks), _batch())
    assert err.value.device == 0 and released == [0, 1, 2]
    assert engine.wrapper is not None and engine.wrapper.hook_handles == []
