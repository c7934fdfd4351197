"""Which notebook uses which GPU: kernel pids (and their children) → kernel id → notebook."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest
from conftest import NotebookKernel

from adaptive_nb.jupyter.server import KernelMap, ResourceSampler, ServerState
from adaptive_nb.monitor._fake_nvml import FakeGpu, FakeNvml

pytest_plugins = ["pytest_jupyter.jupyter_server"]


class FakeKernelManager:
    def __init__(self, kernels: dict[str, Any]) -> None:
        self.kernels = kernels

    def list_kernel_ids(self) -> list[str]:
        return list(self.kernels)

    def get_kernel(self, kid: str) -> Any:
        return self.kernels[kid]


class FakeSessions:
    def __init__(self, paths: dict[str, str]) -> None:
        self.paths = paths

    async def list_sessions(self) -> list[dict[str, Any]]:
        return [{"path": p, "kernel": {"id": k}} for k, p in self.paths.items()]


def kernel(pid: int | None = None, process_pid: int | None = None, conn: str = "") -> Any:
    process = SimpleNamespace(pid=process_pid) if process_pid is not None else None
    provisioner = SimpleNamespace(pid=pid, process=process)
    return SimpleNamespace(provisioner=provisioner, connection_file=conn)


@pytest.fixture
def sleeper() -> Iterator[Any]:
    """Start ``python -c sleep ... [extra args]`` children of this test process."""
    procs: list[subprocess.Popen[bytes]] = []

    def start(*args: str) -> subprocess.Popen[bytes]:
        p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", *args])
        procs.append(p)
        return p

    yield start
    for p in procs:
        p.kill()
        p.wait()


def test_kernel_pid_from_provisioner_pid_or_process() -> None:
    km = FakeKernelManager({"a": kernel(pid=111), "b": kernel(process_pid=222), "c": kernel()})
    assert KernelMap(km, None).kernel_pids() == {111: "a", 222: "b"}


def test_owner_is_the_kernel_itself_or_an_ancestor(sleeper: Any) -> None:
    me = os.getpid()  # plays the kernel
    child = sleeper()  # e.g. a data-loader worker started by the kernel
    km = FakeKernelManager({"k1": kernel(pid=me)})
    kmap = KernelMap(km, FakeSessions({"k1": "proj/train.ipynb"}))
    owners = asyncio.run(kmap.owners([me, child.pid, 1]))
    assert owners[me].kernel_id == "k1" and owners[me].notebook == "proj/train.ipynb"
    assert owners[child.pid].notebook == "proj/train.ipynb"
    assert 1 not in owners  # init is nobody's kernel


def test_owner_by_connection_file_when_provisioner_has_no_pid(sleeper: Any) -> None:
    conn = "/tmp/runtime/kernel-5f3c.json"
    proc = sleeper("-f", conn)
    km = FakeKernelManager({"5f3c": kernel(conn=conn), "other": kernel(conn="/x/kernel-9.json")})
    kmap = KernelMap(km, FakeSessions({"5f3c": "b.ipynb"}))
    owners = asyncio.run(kmap.owners([proc.pid]))
    assert owners[proc.pid].kernel_id == "5f3c" and owners[proc.pid].notebook == "b.ipynb"


def test_dead_or_unrelated_pids_have_no_owner(sleeper: Any) -> None:
    proc = sleeper()
    proc.kill()
    proc.wait()
    km = FakeKernelManager({"k": kernel(pid=os.getpid(), conn="/r/kernel-k.json")})
    assert asyncio.run(KernelMap(km, FakeSessions({})).owners([proc.pid, 1])) == {}


def test_broken_kernel_manager_maps_nothing() -> None:
    class Broken:
        def list_kernel_ids(self) -> list[str]:
            raise RuntimeError("gone")

    class BrokenSessions:
        async def list_sessions(self) -> list[dict[str, Any]]:
            raise RuntimeError("db locked")

    kmap = KernelMap(Broken(), BrokenSessions())
    assert asyncio.run(kmap.owners([os.getpid()])) == {}


# --- a real kernel of a real server, with fake GPUs --------------------------------------


@pytest.fixture
def jp_server_config() -> dict[str, Any]:
    return {"ServerApp": {"jpserver_extensions": {"adaptive_nb.jupyter.server": True}}}


async def test_gpu_process_of_a_running_kernel_names_its_notebook(
    nb_kernel: NotebookKernel, jp_fetch: Any, jp_serverapp: Any
) -> None:
    # nb_kernel first: its JUPYTER_PATH must be set before the server is created
    kernel = {"name": nb_kernel.name}
    body = json.dumps(
        {"path": "work/train.ipynb", "type": "notebook", "name": "", "kernel": kernel}
    )
    resp = await jp_fetch("api", "sessions", method="POST", body=body)
    session = json.loads(resp.body)
    kid = session["kernel"]["id"]
    try:
        km = jp_serverapp.kernel_manager
        kernel_pid = km.get_kernel(kid).provisioner.pid
        assert isinstance(kernel_pid, int)

        gpu = FakeGpu(name="H100", mem_total_mb=81920, util_pct=95.0)
        gpu.processes = [(kernel_pid, 30000.0), (4_000_001, 1000.0)]
        state: ServerState = jp_serverapp.web_app.settings["adaptive_nb"]
        state.sampler = ResourceSampler(nvml=FakeNvml([gpu, FakeGpu(name="H100")]))

        resp = await jp_fetch("adaptive-nb", "api", "resources")
        data = json.loads(resp.body)
        procs = data["gpus"][0]["processes"]
        assert procs[0] == {
            "pid": kernel_pid,
            "memory_mb": 30000.0,
            "kernel_id": kid,
            "notebook": "work/train.ipynb",
        }
        assert procs[1]["notebook"] is None and procs[1]["kernel_id"] is None
        assert data["gpus"][1]["processes"] == []

        # runs in that kernel are named by the server's session, whatever the file says
        from adaptive_nb.jupyter.run_status import status_path

        path = status_path(jp_serverapp.runtime_dir, kid, kernel_pid)
        path.write_text(
            json.dumps({"kernel_id": kid, "pid": os.getpid(), "notebook": None, "started": 1.0})
        )
        runs = json.loads((await jp_fetch("adaptive-nb", "api", "runs")).body)["runs"]
        assert runs[0]["notebook"] == "work/train.ipynb"
    finally:
        await jp_fetch("api", "sessions", session["id"], method="DELETE")
