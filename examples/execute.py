"""Execute a notebook headless (nbclient) and write the executed notebook and an HTML copy.

Usage: python examples/execute.py NOTEBOOK.ipynb OUTDIR [--timeout SECONDS]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient
from nbconvert import HTMLExporter


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("notebook", type=Path)
    parser.add_argument("outdir", type=Path)
    parser.add_argument("--timeout", type=int, default=600, help="per-cell timeout (s)")
    args = parser.parse_args(argv)

    nb = nbformat.read(args.notebook, as_version=4)
    client = NotebookClient(
        nb,
        timeout=args.timeout,
        kernel_name="python3",
        resources={"metadata": {"path": str(args.notebook.parent)}},
        store_widget_state=True,
    )
    t0 = time.perf_counter()
    client.execute()
    elapsed = time.perf_counter() - t0
    args.outdir.mkdir(parents=True, exist_ok=True)
    out_nb = args.outdir / args.notebook.name
    nbformat.write(nb, out_nb)
    body, _ = HTMLExporter().from_notebook_node(nb)
    out_html = out_nb.with_suffix(".html")
    out_html.write_text(body, encoding="utf-8")
    print(f"executed {args.notebook} in {elapsed:.1f} s → {out_nb}, {out_html}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
