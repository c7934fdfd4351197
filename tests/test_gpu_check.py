"""``make gpu-check`` on a machine without Jupyter: the gpu-marked test files and the check
script import only the core, and without CUDA the script says so and exits 0."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GPU_TEST_FILES = sorted(
    p for p in (ROOT / "tests").glob("test_*.py") if "pytest.mark.gpu" in p.read_text()
)

# Refuse the notebook stack as a GPU host without it would (ModuleNotFoundError).
_BLOCK = """
import importlib.abc, sys
BLOCKED = ("IPython", "ipywidgets", "ipykernel", "nbformat", "nbclient", "jupyter_server",
           "jupyter_client", "jupyterlab", "traitlets", "matplotlib", "playwright")
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {name!r} (blocked: not on a GPU host)")
        return None
sys.meta_path.insert(0, Block())
"""


def _python(code: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", _BLOCK + code, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
    )


def test_gpu_test_files_and_the_check_import_only_the_core() -> None:
    assert any(p.name == "test_dataparallel.py" for p in GPU_TEST_FILES)
    code = """
import importlib.util, sys
sys.path.insert(0, "tests"); sys.path.insert(0, "benchmarks")
for path in sys.argv[1:]:
    spec = importlib.util.spec_from_file_location(path.rsplit("/", 1)[-1][:-3], path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
print("imported", len(sys.argv) - 1)
"""
    files = [str(p.relative_to(ROOT)) for p in GPU_TEST_FILES] + ["benchmarks/gpu_check.py"]
    done = _python(code, *files)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"imported {len(files)}" in done.stdout
    blocked = _python("import adaptive_nb.jupyter.magics")  # the blocker does block
    assert blocked.returncode != 0 and "blocked" in blocked.stderr


def _junit(path: Path, failures: int) -> Path:
    failed = '<testcase classname="tests.test_x" name="test_y"><failure/></testcase>'
    path.write_text(
        f'<testsuites><testsuite tests="3" failures="{failures}" errors="0" skipped="2">'
        f'<testcase classname="tests.test_x" name="test_ok"/>{failed if failures else ""}'
        "</testsuite></testsuites>"
    )
    return path


def test_without_cuda_the_check_reports_skipped_and_exits_0(tmp_path: Path) -> None:
    code = "import runpy, sys; sys.argv = ['gpu_check.py', *sys.argv[1:]]; " + (
        "runpy.run_path('benchmarks/gpu_check.py', run_name='__main__')"
    )
    junit = _junit(tmp_path / "pytest.xml", failures=0)
    done = _python(code, "--out", str(tmp_path / "out"), "--junit", str(junit))
    assert done.returncode == 0, done.stderr[-3000:]
    summary = (tmp_path / "out" / "summary.txt").read_text()
    assert "no CUDA device: skipped" in summary
    assert "gpu tests: 3 collected, 0 failed" in summary
    data = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    assert data["overall"] == "no CUDA device: skipped" and data["checks"] == []

    failing = _junit(tmp_path / "failing.xml", failures=1)
    done = _python(code, "--out", str(tmp_path / "out2"), "--junit", str(failing))
    assert done.returncode == 1
    assert "FAILED tests.test_x::test_y" in (tmp_path / "out2" / "summary.txt").read_text()

    done = _python(code, "--out", str(tmp_path / "out3"), "--junit", str(tmp_path / "none.xml"))
    assert done.returncode == 1  # pytest left no results: that is not a pass
