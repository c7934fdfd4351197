"""What the live dashboard costs: ``%%adaptive_train`` with the dashboard vs ``--no-widget``.

Same model, data and steps (CPU, ≥ 20 ms per step), alternating runs, medians of the
wall time per step. By default the measurement runs inside a real Jupyter kernel (via
nbclient), so every widget update is serialized and sent over the kernel's IOPub socket
as in a notebook; ``--in-process`` measures in this process instead (widget messages are
built but not sent). Goal: ratio ≤ 1.03.

    .venv/bin/python benchmarks/dashboard_overhead.py [--pairs 5] [--steps 150] [--step-ms 20]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent  # this script's folder, imported by the kernel
REPO = HERE.parent


def measure(pairs: int, steps: int, step_ms: float, update_hz: float) -> dict[str, Any]:
    """Alternate runs without and with the dashboard; return per-step medians."""
    import ipywidgets
    import torch
    from torch import nn

    import adaptive_nb
    from adaptive_nb.jupyter.dashboard import Dashboard
    from adaptive_nb.run.control import RunControl

    try:
        from IPython.display import display
    except ImportError:  # pragma: no cover

        def display(*_a: Any, **_k: Any) -> None:
            pass

    sent = [0]
    original = ipywidgets.Widget.send_state

    def counting(self: Any, key: Any = None) -> None:
        sent[0] += 1
        original(self, key)

    ipywidgets.Widget.send_state = counting  # type: ignore[method-assign]

    torch.manual_seed(0)
    # One intra-op thread: on small CPUs, OpenMP workers waking after the step's sleep
    # add tens of ms of noise that would drown what is measured here.
    torch.set_num_threads(1)
    net = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    data = [(torch.randn(64, 64), torch.randint(0, 10, (64,))) for _ in range(20)]
    pause = step_ms / 1000.0

    def step(model: nn.Module, batch: Any) -> torch.Tensor:
        time.sleep(pause)  # a step of at least step_ms, like a real model's
        x, y = batch
        return nn.functional.cross_entropy(model(x), y)

    def run(widget: bool) -> tuple[float, int, int]:
        observers: list[Any] = []
        control = RunControl()
        dash = None
        if widget:
            dash = Dashboard(control, ["cpu"], False, update_hz=update_hz)
            display(dash)
            observers.append(dash)
        sent[0] = 0
        t0 = time.perf_counter()
        adaptive_nb.train(
            step,
            model=net,
            optimizer=opt,
            data=data,
            steps=steps,
            devices="cpu",
            policy="static",
            observers=observers,
            control=control,
            control_interval=0.5,
        )
        wall = time.perf_counter() - t0
        if dash is not None:
            flush_ms.append(1000 * dash.flush_s / max(1, dash.flushes))
        return wall / steps, sent[0], dash.flushes if dash is not None else 0

    flush_ms: list[float] = []
    run(False)  # warm-up
    off: list[float] = []
    on: list[float] = []
    messages: list[int] = []
    flushes: list[int] = []
    for _ in range(pairs):
        off.append(run(False)[0])
        per_step, n_msgs, n_flush = run(True)
        on.append(per_step)
        messages.append(n_msgs)
        flushes.append(n_flush)
    ipywidgets.Widget.send_state = original  # type: ignore[method-assign]
    m_off, m_on = statistics.median(off), statistics.median(on)
    run_s = m_on * steps
    return {
        "steps": steps,
        "step_ms_target": step_ms,
        "pairs": pairs,
        "update_hz": update_hz,
        "median_step_ms_no_widget": round(m_off * 1000, 3),
        "median_step_ms_dashboard": round(m_on * 1000, 3),
        "ratio": round(m_on / m_off, 4),
        "widget_messages_per_run": int(statistics.median(messages)),
        "flushes_per_run": int(statistics.median(flushes)),
        "ms_per_update": round(statistics.median(flush_ms), 2),
        "flushes_per_s": round(statistics.median(flushes) / run_s, 2),
        "messages_per_s": round(statistics.median(messages) / run_s, 1),
    }


def in_kernel(args: argparse.Namespace) -> dict[str, Any]:
    """Run :func:`measure` inside a Jupyter kernel and return its result."""
    import nbformat
    from nbclient import NotebookClient

    code = (
        f"import sys, json; sys.path.insert(0, {str(HERE)!r})\n"
        "import dashboard_overhead as b\n"
        f"r = b.measure({args.pairs}, {args.steps}, {args.step_ms}, {args.update_hz})\n"
        "print('RESULT ' + json.dumps(r))"
    )
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(code)]
    env_path = os.environ.get("PYTHONPATH", "")
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env_path) if p)
    NotebookClient(nb, timeout=1800, kernel_name="python3").execute()
    for out in nb.cells[0].outputs:
        for line in out.get("text", "").splitlines():
            if line.startswith("RESULT "):
                result: dict[str, Any] = json.loads(line[len("RESULT ") :])
                result["where"] = "Jupyter kernel (nbclient), messages sent on IOPub"
                return result
    raise RuntimeError(f"no result from the kernel: {nb.cells[0].outputs}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=5, help="alternating run pairs")
    parser.add_argument("--steps", type=int, default=150, help="steps per run")
    parser.add_argument("--step-ms", type=float, default=20.0, help="minimum step time")
    parser.add_argument("--update-hz", type=float, default=4.0, help="dashboard update rate")
    parser.add_argument("--in-process", action="store_true", help="measure in this process")
    parser.add_argument("--json", action="store_true", help="print JSON only")
    args = parser.parse_args(argv)
    if args.in_process:
        result = measure(args.pairs, args.steps, args.step_ms, args.update_hz)
        result["where"] = "in process (widget messages built, not sent)"
    else:
        result = in_kernel(args)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(
        f"dashboard overhead ({result['where']}), CPU, {args.steps} steps/run, "
        f"{args.pairs} alternating pairs, step ≥ {args.step_ms:g} ms"
    )
    print(f"  median step, --no-widget : {result['median_step_ms_no_widget']:.2f} ms")
    print(f"  median step, dashboard   : {result['median_step_ms_dashboard']:.2f} ms")
    verdict = "ok" if result["ratio"] <= 1.03 else "ABOVE GOAL"
    print(f"  ratio                    : {result['ratio']:.4f} (goal ≤ 1.03: {verdict})")
    print(
        f"  widget messages per run  : {result['widget_messages_per_run']} "
        f"({result['messages_per_s']}/s; {result['flushes_per_run']} updates, "
        f"{result['flushes_per_s']}/s at update_hz={args.update_hz:g}, counting the first "
        f"and last; {result['ms_per_update']} ms per update)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
