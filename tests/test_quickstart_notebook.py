"""The quickstart notebook runs headless (as `make demo` runs it) and shows a report.

It runs on this interpreter's kernelspec, in a copy of ``examples/`` under the test's
temporary folder: its last cell writes ``../build/quickstart_report.json``, which must land
there, not in the checkout."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import nbformat
import torch
from conftest import NotebookKernel

from adaptive_nb import RunReport

ROOT = Path(__file__).resolve().parents[1]


def test_quickstart_runs_headless_and_reports(tmp_path: Path, nb_kernel: NotebookKernel) -> None:
    out, work = tmp_path / "out", tmp_path / "examples"
    subprocess.run(
        [
            sys.executable,
            str(ROOT / "examples" / "execute.py"),
            str(ROOT / "examples" / "quickstart.ipynb"),
            str(out),
            "--kernel",
            nb_kernel.name,
            "--workdir",
            str(work),
        ],
        check=True,
        timeout=600,
        env=nb_kernel.env(),
    )
    nb = nbformat.read(out / "quickstart.ipynb", as_version=4)
    assert (out / "quickstart.html").stat().st_size > 10_000
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    text = "\n".join(o.get("text", "") for o in outputs)
    # %load_ext describes the machine: the kernel is this interpreter, so it sees what we see
    if torch.cuda.is_available():
        machine = r"adaptive_nb: \d+ GPUs?: GPU \S+ .+ [\d.]+ GB \(\d+% busy"
    else:
        machine = r"adaptive_nb: CPU only: \d+ cores, [\d.]+ GB RAM"
    assert re.search(machine, text), text[:500]
    html = [o["data"]["text/html"] for o in outputs if "text/html" in o.get("data", {})]
    assert any("adaptive_nb run report" in h and "Throughput" in h for h in html)
    accuracy = [line for line in text.splitlines() if line.startswith("accuracy")]
    assert accuracy and float(accuracy[0].split(":")[1].strip().rstrip("%")) > 50
    # the exported report is the 3-epoch run's, written inside the temporary folder
    report = RunReport.from_json(tmp_path / "build" / "quickstart_report.json")
    assert report.summary["ended"] == "completed" and report.summary["steps"] == 3 * 48
    assert (tmp_path / "build" / "quickstart_timeline.csv").stat().st_size > 0
