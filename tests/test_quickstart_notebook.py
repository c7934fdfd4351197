"""The quickstart notebook runs headless (as `make demo` runs it) and shows a report."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parents[1]


def test_quickstart_runs_headless_and_reports(tmp_path: Path) -> None:
    subprocess.run(
        [
            sys.executable,
            str(ROOT / "examples" / "execute.py"),
            str(ROOT / "examples" / "quickstart.ipynb"),
            str(tmp_path),
        ],
        check=True,
        timeout=600,
    )
    nb = nbformat.read(tmp_path / "quickstart.ipynb", as_version=4)
    assert (tmp_path / "quickstart.html").stat().st_size > 10_000
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    text = "\n".join(o.get("text", "") for o in outputs)
    assert "adaptive_nb: CPU only:" in text or "adaptive_nb: " in text
    html = [o["data"]["text/html"] for o in outputs if "text/html" in o.get("data", {})]
    assert any("adaptive_nb run report" in h and "Throughput" in h for h in html)
    accuracy = [line for line in text.splitlines() if line.startswith("accuracy")]
    assert accuracy and float(accuracy[0].split(":")[1].strip().rstrip("%")) > 50
