"""GPU checks of measurements (see ``gpu_check.py``): event-timed forward/backward vs
``torch.profiler``, own memory (allocator vs NVML), adaptation to an emulated slow replica."""

from __future__ import annotations

import os
from typing import Any

import torch
from gpu_check_training import Result, _data, _loss, _mlp, _result


def _profiler_device_s(prof: Any) -> float:
    """Seconds of device activity (kernels, copies, sets) the profiler recorded: each
    device event counted once (CPU ops' "self device time" would count kernels twice)."""
    total_us = 0.0
    for ev in prof.events():
        if getattr(ev, "device_type", None) == torch.autograd.DeviceType.CUDA:
            total_us += float(ev.time_range.elapsed_us())
    return total_us / 1e6


def _timing_case(frozen: bool) -> dict[str, Any]:
    """Engine phases vs profiler kernel time for the MLP (first layer frozen or not)."""
    from torch.profiler import ProfilerActivity, profile

    from adaptive_nb.engine.dataparallel import DataParallelEngine
    from adaptive_nb.layout import Plan

    model = _mlp()
    if frozen:  # no weight gradients for the first layer: backward well under 2x forward
        for p in model[0].parameters():  # type: ignore[index]
            p.requires_grad_(False)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01)
    engine = DataParallelEngine([0])
    engine.prepare(model)
    engine.apply_plan(Plan((0,), (1.0,), 1, 2048))
    batches = [(x.cuda(0), y.cuda(0)) for x, y in _data(30, batch=2048)]

    def one(batch: Any) -> Any:
        opt.zero_grad(set_to_none=True)
        o = engine.forward_backward(_loss, batch)
        engine.timed_update(opt.step)()
        return o

    for b in batches[:10]:
        one(b)
    torch.cuda.synchronize()
    outcomes = []
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for b in batches[10:]:
            outcomes.append(one(b))
        torch.cuda.synchronize()
    outcomes.append(one(batches[0]))  # reads the last profiled step
    measured = [o for o in outcomes[1:] if o.device_phase_s]
    n = len(measured)
    phases = {
        k: sum(o.device_phase_s[0].get(k, 0.0) for o in measured) / max(n, 1)
        for k in ("forward", "backward", "loss", "optimizer")
    }
    engine_step = sum(phases.values())
    prof_step = _profiler_device_s(prof) / len(batches[10:])
    return {
        "steps_compared": n,
        "engine_phase_ms": {k: v * 1e3 for k, v in phases.items()},
        "engine_step_ms": engine_step * 1e3,
        "profiler_kernel_ms_per_step": prof_step * 1e3,
        "engine_over_profiler": engine_step / prof_step if prof_step else None,
        "backward_over_forward": phases["backward"] / phases["forward"]
        if phases["forward"]
        else None,
    }


def check_backward_timing_vs_profiler() -> Result:
    r = _result(
        "backward_timing_vs_profiler",
        "real",
        "engine's event-timed forward+backward+loss+optimizer vs torch.profiler kernel time",
    )
    ok = True
    for label, frozen in (("mlp", False), ("mlp_first_layer_frozen", True)):
        case = _timing_case(frozen)
        r["measured"][label] = case
        ratio = case["engine_over_profiler"]
        ok = ok and case["steps_compared"] >= 5 and ratio is not None and 0.5 < ratio < 3.0
    r["notes"] = [
        "events include idle gaps between kernels on the stream, the profiler sums kernel "
        "time only: engine >= profiler is expected, by the launch gaps"
    ]
    r["status"] = "passed" if ok else "failed"
    return r


def check_own_memory() -> Result:
    r = _result("own_memory", "real", "CUDA allocator reserved vs NVML's figure for this PID")
    hold = torch.empty(512 * 2**20, dtype=torch.uint8, device="cuda:0")
    reserved = torch.cuda.memory_reserved(0) / 2**20
    m: dict[str, Any] = {"allocator_reserved_mb": reserved}
    try:
        import pynvml

        pynvml.nvmlInit()
        uuid = str(torch.cuda.get_device_properties(0).uuid).lower().removeprefix("gpu-")
        handle = None
        for i in range(pynvml.nvmlDeviceGetCount()):
            h = pynvml.nvmlDeviceGetHandleByIndex(i)
            u = pynvml.nvmlDeviceGetUUID(h)
            u = (u.decode() if isinstance(u, bytes) else u).lower().removeprefix("gpu-")
            if u == uuid:
                handle = h
        if handle is None:
            handle = pynvml.nvmlDeviceGetHandleByIndex(0)
            m["note"] = "no NVML device with torch's UUID: used NVML index 0"
        procs = pynvml.nvmlDeviceGetComputeRunningProcesses(handle)
        mine = [p for p in procs if p.pid == os.getpid()]
        used = mine[0].usedGpuMemory if mine else None
        m["nvml_process_mb"] = used / 2**20 if used is not None else None
        m["nvml_device_used_mb"] = pynvml.nvmlDeviceGetMemoryInfo(handle).used / 2**20
        if used is None:
            m["note"] = "NVML lists no process with our PID (a PID namespace hides it)"
            r["status"] = "info"
        else:
            m["context_and_other_mb"] = used / 2**20 - reserved
            r["status"] = "passed" if used / 2**20 >= reserved else "failed"
    except Exception as exc:
        m["nvml_error"] = f"{type(exc).__name__}: {exc}"
        r["status"] = "info"
    del hold
    r["measured"] = m
    return r


def check_adaptation_emulated() -> Result:
    from adaptive_nb.engine import weighted
    from adaptive_nb.engine.dataparallel import DataParallelEngine
    from adaptive_nb.plan.allocation import AllocationController
    from adaptive_nb.run.loop import Run

    r = _result(
        "adaptation_emulated",
        "emulated",
        "3 replicas on GPU 0; replica 2 slowed by torch.cuda._sleep per sample: share falls",
    )
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    torch.cuda._sleep(10_000_000)
    end.record()
    torch.cuda.synchronize()
    cycles_per_ms = 10_000_000 / max(start.elapsed_time(end), 1e-3)
    per_sample_ms = 0.2
    slow = 2
    original = weighted._TimedReplica.run

    def slowed(self: Any, *inputs: Any, **kwargs: Any) -> Any:
        """Inside the replica's forward bracket: a GPU sleep proportional to its chunk."""
        if self.position == slow:
            n = inputs[0].shape[0] if inputs and isinstance(inputs[0], torch.Tensor) else 1
            torch.cuda._sleep(int(cycles_per_ms * per_sample_ms * n))
        return original(self, *inputs, **kwargs)

    names = [f"GPU 0 replica {i}" for i in range(3)]
    engine = DataParallelEngine([0, 0, 0], min_chunk=1, names=names)
    controller = AllocationController(
        engine, policy="adaptive", control_interval=0.25, snapshots=None
    )
    model = _mlp()
    run = Run(
        _loss,
        model=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.01),
        data=_data(200),
        epochs=None,
        steps=200,
        engine=engine,
        controller=controller,
        snapshots=None,
        policy="adaptive",
        headroom=0.1,
        control_interval=0.25,
        handle_interrupt=False,
    )
    weighted._TimedReplica.run = slowed  # type: ignore[method-assign]
    try:
        report = run.execute()
    finally:
        weighted._TimedReplica.run = original  # type: ignore[method-assign]
    shares = [round(t.shares.get(names[slow], 0.0), 4) for t in report.timeline]
    fell = next((i for i, s in enumerate(shares) if s < 0.2), None)
    r["measured"] = {
        "injected_ms_per_sample": per_sample_ms,
        "slow_replica_share_by_tick": shares,
        "first_tick_below_0.2": fell,
        "steps": report.summary["steps"],
    }
    r["status"] = "passed" if fell is not None and fell <= 6 else "failed"
    return r
