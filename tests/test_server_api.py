"""Server extension API: authentication, JSON shapes, cached sampling, runs listing."""

from __future__ import annotations

import json
import os
from typing import Any

import pytest
from tornado.httpclient import HTTPClientError

from adaptive_nb.jupyter.run_status import RunStatusPublisher, status_path
from adaptive_nb.jupyter.server import ResourceSampler, ServerState
from adaptive_nb.monitor._fake_nvml import FakeGpu, FakeNvml

pytest_plugins = ["pytest_jupyter.jupyter_server"]

ENDPOINTS = ("resources", "runs")


@pytest.fixture
def jp_server_config() -> dict[str, Any]:
    return {"ServerApp": {"jpserver_extensions": {"adaptive_nb.jupyter.server": True}}}


@pytest.fixture
def state(jp_serverapp: Any) -> ServerState:
    s: ServerState = jp_serverapp.web_app.settings["adaptive_nb"]
    return s


@pytest.fixture
def fake_gpus(state: ServerState) -> FakeNvml:
    nvml = FakeNvml(
        [
            FakeGpu(name="A100", mem_total_mb=40960, util_pct=87.0, processes=[(999_999, 2048.0)]),
            FakeGpu(name="A100", mem_total_mb=40960, util_pct=0.0),
        ]
    )
    state.sampler = ResourceSampler(nvml=nvml)
    return nvml


async def get_json(jp_fetch: Any, endpoint: str) -> dict[str, Any]:
    response = await jp_fetch("adaptive-nb", "api", endpoint)
    assert response.code == 200
    assert response.headers["Content-Type"].startswith("application/json")
    data: dict[str, Any] = json.loads(response.body)
    return data


@pytest.mark.parametrize("endpoint", ENDPOINTS)
@pytest.mark.parametrize("auth", ["", "token not-the-token"])
async def test_requests_without_valid_token_are_refused(
    jp_fetch: Any, endpoint: str, auth: str
) -> None:
    with pytest.raises(HTTPClientError) as err:
        await jp_fetch("adaptive-nb", "api", endpoint, headers={"Authorization": auth})
    assert err.value.code in (401, 403)


@pytest.mark.parametrize("endpoint", ENDPOINTS)
async def test_post_is_not_allowed(jp_fetch: Any, endpoint: str) -> None:
    with pytest.raises(HTTPClientError) as err:
        await jp_fetch("adaptive-nb", "api", endpoint, method="POST", body="{}")
    assert err.value.code == 405


async def test_resources_without_gpu_reports_cpu_ram_and_notice(
    jp_fetch: Any, state: ServerState
) -> None:
    state.sampler = ResourceSampler(nvml=FakeNvml.no_driver())
    data = await get_json(jp_fetch, "resources")
    assert data["gpus"] == [] and data["gpu_available"] is False
    assert "No NVIDIA GPU driver found" in data["notice"]
    assert set(data["cpu"]) == {"percent", "per_core_percent", "cores"}
    assert 0.0 <= data["cpu"]["percent"] <= 100.0 and data["cpu"]["cores"] > 0
    mem = data["memory"]
    assert 0 < mem["used_mb"] < mem["total_mb"]
    assert mem["percent"] == pytest.approx(100 * mem["used_mb"] / mem["total_mb"], abs=0.1)


async def test_resources_with_gpus_shape(jp_fetch: Any, fake_gpus: FakeNvml) -> None:
    data = await get_json(jp_fetch, "resources")
    assert data["gpu_available"] is True and data["notice"] is None
    g0, g1 = data["gpus"]
    assert g0["index"] == 0 and g1["index"] == 1
    assert g0["name"] == "A100" and g0["simulated"] is True
    assert g0["utilisation_pct"] == 87.0
    assert g0["memory_used_mb"] == 2048.0 and g0["memory_total_mb"] == 40960.0
    # an unknown process: pid and memory only, no owner, nothing else about it
    assert g0["processes"] == [
        {"pid": 999_999, "memory_mb": 2048.0, "kernel_id": None, "notebook": None}
    ]
    assert g1["processes"] == []


async def test_resources_are_sampled_once_per_max_age(
    jp_fetch: Any, state: ServerState, fake_gpus: FakeNvml
) -> None:
    state.sampler.max_age_s = 60.0
    await get_json(jp_fetch, "resources")
    reads_after_one_sample = fake_gpus.reads
    assert reads_after_one_sample > 0
    for _ in range(4):
        await get_json(jp_fetch, "resources")
    assert state.sampler.samples_taken == 1
    assert fake_gpus.reads == reads_after_one_sample  # served from the cached sample
    monitor = state.sampler.monitor
    state.sampler.max_age_s = 0.0
    for _ in range(3):
        await get_json(jp_fetch, "resources")
    assert state.sampler.samples_taken == 4
    assert state.sampler.monitor is monitor  # one NVML session for the server's life
    assert fake_gpus.reads > reads_after_one_sample


async def test_default_sampler_is_created_once(jp_fetch: Any, state: ServerState) -> None:
    await get_json(jp_fetch, "resources")
    monitor = state.sampler.monitor
    await get_json(jp_fetch, "resources")
    assert state.sampler.monitor is monitor
    assert not monitor.running  # samples on demand; no thread while nobody looks


async def test_runs_lists_active_runs_and_cleans_dead_ones(
    jp_fetch: Any, jp_serverapp: Any
) -> None:
    runtime = jp_serverapp.runtime_dir
    assert (await get_json(jp_fetch, "runs")) == {"runs": []}

    from adaptive_nb.events import RunInfo

    pub = RunStatusPublisher(kernel_id="k-live", notebook="a/b.ipynb", directory=runtime)
    pub.on_start(
        RunInfo(
            run_id="r",
            total_steps=400,
            epochs=None,
            policy="weights",
            devices=["sim GPU 0", "sim GPU 1"],
            simulated=True,
            global_batch=128,
            started_at=1_700_000_000.0,
        )
    )
    dead = status_path(runtime, "k-dead", 0)
    dead.write_text(json.dumps({"pid": 2**22 + 12345, "kernel_id": "k-dead", "started": 1.0}))

    runs = (await get_json(jp_fetch, "runs"))["runs"]
    assert [r["kernel_id"] for r in runs] == ["k-live"]
    run = runs[0]
    assert run["notebook"] == "a/b.ipynb" and run["simulated"] is True
    assert run["step"] == 0 and run["total_steps"] == 400 and run["policy"] == "weights"
    assert run["pid"] == os.getpid() and run["started"] == 1_700_000_000.0
    assert not dead.exists()

    pub.close()
    assert (await get_json(jp_fetch, "runs")) == {"runs": []}
