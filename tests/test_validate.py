"""Device specs: auto, cpu, GPU lists, simulated scenarios."""

from __future__ import annotations

from pathlib import Path

import pytest

from adaptive_nb.errors import UsageError
from adaptive_nb.run.validate import DeviceSpec, parse_devices


def test_auto_means_all_gpus_or_cpu() -> None:
    assert parse_devices("auto", cuda_count=0) == DeviceSpec("cpu")
    assert parse_devices("auto", cuda_count=3) == DeviceSpec("gpu", (0, 1, 2))
    assert parse_devices(None, cuda_count=2) == DeviceSpec("gpu", (0, 1))


def test_gpu_lists() -> None:
    assert parse_devices("0,2", cuda_count=4) == DeviceSpec("gpu", (0, 2))
    assert parse_devices("cuda:1", cuda_count=2) == DeviceSpec("gpu", (1,))
    assert parse_devices([3, 1], cuda_count=4) == DeviceSpec("gpu", (3, 1))
    assert parse_devices(" CPU ", cuda_count=4) == DeviceSpec("cpu")


@pytest.mark.parametrize(
    ("spec", "count", "message"),
    [
        ("4", 4, "GPU 4 does not exist: this kernel sees GPUs 0–3"),
        ("1", 1, "sees GPU 0"),
        ("0", 0, "sees no CUDA GPU"),
        ("0,0", 2, "twice"),
        ("", 2, "names no GPU"),
        ("fast", 2, "not understood"),
        ("sim:", 2, "needs a scenario file"),
    ],
)
def test_bad_specs_explain_themselves(spec: str, count: int, message: str) -> None:
    with pytest.raises(UsageError, match=message):
        parse_devices(spec, cuda_count=count)


def test_sim_needs_an_existing_file(tmp_path: Path) -> None:
    f = tmp_path / "fleet.json"
    with pytest.raises(UsageError, match="no scenario file"):
        parse_devices(f"sim:{f}", cuda_count=0)
    f.write_text("{}")
    assert parse_devices(f"sim:{f}", cuda_count=0) == DeviceSpec("sim", sim_path=str(f))
