"""``train`` and ``start``: check the user's input, build the backend for the device spec,
attach observers, and run (in this thread, or on a background thread).

Bad input raises :class:`~adaptive_nb.errors.UsageError` before anything runs.
"""

from __future__ import annotations

import inspect
import os
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.optim.lr_scheduler import LRScheduler

from ..errors import UsageError
from ..step import StepFn
from . import slot
from .backend import build_backend
from .callbacks import check_callbacks
from .control import RunControl
from .ddp_backend import build_ddp_run, check_engine_options, group_restarts
from .loggers import build_loggers
from .loop import Run
from .observers import Observer
from .plugins import DashboardFactory, dashboard_factory
from .progress_text import TextProgress
from .ray_backend import RayEvents, build_ray_run, check_ray_options
from .report import RunReport
from .training import Training, check_training_options
from .validate import check_counts, check_inputs, check_policy, parse_devices

__all__ = ["active_run", "last_run", "start", "train"]

active_run = slot.active_run
last_run = slot.last_run


def _prepare(
    step: StepFn,
    *,
    model: Any,
    optimizer: Any,
    data: Any,
    epochs: int | None,
    steps: int | None,
    devices: str | Sequence[int] | None,
    policy: str,
    headroom: float,
    widget: bool | DashboardFactory,
    observers: Sequence[Observer],
    control: RunControl | None,
    control_interval: float,
    names: Mapping[str, str] | None,
    loss_name: str,
    handle_interrupt: bool,
    scheduler: Any = None,
    scheduler_interval: str | None = None,
    scheduler_metric: str | None = None,
    clip_grad_norm: float | None = None,
    precision: str = "fp32",
    evaluate: Any = None,
    eval_every: int | None = None,
    callbacks: Any = None,
    accumulate: int = 1,
    checkpoint_dir: Any = None,
    checkpoint_every: int | None = None,
    keep: int | None = None,
    resume: Any = None,
    log: Any = None,
    engine: str = "dataparallel",
    workers: int | str | None = None,
    sync_bn: bool = False,
    min_chunk: int | None = None,
    max_restarts: int = 0,
    ray_address: str | None = None,
    gpus_per_worker: float | None = None,
) -> Run:
    if not callable(step):
        raise UsageError(f"step must be a function step(model, batch) -> loss, got {step!r}.")
    check_inputs(model=model, optimizer=optimizer, data=data, names=names)
    check_counts(epochs, steps)
    check_policy(policy, headroom)
    if not control_interval > 0:
        raise UsageError(f"control_interval must be positive, got {control_interval}.")
    spec = parse_devices(devices)
    if min_chunk is not None and (
        isinstance(min_chunk, bool) or not isinstance(min_chunk, int) or min_chunk < 1
    ):
        raise UsageError(
            f"min_chunk (--min-chunk) must be a whole number ≥ 1, got {min_chunk!r}: it is the "
            "fewest samples a GPU is given (default: 2 when the model has BatchNorm, else 1)."
        )
    ray_options = check_ray_options(
        engine,
        workers,
        spec,
        ray_address=ray_address,
        gpus_per_worker=gpus_per_worker,
        devices=devices,
        accumulate=accumulate,
        precision=precision,
        checkpoint_dir=checkpoint_dir,
        resume=resume,
        sync_bn=sync_bn,
        max_restarts=max_restarts,
    )
    world_size = (
        ray_options.max_workers
        if ray_options is not None
        else check_engine_options(
            engine,
            workers,  # type: ignore[arg-type]  # check_engine_options refuses a "MIN:MAX" string
            spec,
            precision=precision,
            checkpoint_dir=checkpoint_dir,
            sync_bn=sync_bn,
            max_restarts=max_restarts,
        )
    )
    loggers = build_loggers(log)
    if loggers:  # loggers are callbacks too: exact loss, lr and metrics of every step
        user_callbacks = check_callbacks(callbacks, (names or {}).get("callbacks", "callbacks"))
        callbacks = [*user_callbacks, *loggers]
    options = check_training_options(
        optimizer=optimizer,
        device_kind=spec.kind,
        names=names,
        scheduler=scheduler,
        scheduler_interval=scheduler_interval,
        scheduler_metric=scheduler_metric,
        # under DDP the ranks clip (the kernel holds no gradients)
        clip_grad_norm=clip_grad_norm if world_size is None else None,
        precision=precision,
        evaluate=evaluate,
        eval_every=eval_every,
        callbacks=callbacks,
        accumulate=accumulate,
        model=model,
        checkpoint_dir=checkpoint_dir,
        checkpoint_every=checkpoint_every,
        keep=keep,
        resume=resume,
    )
    busy = slot.active_run()
    if busy is not None:  # early, friendly check; the slot is claimed atomically later
        raise UsageError(slot.busy_message(busy))
    run_data: Any = data
    ray_events: RayEvents | None = None
    if world_size is None:
        backend, controller, snapshots = build_backend(
            spec,
            policy=policy,
            headroom=float(headroom),
            control_interval=control_interval,
            min_chunk=min_chunk,
        )
    elif ray_options is not None:
        backend, controller, snapshots, run_data, ray_events = build_ray_run(
            step,
            model=model,
            optimizer=optimizer,
            data=data,
            options=ray_options,
            policy=policy,
            headroom=float(headroom),
            control_interval=control_interval,
            clip_grad_norm=clip_grad_norm,
            data_name=(names or {}).get("data", "data"),
        )
    else:
        backend, controller, snapshots, run_data = build_ddp_run(
            step,
            model=model,
            optimizer=optimizer,
            data=data,
            world_size=world_size,
            spec=spec,
            policy=policy,
            headroom=float(headroom),
            control_interval=control_interval,
            clip_grad_norm=clip_grad_norm,
            data_name=(names or {}).get("data", "data"),
            sync_bn=sync_bn,
            accumulate=accumulate,
            precision=precision,
        )
    control = control or RunControl()
    all_observers = [*observers, *loggers]
    if widget:
        factory = widget if callable(widget) else dashboard_factory()
        all_observers.append(factory(control, backend.device_names(), backend.simulated))
    return Run(
        step,
        model=model,
        optimizer=optimizer,
        data=run_data,
        epochs=epochs,
        steps=steps,
        engine=backend,
        controller=controller,
        snapshots=snapshots,
        policy=policy,
        headroom=float(headroom),
        control=control,
        observers=all_observers,
        control_interval=control_interval,
        loss_name=loss_name,
        data_name=(names or {}).get("data", "data"),
        handle_interrupt=handle_interrupt,
        training=Training(options, optimizer, device_type=backend.primary_device().type),
        restarts=ray_events
        if ray_events is not None
        else (None if world_size is None else group_restarts(engine, max_restarts)),
    )


def train(
    step: StepFn,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    data: Iterable[Any],
    epochs: int | None = None,
    steps: int | None = None,
    devices: str | Sequence[int] | None = "auto",
    policy: str = "adaptive",
    headroom: float = 0.1,
    widget: bool | DashboardFactory = False,
    observers: Sequence[Observer] = (),
    control: RunControl | None = None,
    control_interval: float = 2.0,
    names: Mapping[str, str] | None = None,
    loss_name: str = "loss",
    progress: bool = False,
    scheduler: LRScheduler | None = None,
    scheduler_interval: str | None = None,
    scheduler_metric: str | None = None,
    clip_grad_norm: float | None = None,
    precision: str = "fp32",
    evaluate: Callable[[nn.Module], dict[str, float]] | None = None,
    eval_every: int | None = None,
    callbacks: object | Sequence[object] | None = None,
    accumulate: int = 1,
    checkpoint_dir: str | os.PathLike[str] | None = None,
    checkpoint_every: int | None = None,
    keep: int | None = None,
    resume: bool | str | os.PathLike[str] | None = None,
    log: str | Sequence[str] | None = None,
    engine: str = "dataparallel",
    workers: int | str | None = None,
    sync_bn: bool = False,
    min_chunk: int | None = None,
    max_restarts: int = 0,
    ray_address: str | None = None,
    gpus_per_worker: float | None = None,
) -> RunReport:
    """Train ``model`` with ``step(model, batch) -> loss`` over ``data`` and return a report.

    adaptive_nb owns ``zero_grad``/``backward``/``optimizer.step``; the global batch never
    changes, only where and how it is computed. ``epochs`` or ``steps`` (default: one
    epoch). ``devices``: ``"auto"`` (all visible GPUs, else CPU), ``"cpu"``, ``"0,2"``,
    or ``"sim:SCENARIO.json"`` (simulated fleet). ``policy``: ``"adaptive"`` (device set and
    shares; CPU threads), ``"weights"`` (all devices, shares adapt) or ``"static"`` (equal
    split, nothing adapts). ``headroom``: fraction of each GPU's memory kept free.

    The loss must be the *mean* over the batch's samples (PyTorch's default
    ``reduction="mean"``). When a batch does not fit the devices' memory it is run as
    micro-batches with gradient accumulation, each micro-batch's loss weighted by its share
    of the samples, which gives exactly the full-batch gradient for a mean loss. A summed
    loss (``reduction="sum"``) would have its gradient scaled down by the number of
    micro-batches then; a batch-level loss that is not a per-sample average (e.g.
    contrastive losses over the whole batch) is only approximated. Across GPUs the loss is
    computed on the gathered output, so the split alone never changes the gradient.

    Raises :class:`~adaptive_nb.errors.UsageError` for bad input before anything runs.
    ``progress=True`` prints a one-line text progress (step, samples/s, ETA, loss) and
    each decision; ``widget=True`` shows the live dashboard in a notebook instead (or pass
    the front-end's dashboard factory itself, as ``%%adaptive_train`` does).

    A Ctrl-C / kernel interrupt stops at the next step boundary and raises
    ``KeyboardInterrupt``; the partial report is on the exception's run
    (``adaptive_nb.last_run().report``).

    The model is put in training mode (``model.train()``) before the first step and after
    every evaluation.

    Training-loop options (all checked before anything runs):

    - ``scheduler``: a ``torch.optim.lr_scheduler`` scheduler of ``optimizer``, stepped
      once per *applied* optimizer step (``scheduler_interval="step"``, default) or once
      per epoch (``"epoch"``); never per micro-batch, accumulated batch or retry, and not
      after a skipped step. A ``ReduceLROnPlateau`` is stepped after each evaluation with
      ``metrics[scheduler_metric]`` (both ``scheduler_metric`` and ``evaluate`` needed; a
      metric the evaluation does not return stops the run at the first evaluation).
    - ``clip_grad_norm``: clip the total gradient norm to this value once per step, after
      all batches of the step and after fp16 unscaling, before ``optimizer.step``. The
      norm before clipping is in ``report.grad_norm``. A non-finite norm skips the step
      (model and optimizer unchanged) with a ``nonfinite`` event, so NaN gradients never
      reach the model silently (without clipping nothing checks the gradients).
    - ``precision``: ``"fp32"`` (default), ``"bf16"`` (``torch.autocast`` to bfloat16
      around the step body; CPU or GPU), ``"fp16"`` (autocast to float16 plus a
      ``torch.amp.GradScaler``; CUDA only). Under fp16 the reported loss is unscaled; a
      step with overflowed gradients is skipped by the scaler, counted in
      ``summary["amp_skipped_steps"]`` and shown as an event.
    - ``evaluate``: ``evaluate(model) -> {"name": number}``, run after every epoch (or
      every ``eval_every`` optimizer steps) under ``model.eval()`` and ``torch.no_grad()``;
      metrics in ``report.evaluations``, time in ``summary["eval_s"]`` (excluded from the
      throughput). "Every epoch" means every pass over ``data`` that completes: a run
      limited by ``steps`` within one epoch evaluates only with ``eval_every``.
    - ``callbacks``: an object (or a list of them) with any of
      ``on_step_end(step, loss, history)``, ``on_epoch_end(epoch, history)``,
      ``on_eval(metrics)``; ``history`` is the live
      :class:`~adaptive_nb.run.history.TrainingHistory`.
    - ``accumulate``: one optimizer step per ``accumulate`` loader batches, each batch's
      loss weighted by its share of the samples (the gradient of the mean over all of
      them); groups do not span epochs. ``steps``, the scheduler, clipping, callbacks and
      ``eval_every`` count optimizer steps.
    - ``checkpoint_dir``: write checkpoints there (model, optimizer, scheduler, scaler,
      position, RNG states, history; atomically), after every epoch or every
      ``checkpoint_every`` steps, and when the run ends between steps (completed, stopped,
      interrupted); the newest ``keep`` (default 2) are kept. ``resume=True`` continues
      from the newest one there (or from step 0 if there is none yet), ``resume=PATH``
      from that file: ``steps``/``epochs`` count from the start of the training, so the
      same call with ``resume=True`` finishes what is left, bit-for-bit on CPU as if it
      had never stopped (consumed batches of the epoch are skipped in the same order).

    - ``log``: stream the run to ``"tensorboard:DIR"``, ``"mlflow"`` / ``"mlflow:URI"``
      or ``"csv:PATH"`` (a list, or comma-separated): loss, learning rate and gradient
      norm of every committed step, throughput, per-device shares, utilisation and
      memory per control tick, evaluation metrics, and events as text
      (:mod:`adaptive_nb.run.loggers`). A logger that fails stops logging, never training.

    - ``engine``: ``"dataparallel"`` (default: one process, weighted ``nn.DataParallel``
      over the GPUs) or ``"ddp"``: one rank process per GPU (``workers`` CPU ranks with
      gloo on a machine without GPUs, default 2), started from this process without
      ``fork``; ``step``, ``model``, ``optimizer`` and ``data`` are shipped to them with
      cloudpickle, each rank loads only its slice of every global batch, and each rank's
      loss is scaled by ``b_i·W/B`` so the gradient is the full-batch gradient under
      uneven shares. The planner and the report are the same; when the run ends the
      model and optimizer hold the state of the last completed step. ``accumulate``: a
      group is one rank step (the ranks keep its gradients; an out-of-memory retries the
      whole group); ``precision="bf16"``: autocast on the ranks; ``"fp16"`` is refused up
      front (its loss scaler would have to run on the ranks). ``evaluate`` runs here on the
      model brought up to date from the ranks. Checkpoints are the ranks' state of a
      completed step, in the same format as DataParallel's (a run resumes under either
      engine). A rank that dies stops the run cleanly; with
      ``checkpoint_dir`` and ``max_restarts=N`` (default 0) the group is restarted up to
      N times on the remaining devices from the newest checkpoint, and the steps after
      it run again on the same batches (each applied once in the result; callbacks are
      not called again for them).
      ``sync_bn=True`` converts BatchNorm to ``SyncBatchNorm`` on the ranks (GPU ranks).
    - ``engine="ray"``: the same rank code run by Ray Train workers
      (``ray.train.torch.TorchTrainer``; ``pip install adaptive_nb[ray]``), on a local Ray
      started for the run (loopback only, token authentication on) or on the cluster at
      ``ray_address``. ``workers``: ``N`` or ``"MIN:MAX"`` (Ray Train's elastic group;
      default 2); ``gpus_per_worker``: GPUs Ray gives each worker (default 0: CPU
      workers, gloo). A worker lost mid-run: Ray Train restarts the group from its latest
      checkpoint and the steps after it are replayed, each applied once (a notice in the
      report, ``summary["ray_restarts"]``). ``evaluate`` runs here on the model brought
      up to date from the workers. Not with ``accumulate``, ``precision``, ``sync_bn``
      or adaptive_nb checkpoints (refused up front).
    - ``min_chunk``: the fewest samples weighted DataParallel gives a GPU (a smaller share
      gives it none that step); default 2 when the model has BatchNorm (whose statistics
      are per replica, as in plain DataParallel), else 1.

    **The step body may run more than once per applied step**: an out-of-memory retry
    re-runs it on the same batch, and micro-batches and accumulated batches run it once
    per piece. Side effects that must happen once per step (logging, counters, saving)
    belong in ``callbacks``, which are called exactly once per committed step and never
    for a retried or failed attempt.
    """
    if progress:
        observers = [*observers, TextProgress()]
    run = _prepare(
        step,
        model=model,
        optimizer=optimizer,
        data=data,
        epochs=epochs,
        steps=steps,
        devices=devices,
        policy=policy,
        headroom=headroom,
        widget=widget,
        observers=observers,
        control=control,
        control_interval=control_interval,
        names=names,
        loss_name=loss_name,
        handle_interrupt=True,
        scheduler=scheduler,
        scheduler_interval=scheduler_interval,
        scheduler_metric=scheduler_metric,
        clip_grad_norm=clip_grad_norm,
        precision=precision,
        evaluate=evaluate,
        eval_every=eval_every,
        callbacks=callbacks,
        accumulate=accumulate,
        checkpoint_dir=checkpoint_dir,
        checkpoint_every=checkpoint_every,
        keep=keep,
        resume=resume,
        log=log,
        engine=engine,
        workers=workers,
        sync_bn=sync_bn,
        min_chunk=min_chunk,
        max_restarts=max_restarts,
        ray_address=ray_address,
        gpus_per_worker=gpus_per_worker,
    )
    slot.set_last(run)
    return run.execute()


def start(step: StepFn, **kwargs: Any) -> Run:
    """Like :func:`train` but runs on a background thread and returns the :class:`Run` at
    once; ``run.wait()`` returns the report, ``run.control`` pauses/stops it."""
    opts = _with_defaults(kwargs)
    if opts.pop("progress"):
        opts["observers"] = [*opts["observers"], TextProgress()]
    run = _prepare(step, handle_interrupt=False, **opts)
    try:
        slot.claim(run)  # before the thread starts, so that no second run can slip in
    except UsageError:
        run._abandon()
        raise
    slot.set_last(run)

    def target() -> None:
        try:
            run.execute()
        except BaseException as exc:
            run._error = exc

    run._thread = threading.Thread(target=target, name=f"adaptive_nb-{run.run_id}", daemon=True)
    try:
        run._thread.start()
    except BaseException:
        slot.release(run)
        run._abandon()
        raise
    return run


def _with_defaults(kwargs: dict[str, Any]) -> dict[str, Any]:
    """``kwargs`` completed with :func:`train`'s defaults (one signature for both)."""
    params = inspect.signature(train).parameters
    defaults = {
        name: p.default for name, p in params.items() if p.default is not inspect.Parameter.empty
    }
    required = {name for name, p in params.items() if p.kind is inspect.Parameter.KEYWORD_ONLY}
    required -= set(defaults)
    unknown = set(kwargs) - set(defaults) - required
    if unknown:
        raise UsageError(f"unknown argument(s) to start(): {', '.join(sorted(unknown))}")
    missing = required - set(kwargs)
    if missing:
        raise UsageError(f"start() needs {', '.join(sorted(missing))}.")
    return {**defaults, **kwargs}
