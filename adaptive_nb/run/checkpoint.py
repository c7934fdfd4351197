"""Checkpoints and resuming: everything a run needs to continue bit-for-bit as if it had
never stopped (on CPU; on GPU as far as CUDA kernels are deterministic).

A checkpoint holds the model, optimizer, scheduler and GradScaler states, the position
(optimizer step, epoch, loader batches consumed in that epoch), the RNG states (torch CPU
and CUDA, Python ``random``, NumPy) now *and* at the start of the epoch, and the training
history. Resuming loads them, re-creates the epoch's loader iterator from the epoch-start
RNG state (so a shuffling DataLoader yields the same order), skips the batches already
consumed, and then restores the RNG state of the moment of the checkpoint.

Files are written atomically (a temporary file in the same directory, flushed and
fsync'ed, then renamed over), so a crash mid-write never leaves a half checkpoint; the
newest ``keep`` are kept. ``steps`` and ``epochs`` count from the start of the training,
so re-running the same call with ``resume=True`` finishes what is left.
"""

from __future__ import annotations

import os
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from ..errors import UsageError

if TYPE_CHECKING:
    from .loop import Run

__all__ = [
    "CheckpointOptions",
    "Checkpointing",
    "check_checkpoint_options",
    "latest_checkpoint",
    "rng_state",
    "set_rng_state",
]

FORMAT = "adaptive_nb-checkpoint-1"
_NAME = re.compile(r"^step-(\d{9})\.pt$")


@dataclass(frozen=True)
class CheckpointOptions:
    directory: Path | None = None
    every: int | None = None  # optimizer steps; None: after every epoch
    keep: int = 2
    resume: dict[str, Any] | None = None  # the loaded checkpoint to resume from
    resume_path: Path | None = None
    resume_missing: bool = False  # resume=True found no checkpoint: start from step 0


def latest_checkpoint(directory: Path) -> Path | None:
    if not directory.is_dir():
        return None
    found = sorted(p for p in directory.iterdir() if _NAME.match(p.name))
    return found[-1] if found else None


def _positive(value: Any, label: str, flag: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UsageError(f"{label}={value!r} ({flag}) must be a whole number, at least 1.")
    return value


def check_checkpoint_options(
    *,
    directory: Any,
    every: Any,
    keep: Any,
    resume: Any,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    fp16: bool,
) -> CheckpointOptions:
    """Check the options and, to resume, load and check the checkpoint (nothing changed)."""
    if directory is None:
        for label, flag, value in (
            ("checkpoint_every", "--checkpoint-every", every),
            ("keep", "--keep", keep),
        ):
            if value is not None:
                raise UsageError(
                    f"{label}={value!r} ({flag}) was given without checkpoint_dir "
                    "(--checkpoint DIR): name the directory for the checkpoints too."
                )
        if resume is True:
            raise UsageError(
                "resume=True (--resume) needs checkpoint_dir (--checkpoint DIR), the directory "
                "holding the checkpoints; or pass resume='path/to/step-….pt'."
            )
    path: Path | None = None
    if directory is not None:
        if not isinstance(directory, (str, os.PathLike)) or not str(directory).strip():
            raise UsageError(
                f"checkpoint_dir={directory!r} (--checkpoint) must be a directory path."
            )
        path = Path(directory)
        if path.exists() and not path.is_dir():
            raise UsageError(
                f"checkpoint_dir {str(path)!r} (--checkpoint) is a file, not a directory."
            )
        if path.is_dir() and not os.access(path, os.W_OK):
            raise UsageError(f"checkpoint_dir {str(path)!r} (--checkpoint) is not writable.")
    opts: dict[str, Any] = {
        "directory": path,
        "every": None
        if every is None
        else _positive(every, "checkpoint_every", "--checkpoint-every"),
        "keep": 2 if keep is None else _positive(keep, "keep", "--keep"),
    }
    if resume is None or resume is False:
        return CheckpointOptions(**opts)
    if resume is True:
        assert path is not None
        source = latest_checkpoint(path)
        if source is None:
            return CheckpointOptions(**opts, resume_missing=True)
    elif isinstance(resume, (str, os.PathLike)):
        source = Path(resume)
        if not source.is_file():
            raise UsageError(f"resume={str(resume)!r} (--resume): no checkpoint file there.")
    else:
        raise UsageError(
            f"resume={resume!r} must be True (the newest checkpoint in checkpoint_dir) or the "
            "path of a checkpoint file."
        )
    state = _load(source)
    _check_fits(state, source, model=model, optimizer=optimizer, scheduler=scheduler, fp16=fp16)
    return CheckpointOptions(**opts, resume=state, resume_path=source)


def _load(source: Path) -> dict[str, Any]:
    try:
        state = torch.load(source, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise UsageError(f"cannot read the checkpoint {str(source)!r}: {exc}") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise UsageError(f"{str(source)!r} is not an adaptive_nb checkpoint.")
    return state


def _check_fits(
    state: dict[str, Any],
    source: Path,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    fp16: bool,
) -> None:
    where = f"the checkpoint {str(source)!r}"
    own = model.state_dict()
    saved = state["model"]
    if set(own) != set(saved) or any(own[k].shape != saved[k].shape for k in own):
        missing = sorted(set(own) - set(saved))[:3]
        extra = sorted(set(saved) - set(own))[:3]
        raise UsageError(
            f"{where} was written for a different model (missing {missing}, unexpected "
            f"{extra}, or other shapes): resume with the same architecture."
        )
    groups = state["optimizer"]["param_groups"]
    if [len(g["params"]) for g in groups] != [len(g["params"]) for g in optimizer.param_groups]:
        raise UsageError(
            f"{where} was written for an optimizer over other parameters: build the same "
            "optimizer (same parameter groups) to resume."
        )
    if (state.get("scheduler") is None) != (scheduler is None):
        have = "has" if state.get("scheduler") is not None else "has no"
        raise UsageError(
            f"{where} {have} scheduler state: resume with the same scheduler option as the "
            "run that wrote it."
        )
    if (state.get("scaler") is None) == fp16:
        raise UsageError(
            f"{where} was written with another precision (fp16 or not): resume with the same "
            "precision option."
        )


def loader_generators(data: Any) -> list[torch.Generator]:
    """The DataLoader's own generators (``generator=``, its sampler's), if it has any."""
    found: list[torch.Generator] = []
    for obj in (
        data,
        getattr(data, "sampler", None),
        getattr(getattr(data, "batch_sampler", None), "sampler", None),
    ):
        gen = getattr(obj, "generator", None)
        if isinstance(gen, torch.Generator) and all(gen is not g for g in found):
            found.append(gen)
    return found


def rng_state(generators: list[torch.Generator] | None = None) -> dict[str, Any]:
    """Every RNG a training step may draw from (CUDA only when it is initialised), and the
    data loader's own generators."""
    np_state: tuple[Any, ...] = tuple(np.random.get_state(legacy=True))
    cuda_ready = torch.cuda.is_available() and torch.cuda.is_initialized()  # type: ignore[no-untyped-call]
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if cuda_ready else None,
        "python": random.getstate(),
        "numpy": (
            str(np_state[0]),
            torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)),
            int(np_state[2]),
            int(np_state[3]),
            float(np_state[4]),
        ),
        "loader": [g.get_state() for g in generators or []],
    }


def set_rng_state(state: dict[str, Any], generators: list[torch.Generator] | None = None) -> None:
    torch.set_rng_state(state["torch"])
    saved = state.get("loader") or []
    for gen, gen_state in zip(generators or [], saved, strict=False):
        gen.set_state(gen_state)
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))


class Checkpointing:
    """Writes a run's checkpoints and puts a resumed run back where it stopped."""

    def __init__(self, options: CheckpointOptions) -> None:
        self.options = options
        self.resume = options.resume
        self.epoch_rng: dict[str, Any] | None = None  # RNG at the start of the epoch
        self.position = (0, 0)  # (epoch, loader batches of it consumed) between steps
        self.generators: list[torch.Generator] = []  # the loader's own, if any
        self._saved_at: tuple[int, int, int] | None = None
        self.written: list[Path] = []
        self.rewound: dict[str, Any] | None = None  # a checkpoint the run went back to
        self.rewound_path: Path | None = None
        self.samples_at: dict[int, int] = {}  # the run's samples when each was written
        self._applied: dict[str, Any] | None = None

    @property
    def _source(self) -> dict[str, Any] | None:
        """The checkpoint the run starts from: the one rewound to, else the one resumed."""
        return self.rewound if self.rewound is not None else self.resume

    @property
    def enabled(self) -> bool:
        return self.options.directory is not None

    def due_after_step(self, step: int) -> bool:
        every = self.options.every
        return self.enabled and every is not None and step % every == 0

    def due_after_epoch(self) -> bool:
        return self.enabled and self.options.every is None

    def apply(self, run: Run) -> None:
        """Load the checkpoint being resumed (or rewound to) into the run, before its first
        step (once: a second call for the same checkpoint changes nothing)."""
        state = self._source
        if state is None or state is self._applied:
            return
        self._applied = state
        run.model.load_state_dict(state["model"])
        run.optimizer.load_state_dict(state["optimizer"])
        sched = run.training.schedule.scheduler
        if sched is not None:
            sched.load_state_dict(state["scheduler"])
        scaler = run.training.precision.scaler
        if scaler is not None and hasattr(scaler, "load_state_dict"):
            scaler.load_state_dict(state["scaler"])
        hist = run.training.history
        saved = state["history"]
        hist.lr = list(saved["lr"])
        hist.grad_norm = list(saved["grad_norm"])
        hist.evaluations = [dict(e) for e in saved["evaluations"]]
        hist.nonfinite_skipped_steps = int(saved["nonfinite_skipped_steps"])
        hist.amp_skipped_steps = int(saved["amp_skipped_steps"])
        run.step = int(state["step"])
        run.epoch = int(state["epoch"])
        pos = int(state["position"])
        self.position = (run.epoch, pos)  # until the data moves on, this is where the run is
        self.epoch_rng = state["epoch_rng"]
        self._saved_at = (run.step, run.epoch, pos)  # and this checkpoint exists
        self.generators = loader_generators(run.data)
        set_rng_state(state["epoch_rng"] if pos > 0 else state["rng"], self.generators)

    def skip_to(self) -> tuple[int, int]:
        """(epoch to start at, loader batches of it to skip) for a resumed run."""
        state = self._source
        if state is None:
            return 0, 0
        return int(state["epoch"]), int(state["position"])

    def skipped(self) -> None:
        """The consumed batches are skipped: from now on the RNG runs as it did."""
        state = self._source
        assert state is not None
        set_rng_state(state["rng"], self.generators)

    def restart_point(self) -> tuple[dict[str, Any], Path | None] | None:
        """The newest checkpoint of this run to go back to (the one it wrote last, else the
        one it resumed from) with its path, or None."""
        if self.written:
            return _load(self.written[-1]), self.written[-1]
        if self.resume is not None:
            return self.resume, self.options.resume_path
        return None

    def rewind(self, run: Run, state: dict[str, Any], path: Path | None) -> None:
        """Put the run back to ``state`` (a checkpoint of this training): model, optimizer,
        scheduler, history, step and position, RNG; the data is then walked again from
        the start of its epoch, skipping what the checkpoint had consumed."""
        self.rewound, self.rewound_path = state, path
        self.apply(run)

    def start_epoch(self, epoch: int, data: Any) -> None:
        """A pass over the data begins (the loader iterator is about to be created)."""
        self.position = (epoch, 0)
        if self.enabled:
            self.generators = loader_generators(data)
            self.epoch_rng = rng_state(self.generators)

    def end_epoch(self, epoch: int) -> None:
        """Epoch ``epoch`` and its end (evaluation, scheduler, callbacks) are done."""
        self.position = (epoch + 1, 0)

    def save(self, run: Run, *, initial: bool = False) -> Path | None:
        """Write a checkpoint of the run now; None if this one was written already (or at
        step 0, unless ``initial``: the state a restart can go back to before any other)."""
        directory = self.options.directory
        if directory is None or (run.step == 0 and not initial):
            return None
        epoch, position = self.position
        key = (run.step, epoch, position)
        if key == self._saved_at:
            return None
        run.state_home()  # an engine whose ranks hold the state brings it home first
        now = rng_state(self.generators)
        hist = run.training.history
        scaler = run.training.precision.scaler
        sched = run.training.schedule.scheduler
        state = {
            "format": FORMAT,
            "step": run.step,
            "epoch": epoch,
            "position": position,
            "model": run.model.state_dict(),
            "optimizer": run.optimizer.state_dict(),
            "scheduler": sched.state_dict() if sched is not None else None,
            "scaler": scaler.state_dict()
            if scaler is not None and hasattr(scaler, "state_dict")
            else None,
            "rng": now,
            "epoch_rng": now if position == 0 or self.epoch_rng is None else self.epoch_rng,
            "history": {
                "lr": list(hist.lr),
                "grad_norm": list(hist.grad_norm),
                "evaluations": [dict(e) for e in hist.evaluations],
                "nonfinite_skipped_steps": hist.nonfinite_skipped_steps,
                "amp_skipped_steps": hist.amp_skipped_steps,
            },
        }
        directory.mkdir(parents=True, exist_ok=True)
        final = directory / f"step-{run.step:09d}.pt"
        tmp = directory / f".{final.name}.tmp-{os.getpid()}"
        try:
            with open(tmp, "wb") as fh:
                torch.save(state, fh)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, final)
        finally:
            if tmp.exists():
                tmp.unlink()
        self._saved_at = key
        self.samples_at[run.step] = run.samples
        self.written.append(final)
        self._prune(directory)
        return final

    def _prune(self, directory: Path) -> None:
        found = sorted(p for p in directory.iterdir() if _NAME.match(p.name))
        for old in found[: -self.options.keep]:
            old.unlink(missing_ok=True)
