"""GPU checks of training results (see ``gpu_check.py``): adaptive vs a plain loop and vs
``nn.DataParallel``, uneven replicas emulated on one GPU, real out-of-memory recoveries.
Shared helpers for the other check modules live here too."""

from __future__ import annotations

import copy
import time
from typing import Any

import torch
from torch import nn

Result = dict[str, Any]
BATCH = 256
IN, HID, OUT = 512, 1024, 10


# -- helpers ------------------------------------------------------------------------------


def _mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(IN, HID), nn.ReLU(), nn.Linear(HID, HID), nn.ReLU(), nn.Linear(HID, OUT)
    )


def _loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = batch
    return nn.functional.cross_entropy(model(x), y)


def _data(steps: int, batch: int = BATCH, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(batch, IN, generator=g), torch.randint(0, OUT, (batch,), generator=g))
        for _ in range(steps)
    ]


def _plain_loop(
    model: nn.Module, opt: torch.optim.Optimizer, data: list[Any], device: str = "cuda:0"
) -> float:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for x, y in data:
        opt.zero_grad(set_to_none=True)
        _loss(model, (x.to(device), y.to(device))).backward()
        opt.step()
    torch.cuda.synchronize()
    return time.perf_counter() - t0


def _max_diff(a: nn.Module, b: nn.Module) -> float:
    return max(
        float((p - q.to(p.device)).abs().max())
        for p, q in zip(a.parameters(), b.parameters(), strict=True)
    )


def _result(name: str, kind: str, what: str) -> Result:
    return {"name": name, "kind": kind, "what": what, "status": "passed", "measured": {}}


# -- checks -------------------------------------------------------------------------------


def check_adaptive_vs_plain_gpu0() -> Result:
    import adaptive_nb

    r = _result("adaptive_vs_plain_gpu0", "real", "adaptive_nb.train(devices='0') vs a loop")
    data = _data(40)
    warm = _mlp().cuda(0)
    _plain_loop(warm, torch.optim.SGD(warm.parameters(), lr=0.01), data[:5])  # kernels, cache
    ref = _mlp().cuda(0)
    plain_s = _plain_loop(ref, torch.optim.SGD(ref.parameters(), lr=0.05, momentum=0.9), data)
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    report = adaptive_nb.train(_loss, model=model, optimizer=opt, data=data, devices="0")
    torch.cuda.synchronize()
    adaptive_s = time.perf_counter() - t0
    diff = _max_diff(model, ref)
    samples = BATCH * len(data)
    r["measured"] = {
        "steps": report.summary["steps"],
        "plain_samples_per_s": samples / plain_s,
        "adaptive_samples_per_s": samples / adaptive_s,
        "adaptive_over_plain": plain_s / adaptive_s,
        "max_param_diff": diff,
    }
    if report.summary["steps"] != len(data) or diff > 1e-4:
        r["status"] = "failed"
    return r


def check_adaptive_vs_dataparallel() -> Result:
    n = torch.cuda.device_count()
    if n < 2:
        r = _result(
            "dataparallel_repeated_id",
            "emulated",
            "one GPU: does nn.DataParallel(device_ids=[0, 0]) run, with the right gradient?",
        )
        ref = _mlp().cuda(0)
        x, y = (t.cuda(0) for t in _data(1)[0])
        _loss(ref, (x, y)).backward()
        model = copy.deepcopy(ref)
        model.zero_grad(set_to_none=True)
        try:
            _loss(nn.DataParallel(model, device_ids=[0, 0]), (x, y)).backward()
        except Exception as exc:
            r["status"] = "info"
            r["measured"] = {"runs": False, "error": f"{type(exc).__name__}: {exc}"[:400]}
            return r
        diff = max(
            float((p.grad - q.grad).abs().max())  # type: ignore[operator]
            for p, q in zip(model.parameters(), ref.parameters(), strict=True)
        )
        r["measured"] = {"runs": True, "max_grad_diff": diff}
        r["status"] = "passed" if diff < 1e-4 else "failed"
        return r
    import adaptive_nb

    r = _result("adaptive_vs_dataparallel", "real", f"adaptive vs nn.DataParallel on {n} GPUs")
    data = _data(30, batch=BATCH * n)
    ref = _mlp().cuda(0)
    dp = nn.DataParallel(ref, device_ids=list(range(n)))
    dp_s = _plain_loop(dp, torch.optim.SGD(ref.parameters(), lr=0.05, momentum=0.9), data)
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    adaptive_nb.train(
        _loss, model=model, optimizer=opt, data=data, devices=",".join(map(str, range(n)))
    )
    torch.cuda.synchronize()
    adaptive_s = time.perf_counter() - t0
    diff = _max_diff(model, ref)
    samples = BATCH * n * len(data)
    r["measured"] = {
        "dataparallel_samples_per_s": samples / dp_s,
        "adaptive_samples_per_s": samples / adaptive_s,
        "adaptive_over_dataparallel": dp_s / adaptive_s,
        "max_param_diff": diff,
    }
    r["status"] = "passed" if diff < 1e-3 else "failed"
    return r


class _OwnLoss(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = _mlp()

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        logits = self.body(x)
        return {"loss": nn.functional.cross_entropy(logits, y), "logits": logits}


def _own_loss_step(m: nn.Module, b: Any) -> torch.Tensor:
    out: torch.Tensor = m(*b)["loss"]
    return out


def _uneven_case(k: int, own: bool, x: torch.Tensor, y: torch.Tensor) -> dict[str, Any]:
    """One emulated case: ``k`` replicas on GPU 0 with uneven shares, gradient vs one
    device."""
    from adaptive_nb.engine.dataparallel import DataParallelEngine
    from adaptive_nb.layout import Plan

    raw = [0.5, 0.3, 0.15, 0.05][:k]
    shares = tuple(s / sum(raw) for s in raw)
    ref: nn.Module = _OwnLoss().cuda(0) if own else _mlp().cuda(0)
    step = _own_loss_step if own else _loss
    step(ref, (x, y)).backward()  # type: ignore[no-untyped-call]
    model = copy.deepcopy(ref)
    model.zero_grad(set_to_none=True)
    engine = DataParallelEngine(
        [0] * k, min_chunk=1, names=[f"GPU 0 replica {i}" for i in range(k)]
    )
    engine.prepare(model)
    seen: list[int] = []
    first = model.body[0] if own else model[0]  # type: ignore[index]
    handle = first.register_forward_hook(lambda _m, i, _o: seen.append(i[0].shape[0]))
    engine.apply_plan(Plan(tuple(range(k)), shares, 1, x.shape[0]))
    engine.forward_backward(step, (x, y))
    handle.remove()
    diff = max(
        float((p.grad - q.grad).abs().max())  # type: ignore[operator]
        for p, q in zip(model.parameters(), ref.parameters(), strict=True)
    )
    return {"chunks": seen, "max_grad_diff": diff}


def check_uneven_replicas_on_one_gpu() -> Result:
    r = _result(
        "uneven_replicas_one_gpu",
        "emulated",
        "2-4 replicas on GPU 0 (device_ids=[0]*k): uneven scatter, gather, gradient equality",
    )
    x, y = (t.cuda(0) for t in _data(1, batch=100)[0])
    ok = True
    for k in (2, 3, 4):
        for own in (False, True):
            case = _uneven_case(k, own, x, y)
            r["measured"][f"{k}_replicas{'_own_loss' if own else ''}"] = case
            chunks = case["chunks"]
            ok = ok and case["max_grad_diff"] < 1e-4 and sum(chunks) == 100 and len(chunks) == k
    r["status"] = "passed" if ok else "failed"
    return r


def check_oom_recovery_in_a_run() -> Result:
    import adaptive_nb

    r = _result("oom_recovery_in_run", "real", "a step asks for 2x the GPU: batch retried")
    data = _data(6)
    ref = _mlp().cuda(0)
    _plain_loop(ref, torch.optim.SGD(ref.parameters(), lr=0.05, momentum=0.9), data)
    total = torch.cuda.get_device_properties(0).total_memory
    calls = 0

    def greedy(m: nn.Module, batch: Any) -> torch.Tensor:
        nonlocal calls
        calls += 1
        loss = _loss(m, batch)
        if calls == 3:
            hog = torch.empty(int(total * 2) // 4, dtype=torch.float32, device="cuda:0")
            loss = loss + hog[:1].sum() * 0
        return loss

    before = torch.cuda.memory_allocated(0)
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    report = adaptive_nb.train(greedy, model=model, optimizer=opt, data=data, devices="0")
    s = report.summary
    diff = _max_diff(model, ref)
    r["measured"] = {
        "steps": s["steps"],
        "oom_recovered": s["oom_recovered"],
        "ended": s["ended"],
        "max_param_diff": diff,
        "allocated_growth_mb": (torch.cuda.memory_allocated(0) - before) / 2**20,
    }
    ok = s["steps"] == len(data) and s["oom_recovered"] == 1 and diff < 1e-4
    r["status"] = "passed" if ok else "failed"
    return r


def check_oom_in_optimizer_step() -> Result:
    from adaptive_nb.run.attempt import apply_optimizer_step

    r = _result(
        "oom_in_optimizer_step",
        "real",
        "Adam's first step with memory filled so its state cannot fit; room made on retry",
    )
    torch.manual_seed(0)
    model = nn.Linear(4096, 4096).cuda(0)  # 64 MiB of weights
    model(torch.randn(64, 4096, device="cuda:0")).square().mean().backward()
    clean = copy.deepcopy(model)
    for p, q in zip(clean.parameters(), model.parameters(), strict=True):
        p.grad = q.grad.clone()  # type: ignore[union-attr]
    clean_opt = torch.optim.Adam(clean.parameters(), lr=1e-3)
    clean_opt.step()
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    fillers: list[torch.Tensor] = []
    torch.cuda.empty_cache()
    # fill the GPU until less than the weights' size is free: Adam's state (2x) cannot fit
    while (free := torch.cuda.mem_get_info(0)[0]) > param_bytes:
        block = 2**30 if free > 2**31 + param_bytes else 16 * 2**20
        try:
            fillers.append(torch.empty(block, dtype=torch.uint8, device="cuda:0"))
        except torch.cuda.OutOfMemoryError:
            break
    free_mb = torch.cuda.mem_get_info(0)[0] / 2**20
    heard: list[str] = []

    def make_room(err: Exception) -> None:
        heard.append(str(err))
        fillers.clear()
        torch.cuda.empty_cache()

    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    try:
        recovered = apply_optimizer_step(opt, on_oom=make_room)
    finally:
        fillers.clear()
        torch.cuda.empty_cache()
    exact = all(
        torch.equal(p, q) for p, q in zip(model.parameters(), clean.parameters(), strict=True)
    )
    r["measured"] = {
        "param_mb": param_bytes / 2**20,
        "free_mb_when_stepped": free_mb,
        "oom_recovered": recovered,
        "params_equal_clean_step": exact,
        "messages": heard,
    }
    if recovered == 0:
        r["status"] = "inconclusive"
        r["notes"] = ["the first step fitted: the filler left too much room"]
    elif not exact:
        r["status"] = "failed"
    return r
