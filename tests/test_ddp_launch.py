"""DDP engine, starting and ending the rank processes: a normal close, a failed start
(port in use, a rank that cannot start, a job the ranks cannot import, an object that
cannot be pickled) and a rank killed mid-run all end with a clear error and no child
process alive; the ranks also exit when the kernel process itself dies."""

from __future__ import annotations

import io
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import psutil
import pytest
import torch
import torch.nn.functional as F
from ddp_support import group_of, reference_steps, worker_children
from torch import nn

from adaptive_nb.engine.ddp import DDPEngine, DDPStartError, WorkerGroup, WorkerLost, launcher
from adaptive_nb.errors import UsageError

pytestmark = pytest.mark.timeout(300)


def regress(model: nn.Module, batch: Any) -> torch.Tensor:
    x, y = batch
    return F.mse_loss(model(x), y)


def net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1))


def data(n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(5)
    return [(torch.randn(6, 3, generator=g), torch.randn(6, 1, generator=g)) for _ in range(n)]


def test_a_normal_run_and_close_leave_no_process() -> None:
    assert worker_children() == []
    batches = data(3)
    model = net()
    engine = DDPEngine(
        regress,
        model=model,
        optimizer=torch.optim.SGD(model.parameters(), 0.1),
        data=batches,
        world_size=2,
        threads=1,
    )
    engine.prepare(model)
    pids = engine.group.pids
    assert len(worker_children()) == 2
    for token in engine.iter_batches(batches, 1):
        engine.forward_backward(None, token)
        engine.optimizer_step()
    engine.close()
    assert worker_children() == []
    assert not any(
        psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE for p in pids
    )
    assert engine.device_names() == ["rank 0 (cpu)", "rank 1 (cpu)"]


def test_port_in_use_is_a_clear_error_and_leaves_no_process() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        group = WorkerGroup(2, threads=1, master_port=port, start_timeout_s=60)
        with pytest.raises(DDPStartError, match=f"Port {port} is in use"):
            group.start()
    assert worker_children() == []


def test_a_rank_that_cannot_start_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(launcher, "_WORKER_MODULE", "adaptive_nb.engine.ddp.no_such_worker")
    with pytest.raises(DDPStartError, match="No module named"):
        WorkerGroup(2, threads=1, start_timeout_s=60).start()
    assert worker_children() == []


def test_a_job_the_ranks_cannot_import_is_a_clear_error(tmp_path: Path) -> None:
    with group_of(2) as group:
        # a module the kernel can import only after the ranks started
        (tmp_path / "late_module.py").write_text(
            textwrap.dedent("""
            import torch.nn.functional as F
            def late_step(model, batch):
                return F.mse_loss(model(batch[0]), batch[1])
        """)
        )
        sys.path.insert(0, str(tmp_path))
        try:
            from late_module import late_step  # type: ignore[import-not-found]
        finally:
            sys.path.remove(str(tmp_path))
        model = net()
        engine = DDPEngine(
            late_step,
            model=model,
            data=data(1),
            group=group,
            optimizer=torch.optim.SGD(model.parameters(), 0.1),
        )
        with pytest.raises(DDPStartError, match=r"could not load the job.*late_module"):
            engine.start()
        # the group is still usable for a job it can load
        engine = DDPEngine(
            regress,
            model=model,
            data=data(1),
            group=group,
            optimizer=torch.optim.SGD(model.parameters(), 0.1),
        )
        engine.start()
        engine.close()
        assert len(group.alive()) == 2
    assert worker_children() == []


def test_what_cannot_be_pickled_is_named_before_anything_starts() -> None:
    log = io.StringIO()  # pickles; an open file does not
    with open(os.devnull, "w") as handle:

        def step(model: nn.Module, batch: Any) -> torch.Tensor:
            handle.write("step\n")
            return regress(model, batch)

        model = net()
        engine = DDPEngine(
            step,
            model=model,
            data=data(1),
            world_size=2,
            optimizer=torch.optim.SGD(model.parameters(), 0.1),
        )
        with pytest.raises(UsageError) as info:
            engine.start()
    message = str(info.value)
    assert "`step` → captured variable `handle` (an open file: TextIOWrapper)" in message
    assert "open the file inside the step" in message
    assert worker_children() == [] and not engine.group.procs

    model = net()
    model.guard = threading.Lock()  # type: ignore[assignment]
    engine = DDPEngine(
        regress,
        model=model,
        data=data(1),
        world_size=2,
        optimizer=torch.optim.SGD(model.parameters(), 0.1),
    )
    with pytest.raises(UsageError, match=r"`model` → \.guard \(a lock"):
        engine.start()
    assert worker_children() == [] and log.getvalue() == ""


@pytest.mark.parametrize("victim", [1, 0])
def test_a_killed_rank_ends_the_run_with_the_last_completed_step_and_no_orphans(
    victim: int,
) -> None:
    batches = data(4)
    ref = net()
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    reference_steps(regress, ref, ref_opt, batches[:2])

    model = net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    engine = DDPEngine(
        regress, model=model, optimizer=optimizer, data=batches, world_size=2, threads=1
    )
    engine.start()
    tokens = list(engine.iter_batches(batches, 1))
    for token in tokens[:2]:
        engine.forward_backward(None, token)
        engine.optimizer_step()
    os.kill(engine.group.pids[victim], signal.SIGKILL)
    with pytest.raises(WorkerLost) as info:
        for token in tokens[2:]:
            engine.forward_backward(None, token)
            engine.optimizer_step()
    assert info.value.device == victim
    engine.close()  # the loop closes the engine after the error: harmless now
    assert worker_children() == []
    assert engine.recovered_from == 1 - victim  # the survivor had every applied update
    for p, q in zip(model.parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_ranks_exit_when_the_kernel_process_dies(tmp_path: Path) -> None:
    script = tmp_path / "kernel.py"
    script.write_text(
        textwrap.dedent("""
        import sys, time
        from adaptive_nb.engine.ddp import WorkerGroup
        group = WorkerGroup(2, threads=1).start()
        print(" ".join(map(str, group.pids)), flush=True)
        time.sleep(600)
    """)
    )
    kernel = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    try:
        assert kernel.stdout is not None
        pids = [int(p) for p in kernel.stdout.readline().split()]
        assert len(pids) == 2 and all(psutil.pid_exists(p) for p in pids)
        kernel.kill()  # SIGKILL: no finaliser runs in the kernel
        kernel.wait()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and any(_running(p) for p in pids):
            time.sleep(0.1)
        assert not any(_running(p) for p in pids)
    finally:
        kernel.kill()
        for p in pids if "pids" in locals() else []:
            if _running(p):
                os.kill(p, signal.SIGKILL)
        for logs in Path(tempfile.gettempdir()).glob(f"adaptive_nb_ddp_{kernel.pid}_*"):
            shutil.rmtree(logs, ignore_errors=True)  # a killed kernel cannot remove them


def _running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
