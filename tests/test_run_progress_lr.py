"""The text progress line shows the learning rate; evaluations and skipped steps are
printed as lines."""

from __future__ import annotations

import io

import torch
from conftest import ce_step, make_data, make_model

import adaptive_nb
from adaptive_nb.events import Event, EventKind, Progress
from adaptive_nb.run.progress_text import TextProgress


def test_progress_line_shows_the_lr_and_eval_events_are_printed() -> None:
    out = io.StringIO()
    text = TextProgress(stream=out, interval_s=0.0)
    text.on_progress(Progress(3, 10, 0, 48, 1.0, 48.0, 2.0, 0.5, lr=0.0125))
    text.on_event(Event(1.0, EventKind.EVAL, "evaluate after step 3: val_loss 0.4", 3))
    text.on_event(Event(1.0, EventKind.NONFINITE, "gradient norm is nan: step skipped", 3))
    shown = out.getvalue()
    assert "lr 0.0125" in shown
    assert "eval: evaluate after step 3" in shown and "nonfinite: gradient norm" in shown


def test_the_run_reports_the_current_lr_to_its_observers() -> None:
    seen: list[float | None] = []

    class Watch(TextProgress):
        def on_progress(self, progress: Progress) -> None:
            seen.append(progress.lr)

    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    adaptive_nb.train(
        ce_step,
        model=model,
        optimizer=opt,
        data=make_data(),
        devices="cpu",
        scheduler=sched,
        observers=[Watch(stream=io.StringIO())],
    )
    assert seen[-1] == 0.1 * 0.5**6  # the lr after the last scheduler step
