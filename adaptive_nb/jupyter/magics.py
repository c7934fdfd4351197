"""``%%adaptive_train``: a thin IPython front-end over :func:`adaptive_nb.train`.

The cell body is the per-step code. It reads the notebook's variables, with ``batch``
(already on the primary device) and ``model`` (the model as wrapped for the step) bound,
and assigns ``loss``; what it assigns goes to a namespace of the run's own
(:mod:`.cell_namespace`), never into the notebook's. adaptive_nb owns zero_grad /
backward / optimizer.step.

Why ~420 lines: most of it is the option table (one ``@argument`` per documented option,
each with its help text); the logic is the lookup of the user's variables and the call.
"""

from __future__ import annotations

import difflib
import logging
from typing import Any

from IPython.core.error import UsageError as IPythonUsageError
from IPython.core.magic import Magics, cell_magic, magics_class
from IPython.core.magic_arguments import argument, magic_arguments, parse_argstring

from ..errors import UsageError
from ..run.api import last_run, start, train
from ..run.observers import BaseObserver
from ..run.report import RunReport
from .cell_namespace import CellStep, attach_last_step
from .shipped_cell import ship_cell

__all__ = ["AdaptiveMagics", "machine_summary"]

log = logging.getLogger("adaptive_nb")

_EXAMPLE = (
    "%%adaptive_train --model net --optimizer opt --data loader --epochs 1\n"
    "x, y = batch\n"
    "loss = torch.nn.functional.cross_entropy(model(x), y)"
)


def machine_summary() -> str:
    """One line about this machine's GPUs (or CPU and RAM)."""
    try:
        from ..monitor import default_monitor, describe_machine

        return "adaptive_nb: " + describe_machine(default_monitor())
    except Exception as exc:  # the summary must never break %load_ext
        log.debug("machine summary failed: %s", exc)
        import os

        import psutil

        gb = psutil.virtual_memory().total / 2**30
        return f"adaptive_nb: CPU only: {os.cpu_count()} cores, {gb:.1f} GB RAM"


def _workers(text: str) -> int | str:
    """``--workers``: a count, or ``MIN:MAX`` (checked with the other options)."""
    return int(text) if text.strip().isdigit() else text


class _StoreReport(BaseObserver):
    """Stores the report in the notebook namespace when a background run ends."""

    def __init__(self, ns: dict[str, Any], out: str, step: CellStep) -> None:
        self._ns, self._out, self._step = ns, out, step

    def on_end(self, report: RunReport) -> None:
        attach_last_step(report, self._step.last_step())
        self._ns[self._out] = report


@magics_class
class AdaptiveMagics(Magics):
    """The ``%%adaptive_train`` cell magic."""

    @magic_arguments()
    @argument("--model", metavar="NAME", help="notebook variable holding the nn.Module")
    @argument("--optimizer", metavar="NAME", help="notebook variable holding the optimizer")
    @argument("--data", metavar="NAME", help="notebook variable: DataLoader / iterable of batches")
    @argument("--epochs", type=int, default=None, metavar="N", help="passes over --data")
    @argument("--steps", type=int, default=None, metavar="N", help="optimizer steps in all")
    @argument(
        "--devices",
        default="auto",
        metavar="SPEC",
        help="auto (all GPUs, else CPU) | cpu | 0,2 (GPU indices) | sim:SCENARIO.json",
    )
    @argument(
        "--policy",
        default="adaptive",
        metavar="NAME",
        help="adaptive (device set + batch shares; CPU threads) | weights (all devices, shares "
        "adapt) | static (equal split: today's DataParallel)",
    )
    @argument(
        "--headroom",
        type=float,
        default=0.1,
        metavar="FRAC",
        help="fraction of each GPU's memory kept free, 0 <= FRAC < 1 (default 0.1)",
    )
    @argument("--interval", type=float, default=2.0, metavar="S", help="control tick (s)")
    @argument(
        "--no-widget", action="store_true", help="no live dashboard: a text progress line instead"
    )
    @argument(
        "--background",
        action="store_true",
        help="run on a background thread; the cell returns at once (see %%adaptive status)",
    )
    @argument("--out", default="_adaptive", metavar="NAME", help="variable for the RunReport")
    @argument("--loss", default="loss", metavar="NAME", help="variable the body assigns")
    @argument(
        "--scheduler",
        default=None,
        metavar="NAME",
        help="notebook variable: an LR scheduler of --optimizer, stepped once per applied step",
    )
    @argument(
        "--scheduler-interval",
        default=None,
        metavar="WHEN",
        help="step (after every optimizer step, default) | epoch (after every epoch)",
    )
    @argument(
        "--scheduler-metric",
        default=None,
        metavar="NAME",
        help="metric of --eval that a ReduceLROnPlateau --scheduler watches",
    )
    @argument(
        "--clip-grad-norm",
        type=float,
        default=None,
        metavar="X",
        help="clip the total gradient norm to X > 0 (a non-finite norm skips the step)",
    )
    @argument(
        "--precision",
        default="fp32",
        metavar="P",
        help="fp32 (default) | bf16 (autocast; CPU or GPU) | fp16 (autocast + GradScaler; GPU)",
    )
    @argument(
        "--eval",
        default=None,
        metavar="NAME",
        help="notebook function fn(model) -> {metric: number}, run every epoch in eval mode",
    )
    @argument(
        "--eval-every",
        type=int,
        default=None,
        metavar="N",
        help="run --eval every N optimizer steps instead of every epoch",
    )
    @argument(
        "--callbacks",
        default=None,
        metavar="NAME",
        help="notebook variable: object(s) with on_step_end / on_epoch_end / on_eval, "
        "called once per applied step",
    )
    @argument(
        "--accumulate",
        type=int,
        default=1,
        metavar="N",
        help="one optimizer step per N batches of --data (gradient of their mean loss)",
    )
    @argument(
        "--checkpoint",
        default=None,
        metavar="DIR",
        help="write checkpoints to DIR (every epoch, or --checkpoint-every N steps, and at "
        "the end); atomic, the newest --keep kept",
    )
    @argument(
        "--checkpoint-every", type=int, default=None, metavar="N", help="checkpoint every N steps"
    )
    @argument("--keep", type=int, default=None, metavar="N", help="checkpoints kept (default 2)")
    @argument(
        "--resume",
        action="store_true",
        help="continue from the newest checkpoint in --checkpoint DIR (--steps/--epochs count "
        "from the start of the training)",
    )
    @argument(
        "--engine",
        default="dataparallel",
        metavar="E",
        help="dataparallel (default: one process) | ddp (one rank process per GPU, or "
        "--workers CPU ranks; the cell and the variables it uses are shipped to them) | "
        "ray (Ray Train workers, shipped the same way)",
    )
    @argument(
        "--workers",
        type=_workers,
        default=None,
        metavar="N|MIN:MAX",
        help="CPU ranks of --engine ddp; Ray Train workers of --engine ray (MIN:MAX: elastic)",
    )
    @argument(
        "--ray-address",
        default=None,
        metavar="ADDR",
        help="--engine ray: the Ray cluster to use (default: a local Ray started for the run)",
    )
    @argument(
        "--gpus-per-worker",
        type=float,
        default=None,
        metavar="G",
        help="--engine ray: GPUs per Ray Train worker (default 0: CPU workers)",
    )
    @argument(
        "--min-chunk",
        type=int,
        default=None,
        metavar="N",
        help="fewest samples a GPU is given (default 2 with BatchNorm, else 1)",
    )
    @argument(
        "--sync-bn",
        action="store_true",
        help="--engine ddp on GPUs: BatchNorm → SyncBatchNorm (statistics of the whole batch)",
    )
    @argument(
        "--max-restarts",
        type=int,
        default=0,
        metavar="N",
        help="--engine ddp with --checkpoint: restart the ranks up to N times after one dies, "
        "on the remaining devices, from the newest checkpoint (default 0: stop cleanly)",
    )
    @argument(
        "--log",
        action="append",
        default=None,
        metavar="SPEC",
        help="stream the run to tensorboard:DIR | mlflow | mlflow:URI | csv:PATH (repeat "
        "or separate with commas)",
    )
    @cell_magic
    def adaptive_train(self, line: str, cell: str) -> RunReport | None:
        """Train a model with the cell body as the per-step code.

        The body sees the notebook's variables plus ``batch`` and ``model`` and must assign
        ``loss`` (a scalar tensor). Call ``model(...)``, not your module's own variable:
        ``model`` is the module as wrapped to split the batch across devices. The RunReport
        is shown and stored in ``--out``.

        What the body assigns (``batch``, ``loss``, ``x``...) stays in the run's own
        namespace: the notebook's variables of those names are never overwritten, also
        while a --background run trains. After the run, ``_adaptive.last_step`` (the
        ``--out`` report) holds the body's variables as the last step left them, ``loss``
        as a float.

        The body may run more than once per applied step (an out-of-memory retry re-runs
        it; micro-batches and --accumulate run it per piece): put once-per-step side
        effects in --callbacks, called exactly once per applied step.

        --log SPEC streams the run to ``tensorboard:DIR``, ``mlflow`` (or ``mlflow:URI``)
        or ``csv:PATH``; repeat it or separate specs with commas.

        Example::

            %%adaptive_train --model net --optimizer opt --data loader --epochs 1
            x, y = batch
            loss = torch.nn.functional.cross_entropy(model(x), y)
        """
        try:
            return self._adaptive_train(line, cell)
        except UsageError as exc:
            raise IPythonUsageError(str(exc)) from None

    # -- implementation -------------------------------------------------------------------
    def _lookup(self, role: str, name: str | None) -> Any:
        ns = self.shell.user_ns  # type: ignore[union-attr]
        if not name:
            raise UsageError(
                f"--{role} is missing: name the notebook variable holding the {role}, e.g.\n"
                + _EXAMPLE
            )
        if name not in ns:
            visible = [k for k in ns if not k.startswith("_")]
            close = difflib.get_close_matches(name, visible, n=3)
            hint = f" Did you mean {', '.join(f'`{c}`' for c in close)}?" if close else ""
            raise UsageError(
                f"--{role} {name}: there is no variable `{name}` in the notebook; define it in "
                f"a cell above and run that cell first.{hint}"
            )
        return ns[name]

    def _compile_body(self, cell: str) -> Any:
        if not cell.strip() or all(
            not ln.strip() or ln.strip().startswith("#") for ln in cell.splitlines()
        ):
            raise UsageError(
                "the cell body is empty: write the per-step code below the magic line, e.g.\n"
                + _EXAMPLE
            )
        shell = self.shell
        assert shell is not None
        source = shell.transform_cell(cell)
        # One leading newline so that line numbers match the cell (line 1 is the magic).
        source = "\n" + source
        filename = shell.compile.cache(source)
        try:
            return compile(source, filename, "exec")
        except SyntaxError as exc:
            where = f"line {exc.lineno} of the cell" if exc.lineno else "the cell"
            text = f": {exc.text.strip()}" if exc.text else ""
            raise UsageError(f"syntax error in {where}{text} ({exc.msg}).") from None

    def _adaptive_train(self, line: str, cell: str) -> RunReport | None:
        try:
            args = parse_argstring(self.adaptive_train, line)
        except IPythonUsageError as exc:
            raise UsageError(f"{exc}. See %%adaptive_train? for the options.") from None
        model = self._lookup("model", args.model)
        optimizer = self._lookup("optimizer", args.optimizer)
        data = self._lookup("data", args.data)
        extras = {
            role: self._lookup(flag, name)
            for role, flag, name in (
                ("scheduler", "scheduler", args.scheduler),
                ("evaluate", "eval", args.eval),
                ("callbacks", "callbacks", args.callbacks),
            )
            if name is not None
        }
        code = self._compile_body(cell)
        names = {"model": args.model, "optimizer": args.optimizer, "data": args.data}
        names.update(
            {
                role: name
                for role, name in (
                    ("scheduler", args.scheduler),
                    ("evaluate", args.eval),
                    ("callbacks", args.callbacks),
                )
                if name is not None
            }
        )
        ns: dict[str, Any] = self.shell.user_ns  # type: ignore[union-attr]
        loss_name = args.loss
        step: Any
        if args.engine in ("ddp", "ray"):  # the ranks cannot see this namespace: ship it
            step = ship_cell(
                "\n" + self.shell.transform_cell(cell),  # type: ignore[union-attr]
                ns,
                loss_name=loss_name,
                skip={args.model, args.optimizer, args.data},
                engine=args.engine,
            )
        else:
            step = CellStep(code, ns, loss_name=loss_name, raw=model, raw_name=args.model)

        observers: list[Any] = []
        publisher = _status_publisher()
        if publisher is not None:
            observers.append(publisher)
        kwargs: dict[str, Any] = {
            "model": model,
            "optimizer": optimizer,
            "data": data,
            "epochs": args.epochs,
            "steps": args.steps,
            "devices": args.devices,
            "policy": args.policy,
            "headroom": args.headroom,
            "widget": False if args.no_widget else _show_dashboard,
            # text progress instead of the dashboard (not from a background thread, whose
            # prints would land in whichever cell runs at the time)
            "progress": args.no_widget and not args.background,
            "control_interval": args.interval,
            "names": names,
            "loss_name": loss_name,
            "scheduler_interval": args.scheduler_interval,
            "scheduler_metric": args.scheduler_metric,
            "clip_grad_norm": args.clip_grad_norm,
            "precision": args.precision,
            "eval_every": args.eval_every,
            "accumulate": args.accumulate,
            "checkpoint_dir": args.checkpoint,
            "checkpoint_every": args.checkpoint_every,
            "keep": args.keep,
            "resume": True if args.resume else None,
            "log": args.log,
            "engine": args.engine,
            "workers": args.workers,
            "ray_address": args.ray_address,
            "gpus_per_worker": args.gpus_per_worker,
            "sync_bn": args.sync_bn,
            "max_restarts": args.max_restarts,
            "min_chunk": args.min_chunk,
            **extras,
        }
        if args.background:
            observers.append(_StoreReport(ns, args.out, step))
            run = start(step, observers=observers, **kwargs)
            print(
                f"adaptive_nb: run {run.run_id} started in the background; "
                f"`%adaptive status|pause|resume|stop` controls it, the report goes to "
                f"`{args.out}` when it ends."
            )
            return None
        previous = last_run()
        try:
            report = train(step, observers=observers, **kwargs)
        except KeyboardInterrupt:
            self._store_partial(ns, args.out, "interrupted", previous)
            raise
        except UsageError:
            self._store_partial(ns, args.out, None, previous)
            raise
        except BaseException:
            self._store_partial(ns, args.out, "stopped by an error", previous)
            raise
        finally:
            attach_last_step(last_run_report(previous), step.last_step())
            if publisher is not None:
                publisher.close()
        ns[args.out] = report
        return report

    @staticmethod
    def _store_partial(ns: dict[str, Any], out: str, why: str | None, previous: Any) -> None:
        run = last_run()
        if run is None or run is previous or run.report is None:
            return  # the run never started: nothing to store
        ns[out] = run.report
        if why is not None:
            print(
                f"adaptive_nb: {why} after step {run.step}; the partial report is in `{out}`. "
                "Model and optimizer hold the state after the last completed step."
            )


def _show_dashboard(control: Any, device_names: list[str], simulated: bool) -> Any:
    """The live dashboard this magic attaches to its run (bqplot is imported only now)."""
    from .dashboard import show_dashboard

    return show_dashboard(control, device_names, simulated)


def last_run_report(previous: Any) -> RunReport | None:
    """The report of the run started since ``previous`` was the last one (None if none)."""
    run = last_run()
    if run is None or run is previous:
        return None
    report: RunReport | None = run.report
    return report


def _status_publisher() -> Any:
    """The run-status file writer for the JupyterLab sidebar (None outside a kernel)."""
    try:
        from .run_status import RunStatusPublisher

        publisher = RunStatusPublisher()
    except Exception as exc:  # publishing status is best effort
        log.debug("run status publisher unavailable: %s", exc)
        return None
    if publisher.kernel_id is None:
        return None
    return publisher
