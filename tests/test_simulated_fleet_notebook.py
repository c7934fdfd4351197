"""The simulated-fleet example runs headless on CPU and shows the controller at work (on
this interpreter's kernelspec, in a copy of ``examples/`` under the temporary folder)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import nbformat
from conftest import NotebookKernel

ROOT = Path(__file__).resolve().parents[1]


def test_simulated_fleet_notebook(tmp_path: Path, nb_kernel: NotebookKernel) -> None:
    out = tmp_path / "out"
    subprocess.run(
        [
            sys.executable,
            str(ROOT / "examples" / "execute.py"),
            str(ROOT / "examples" / "simulated_fleet.ipynb"),
            str(out),
            "--kernel",
            nb_kernel.name,
            "--workdir",
            str(tmp_path / "examples"),
        ],
        check=True,
        timeout=600,
        env=nb_kernel.env(),
    )
    nb = nbformat.read(out / "simulated_fleet.ipynb", as_version=4)
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    text = "\n".join(o.get("text", "") for o in outputs)
    assert "(simulated)" in text
    # the other job on GPU 2 is seen and its share drops
    drop = r"sim GPU 2 \(RTX 3090\): external job at [67]\d% → share 0\.\d+ → 0\.0\d"
    assert re.search(drop, text)
    speed = re.search(r"simulated throughput\s+adaptive (\d+) samples/s\s+static (\d+)", text)
    assert speed and int(speed.group(1)) > 1.15 * int(speed.group(2))
    ratio = re.search(r"adaptive / oracle = ([\d.]+)", text)
    assert ratio and float(ratio.group(1)) >= 0.95
