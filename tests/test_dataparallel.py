"""Weighted DataParallel: pure parts on CPU; real scatter, gradient equality and OOM
recovery on CUDA (marked ``gpu``, skipped without a device)."""

from __future__ import annotations

import copy
from collections import namedtuple
from collections.abc import Sequence
from typing import Any

import pytest
import torch
from test_backward_timing import cpu_replicate
from torch import nn

import adaptive_nb
from adaptive_nb.batches import first_batch_size
from adaptive_nb.engine.dataparallel import (
    DataParallelEngine,
    WeightedDataParallel,
    device_of_error,
    scatter_weighted,
)
from adaptive_nb.errors import DeviceFailure, OutOfMemory, UsageError
from adaptive_nb.layout import Plan

Pair = namedtuple("Pair", ["x", "y"])


def fake_scatter(
    devices: Sequence[int], sizes: Sequence[int], dim: int, t: torch.Tensor
) -> list[torch.Tensor]:
    assert len(devices) == len(sizes)
    return list(torch.split(t, list(sizes), dim=dim))


def test_scatter_weighted_nested_structures() -> None:
    x = torch.arange(12).reshape(6, 2)
    batch = ({"a": x, "b": [x, "tag"], "n": Pair(x, x[:, 0])}, 3)
    out = scatter_weighted(batch, [0, 2], [4, 2], scatter=fake_scatter)
    assert len(out) == 2
    first, second = out
    assert first[0]["a"].shape == (4, 2) and second[0]["a"].shape == (2, 2)
    assert first[0]["b"][1] == "tag" and second[1] == 3
    assert isinstance(second[0]["n"], Pair) and second[0]["n"].y.tolist() == [8, 10]


def test_scatter_weighted_rejects_tensors_that_are_not_batch_shaped() -> None:
    with pytest.raises(UsageError, match="split"):
        scatter_weighted((torch.zeros(6, 2), torch.zeros(3)), [0, 1], [3, 3], scatter=fake_scatter)


def test_device_of_error() -> None:
    assert device_of_error("Caught OutOfMemoryError in replica 1 on device 1.\nOriginal") == 1
    assert device_of_error("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 3 has a total") == 3
    assert device_of_error("something else") is None


def test_first_batch_size() -> None:
    assert first_batch_size(((), {"x": torch.zeros(5, 3)})) == 5
    assert first_batch_size(("a", [torch.zeros(())], torch.zeros(7))) == 7
    assert first_batch_size(("a",)) is None


def test_chunk_plan_leaves_out_zero_shares_and_keeps_the_primary() -> None:
    dp = WeightedDataParallel(nn.Linear(2, 2), [0, 1, 2])
    dp.set_plan([0.0, 0.7, 0.3])
    positions, sizes = dp.chunk_plan(10)
    assert positions[0] == 0 and sizes[0] == 1  # the primary always computes something
    assert sum(sizes) == 10 and all(s > 0 for s in sizes)
    dp.set_plan([0.5, 0.0, 0.5], [None, None, 3])
    positions, sizes = dp.chunk_plan(10)
    assert positions == [0, 2] and sizes == [7, 3]


class _Recorder:
    """Stands in for the CUDA parts of ``nn.DataParallel.forward`` on the CPU."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.chunks: list[list[int]] = []

    def scatter(
        self, devices: Sequence[int], sizes: Sequence[int], dim: int, t: torch.Tensor
    ) -> list[torch.Tensor]:
        self.chunks.append(list(sizes))
        return list(torch.split(t, list(sizes), dim=dim))

    def replicate(self, module: nn.Module, ids: Sequence[int]) -> list[Any]:
        self.calls.append(f"replicate {list(ids)}")
        return cpu_replicate(module, len(ids))  # like torch's: parameters from one node

    def parallel_apply(self, replicas: Sequence[nn.Module], inputs: Any, kwargs: Any) -> list[Any]:
        self.calls.append("apply")
        return [r(*i, **k) for r, i, k in zip(replicas, inputs, kwargs, strict=True)]

    def gather(self, outputs: Sequence[torch.Tensor], dev: int) -> Any:
        self.calls.append("gather")
        return torch.cat(list(outputs))


def test_forward_times_each_device_between_scatter_and_gather(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The real DataParallel.forward flow with its CUDA steps stubbed: the weighted scatter
    picks the devices, each replica's forward is marked in the call that runs it (after
    scatter and replicate, before gather: gather's cross-device copies make every device
    wait for the slowest), and its backward by hooks."""
    rec = _Recorder()
    monkeypatch.setattr("adaptive_nb.engine.weighted._torch_scatter", rec.scatter)
    monkeypatch.setattr(nn.DataParallel, "replicate", rec.replicate)
    monkeypatch.setattr(nn.DataParallel, "parallel_apply", rec.parallel_apply)
    monkeypatch.setattr(nn.DataParallel, "gather", rec.gather)
    torch.manual_seed(0)
    inner = nn.Linear(3, 2)
    dp = WeightedDataParallel(inner, [0, 1, 2])
    # what nn.DataParallel.__init__ sets up when CUDA is present
    dp.device_ids, dp.dim, dp.output_device = [0, 1, 2], 0, 0
    dp.src_device_obj = torch.device("cpu")
    dp.on_mark = lambda position, what: rec.calls.append(f"{what} {position}")
    x = torch.randn(10, 3)

    dp.set_plan([0.5, 0.0, 0.5])
    out = dp(x)
    torch.testing.assert_close(out, inner(x))
    assert rec.chunks[-1] == [5, 5]
    assert rec.calls == [
        "replicate [0, 2]",
        "apply",
        "forward_start 0",
        "forward_end 0",
        "forward_start 2",
        "forward_end 2",
        "gather",
        "gathered 0",
    ]
    assert dp.step_chunks == [5, 0, 5]
    rec.calls.clear()
    out.sum().backward()
    assert sorted(rec.calls) == [
        "backward_end 0",
        "backward_end 2",
        "backward_start 0",
        "backward_start 2",
    ]
    dp.remove_hooks()

    rec.calls.clear()
    dp.set_plan([1.0, 0.0, 0.0])  # one device: the module is called directly
    torch.testing.assert_close(dp(x), inner(x))
    assert rec.calls == ["forward_start 0", "forward_end 0", "gathered 0"]
    assert dp.device_ids == [0]
    dp.remove_hooks()


def _cpu_engine(ids: Sequence[int]) -> DataParallelEngine:
    # names given: the CUDA checks of __init__ are skipped (no clock needed here)
    return DataParallelEngine(ids, names=[f"GPU {d}" for d in ids])


def test_errors_of_the_users_code_are_not_device_failures() -> None:
    engine = _cpu_engine([0, 1])
    user_errors = [
        RuntimeError(
            "Caught RuntimeError in replica 1 on device 1.\nOriginal Traceback:\n"
            "RuntimeError: Expected all tensors to be on the same device, but found at least "
            "two devices, cuda:1 and cuda:0!"
        ),
        RuntimeError(
            "Expected all tensors to be on the same device, but found at least two devices, "
            "cuda:0 and cpu! (when checking argument for argument mat1)"
        ),
        RuntimeError(
            "Caught AcceleratorError in replica 1 on device 1.\nOriginal Traceback:\n"
            "torch.AcceleratorError: CUDA error: device-side assert triggered"
        ),
        ValueError("labels out of memory range on cuda:0"),
    ]
    for exc in user_errors:
        assert engine._translate(exc) is exc, exc

    broken = RuntimeError(
        "Caught AcceleratorError in replica 1 on device 1.\nOriginal Traceback:\n"
        "torch.AcceleratorError: CUDA error: unspecified launch failure"
    )
    failure = engine._translate(broken)
    assert isinstance(failure, DeviceFailure) and failure.device == 1
    oom = engine._translate(
        torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 1 has")
    )
    assert isinstance(oom, OutOfMemory) and oom.device == 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA message")
def test_engine_needs_cuda() -> None:
    with pytest.raises(UsageError, match="no CUDA device"):
        DataParallelEngine([0])


# -- on a GPU machine ------------------------------------------------------------------


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 4))


def _loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = batch
    return nn.functional.cross_entropy(model(x), y)


def _batch(n: int = 96) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 16, generator=g), torch.randint(0, 4, (n,), generator=g)


@pytest.mark.gpu
def test_weighted_scatter_and_gradient_equal_one_device() -> None:
    ids = list(range(torch.cuda.device_count()))
    ref = _model().cuda(0)
    x, y = (t.cuda(0) for t in _batch())
    _loss(ref, (x, y)).backward()
    dp_model = copy.deepcopy(ref)
    dp_model.zero_grad(set_to_none=True)
    engine = DataParallelEngine(ids)
    wrapped = engine.prepare(dp_model)
    seen: dict[int, int] = {}
    dp_model[0].register_forward_hook(
        lambda _m, inp, _o: seen.__setitem__(inp[0].device.index, inp[0].shape[0])
    )
    n = len(ids)
    shares = [0.6] + [0.4 / (n - 1)] * (n - 1) if n > 1 else [1.0]
    engine.apply_plan(Plan(tuple(ids), tuple(shares), 1, 96))
    out = engine.forward_backward(_loss, (x, y))
    assert out.samples == 96
    assert sum(seen.values()) == 96
    if n > 1:
        assert seen[0] == round(0.6 * 96)
    for a, b in zip(dp_model.parameters(), ref.parameters(), strict=True):
        assert a.grad is not None and b.grad is not None
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-5)
    assert wrapped is engine.wrapper


@pytest.mark.gpu
def test_micro_batches_on_gpu_give_the_same_gradient() -> None:
    ref = _model().cuda(0)
    x, y = (t.cuda(0) for t in _batch())
    _loss(ref, (x, y)).backward()
    model = copy.deepcopy(ref)
    model.zero_grad(set_to_none=True)
    engine = DataParallelEngine([0])
    engine.prepare(model)
    engine.apply_plan(Plan((0,), (1.0,), 3, 96))
    out = engine.forward_backward(_loss, (x, y))
    assert out.micro_batches == 3
    for a, b in zip(model.parameters(), ref.parameters(), strict=True):
        assert a.grad is not None and b.grad is not None
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-5)


@pytest.mark.gpu
def test_out_of_memory_on_a_real_device_is_recovered() -> None:
    engine = DataParallelEngine([0])
    model = _model()
    engine.prepare(model)
    x, y = (t.cuda(0) for t in _batch())
    total = torch.cuda.get_device_properties(0).total_memory

    def greedy(m: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        hog = torch.empty(int(total * 2) // 4, dtype=torch.float32, device="cuda:0")
        return _loss(m, batch) + hog[:1].sum() * 0

    with pytest.raises(OutOfMemory) as err:
        engine.forward_backward(greedy, (x, y))
    assert err.value.device == 0
    model.zero_grad(set_to_none=True)
    out = engine.forward_backward(_loss, (x, y))
    assert out.samples == 96 and torch.isfinite(out.loss)
    for _ in range(4):  # measurements arrive a step late, from CUDA events
        out = engine.forward_backward(_loss, (x, y))
    torch.cuda.synchronize()
    out = engine.forward_backward(_loss, (x, y))
    assert out.device_time_s and out.device_batch.get(0) == 96


def _plain_gpu_loop(model: nn.Module, opt: torch.optim.Optimizer, batches: list[Any]) -> None:
    for x, y in batches:
        opt.zero_grad(set_to_none=True)
        _loss(model, (x.cuda(0), y.cuda(0))).backward()
        opt.step()


def _batches(k: int = 6) -> list[tuple[torch.Tensor, torch.Tensor]]:
    x, y = _batch(96 * k)
    return [(x[i : i + 96], y[i : i + 96]) for i in range(0, 96 * k, 96)]


@pytest.mark.gpu
@pytest.mark.parametrize("policy", ["adaptive", "static"])
def test_train_on_gpu_0_equals_a_plain_loop(policy: str) -> None:
    data = _batches()
    ref = _model().cuda(0)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
    _plain_gpu_loop(ref, ref_opt, data)
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    report = adaptive_nb.train(
        _loss, model=model, optimizer=opt, data=data, devices="0", policy=policy
    )
    assert report.summary["steps"] == len(data) and report.summary["samples"] == 96 * len(data)
    assert report.summary["devices"] == [engine_name(0)]
    for a, b in zip(model.parameters(), ref.parameters(), strict=True):
        assert a.device == torch.device("cuda", 0)
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.gpu
def test_adam_state_from_a_cpu_run_follows_the_model_to_the_gpu() -> None:
    data = _batches()
    model = _model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    adaptive_nb.train(_loss, model=model, optimizer=opt, data=data[:2], devices="cpu")
    report = adaptive_nb.train(_loss, model=model, optimizer=opt, data=data[:2], devices="0")
    assert report.summary["steps"] == 2
    for p in model.parameters():
        assert opt.state[p]["exp_avg"].device == p.device == torch.device("cuda", 0)


def engine_name(index: int) -> str:
    return f"GPU {index} ({torch.cuda.get_device_name(index)})"


@pytest.mark.gpu
def test_out_of_memory_in_a_run_on_a_real_gpu_retries_the_same_batch() -> None:
    data = _batches()
    ref = _model().cuda(0)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
    _plain_gpu_loop(ref, ref_opt, data)
    total = torch.cuda.get_device_properties(0).total_memory
    calls = 0

    def greedy_once(m: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        nonlocal calls
        calls += 1
        loss = _loss(m, batch)
        if calls == 3:  # the third step's forward asks for twice the GPU's memory
            hog = torch.empty(int(total * 2) // 4, dtype=torch.float32, device="cuda:0")
            loss = loss + hog[:1].sum() * 0
        return loss

    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    report = adaptive_nb.train(greedy_once, model=model, optimizer=opt, data=data, devices="0")
    s = report.summary
    assert s["steps"] == len(data) and s["oom_recovered"] == 1 and s["ended"] == "completed"
    assert any(e.kind == "oom" for e in report.events)
    # the batch was retried (split into micro-batches), never skipped or applied twice
    for a, b in zip(model.parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.gpu
def test_a_users_cuda_mistake_reaches_the_user_unchanged() -> None:
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = [p.detach().cpu().clone() for p in model.parameters()]

    def wrong_device(m: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(m(x) + torch.ones(1, 4), y)  # CPU tensor

    with pytest.raises(RuntimeError, match="same device") as err:
        adaptive_nb.train(wrong_device, model=model, optimizer=opt, data=_batches(2), devices="0")
    assert not isinstance(err.value, DeviceFailure)
    run = adaptive_nb.last_run()
    assert run is not None and run.report is not None
    assert run.report.summary["steps"] == 0 and run.report.summary["device_failures"] == 0
    for a, b in zip(model.parameters(), before, strict=True):
        assert torch.equal(a.detach().cpu(), b)


@pytest.mark.gpu
@pytest.mark.skipif(
    torch.cuda.device_count() < 2, reason="an uneven split over GPUs needs two or more GPUs"
)
def test_uneven_shares_on_two_gpus_place_and_time_each_chunk() -> None:
    ref = _model().cuda(0)
    x, y = (t.cuda(0) for t in _batch())
    _loss(ref, (x, y)).backward()
    model = copy.deepcopy(ref)
    model.zero_grad(set_to_none=True)
    engine = DataParallelEngine([0, 1])
    engine.prepare(model)
    seen: dict[int, int] = {}
    model[0].register_forward_hook(
        lambda _m, inp, _o: seen.__setitem__(inp[0].device.index, inp[0].shape[0])
    )
    engine.apply_plan(Plan((0, 1), (0.75, 0.25), 1, 96))
    engine.forward_backward(_loss, (x, y))
    assert seen == {0: 72, 1: 24}
    for a, b in zip(model.parameters(), ref.parameters(), strict=True):
        assert a.grad is not None and b.grad is not None
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-5)
    for _ in range(3):
        model.zero_grad(set_to_none=True)
        engine.forward_backward(_loss, (x, y))
    torch.cuda.synchronize()
    out = engine.forward_backward(_loss, (x, y))
    assert out.device_batch == {0: 72, 1: 24}
    assert set(out.device_time_s) == {0, 1} and all(t > 0 for t in out.device_time_s.values())


@pytest.mark.gpu
def test_monitor_maps_the_training_gpu_by_uuid() -> None:
    from adaptive_nb.monitor import default_monitor

    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    adaptive_nb.train(_loss, model=model, optimizer=opt, data=_batches()[:2], devices="0")
    snap = default_monitor().sample_now()
    indices = {g.index for g in snap.gpus}
    assert 0 in indices, f"no NVML device mapped to torch index 0: {snap.gpus}"
    uuid0 = str(torch.cuda.get_device_properties(0).uuid).lower().removeprefix("gpu-")
    (gpu0,) = [g for g in snap.gpus if g.index == 0]
    assert gpu0.uuid.lower().removeprefix("gpu-") == uuid0
