"""``%adaptive status|pause|resume|stop`` and ``%%adaptive_monitor``.

``%adaptive`` acts on the run in progress in this kernel (a foreground run, controlled
from a widget thread, or a ``--background`` run). It only posts requests to the run's
:class:`~adaptive_nb.control.RunControl`; the loop applies them at the next step
boundary.

``%%adaptive_monitor`` runs any cell under the resource monitor, with live utilisation
and memory plots, and prints a short report afterwards (also stored in a variable).
"""

from __future__ import annotations

import ast
import time
from typing import Any

from IPython.core.error import UsageError
from IPython.core.magic import Magics, cell_magic, line_magic, magics_class
from IPython.core.magic_arguments import argument, magic_arguments, parse_argstring

from ..monitor.report import MonitorReport, snapshot_record, summarize

__all__ = ["ControlMagics", "format_status"]

_COMMANDS = ("status", "pause", "resume", "stop")


def format_status(status: dict[str, Any]) -> str:
    """One readable line from ``Run.status()``."""
    total = status.get("total_steps")
    step = f"step {status.get('step', 0)}" + (f"/{total}" if total else "")
    rate = status.get("samples_per_s") or 0.0
    state = str(status.get("ended") or "running")
    if status.get("paused"):
        state = "paused"
    shares = status.get("shares") or {}
    devices = ", ".join(
        f"{name} {shares[name]:.2f}" if name in shares else str(name)
        for name in status.get("devices") or []
    )
    parts = [
        f"run {status.get('run_id', '?')}",
        state,
        step,
        f"epoch {int(status.get('epoch') or 0) + 1}",
        f"{rate:,.1f} samples/s",
        f"policy {status.get('policy', '?')}",
    ]
    if devices:
        parts.append(f"devices: {devices}")
    if status.get("background"):
        parts.append("background")
    if status.get("simulated"):
        parts.append("SIMULATED devices")
    return "adaptive_nb: " + " · ".join(parts)


def _split_last_expression(source: str) -> tuple[ast.Module, ast.Expression | None]:
    tree = ast.parse(source)
    if tree.body and isinstance(tree.body[-1], ast.Expr):
        last = ast.Expression(tree.body.pop().value)  # type: ignore[attr-defined]
        return tree, last
    return tree, None


@magics_class
class ControlMagics(Magics):
    """``%adaptive`` (control the current run) and ``%%adaptive_monitor``."""

    @line_magic
    def adaptive(self, line: str) -> None:
        """Control the adaptive_nb run in progress in this kernel.

        Usage: ``%adaptive status`` | ``%adaptive pause`` | ``%adaptive resume`` |
        ``%adaptive stop``. Requests apply at the next step boundary; ``stop`` finishes
        the current step and keeps the (partial) report.
        """
        words = line.split()
        command = words[0] if words else "status"
        if command not in _COMMANDS or len(words) > 1:
            raise UsageError(
                f"%adaptive {line.strip()}: unknown command; use one of "
                + ", ".join(f"`%adaptive {c}`" for c in _COMMANDS)
            )
        from ..run.slot import active_run

        run = active_run()
        if run is None:
            if command == "status":
                print("adaptive_nb: no run in progress in this kernel")
                return
            raise UsageError(
                f"%adaptive {command}: no adaptive_nb run is in progress in this kernel "
                "(start one with %%adaptive_train, or with --background to keep the "
                "notebook usable)"
            )
        if command == "status":
            print(format_status(run.status()))
        elif command == "pause":
            run.control.pause()
            print(f"adaptive_nb: pause requested for run {run.run_id} (after the current step)")
        elif command == "resume":
            run.control.resume()
            print(f"adaptive_nb: resume requested for run {run.run_id}")
        else:
            run.control.stop()
            print(
                f"adaptive_nb: stop requested for run {run.run_id}: it finishes the current "
                "step and keeps the report"
            )

    @magic_arguments()
    @argument("--rate", type=float, default=2.0, metavar="HZ", help="samples per second")
    @argument("--no-widget", action="store_true", help="no live plots, only the report")
    @argument(
        "--out",
        default="_adaptive_monitor",
        metavar="NAME",
        help="variable for the MonitorReport (default _adaptive_monitor)",
    )
    @cell_magic
    def adaptive_monitor(self, line: str, cell: str) -> Any:
        """Run the cell under the resource monitor (no allocation, nothing changed):
        live CPU/GPU utilisation and memory plots, then a short report (duration, peak
        and mean CPU, RAM, per-GPU utilisation and memory)."""
        args = parse_argstring(self.adaptive_monitor, line)
        if not args.rate > 0:
            raise UsageError(f"--rate must be above 0 samples per second, got {args.rate}")
        shell = self.shell
        assert shell is not None
        from IPython.display import display

        from ..monitor import Monitor

        source = shell.transform_cell(cell)
        try:
            body, last = _split_last_expression(source)
        except SyntaxError as exc:
            raise UsageError(f"syntax error in the cell: {exc.msg} (line {exc.lineno})") from None
        filename = shell.compile.cache(source)

        monitor = Monitor(rate_hz=args.rate)
        first = monitor.sample_now()
        dashboard = None
        if not args.no_widget:
            from .dashboard import Dashboard

            names = snapshot_record(first, first.t).devices
            dashboard = Dashboard(
                None,
                names,
                simulated=any(g.simulated for g in first.gpus),
                update_hz=min(4.0, max(args.rate, 1.0)),
            )
            display(dashboard)
            dashboard.on_snapshot(first)
            monitor.add_listener(dashboard.on_snapshot)
        t0 = time.monotonic()
        monitor.start()
        result: Any = None
        outcome = "finished"
        try:
            ns = shell.user_ns
            exec(compile(body, filename, "exec"), ns)
            if last is not None:
                result = eval(compile(last, filename, "eval"), ns)
        except BaseException:
            outcome = "ended by an error"
            raise
        finally:
            monitor.stop()
            end = monitor.sample_now()
            if dashboard is not None:
                dashboard.on_snapshot(end)
                dashboard.finish(outcome)
            report: MonitorReport = summarize(
                [s for s in monitor.history() if s.t >= first.t],
                duration_s=time.monotonic() - t0,
                notice=monitor.notice,
            )
            shell.user_ns[args.out] = report
            display(report)
        return result
