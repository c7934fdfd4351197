"""Execute a notebook headless (nbclient) and write the executed notebook and an HTML copy.

Usage: python examples/execute.py NOTEBOOK.ipynb OUTDIR [--timeout SECONDS]
                                  [--kernel NAME] [--workdir DIR]

The kernel runs in the notebook's own folder (its relative paths, e.g. a scenario file or
``../build``, resolve as when opened in Jupyter) unless ``--workdir`` is given: then that
folder's files are copied into DIR and the kernel runs there, so nothing is written next to
the notebook (tests use this to keep the checkout clean).
"""

from __future__ import annotations

import argparse
import shutil
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
    parser.add_argument("--kernel", default="python3", help="kernelspec name (python3)")
    parser.add_argument(
        "--workdir", type=Path, default=None, help="run in a copy of the notebook's folder here"
    )
    args = parser.parse_args(argv)

    nb = nbformat.read(args.notebook, as_version=4)
    cwd = args.notebook.parent
    if args.workdir is not None:
        shutil.copytree(
            cwd,
            args.workdir,
            dirs_exist_ok=True,
            ignore=shutil.ignore_patterns("__pycache__", ".ipynb_checkpoints"),
        )
        cwd = args.workdir
    client = NotebookClient(
        nb,
        timeout=args.timeout,
        kernel_name=args.kernel,
        resources={"metadata": {"path": str(cwd)}},
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
