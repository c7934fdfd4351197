"""Text progress for --no-widget runs and scripts: one rewritten line, decisions, the end."""

from __future__ import annotations

import io
from typing import Any

from conftest import ce_step

import adaptive_nb
from adaptive_nb.events import Event, Progress, RunInfo
from adaptive_nb.run.progress_text import TextProgress, format_duration


def test_format_duration() -> None:
    assert format_duration(75.2) == "1:15"
    assert format_duration(3725) == "1:02:05"
    assert format_duration(None) == "?"


def test_progress_line_is_throttled_and_rewritten_in_place() -> None:
    out = io.StringIO()
    tp = TextProgress(stream=out, interval_s=3600)
    tp.on_start(RunInfo("r", 100, None, "adaptive", ["sim GPU 0 (A100)"], True, 64, 0.0))
    for step in range(1, 50):
        tp.on_progress(Progress(step, 100, 0, step * 64, step * 0.1, 640.0, 5.0, 0.5))
    tp.on_event(Event(3.0, "reallocate", "sim GPU 0: share 0.5 → 0.4", 30))
    tp.on_event(Event(3.0, "hold", "nothing to gain", 31))  # not shown: no change made
    text = out.getvalue()
    assert "(simulated)" in text.splitlines()[0]
    assert text.count("\rstep ") == 1  # one update per interval
    assert "step 1/100" in text and "ETA 0:05" in text and "loss 0.5" in text
    assert "[0:03] reallocate: sim GPU 0: share 0.5 → 0.4" in text
    assert "nothing to gain" not in text


def test_train_with_progress_prints_start_and_end(tiny: Any, capsys: Any) -> None:
    model, opt, data = tiny
    adaptive_nb.train(ce_step, model=model, optimizer=opt, data=data, steps=4, progress=True)
    out = capsys.readouterr().out
    assert out.startswith("adaptive_nb: training on cpu, policy adaptive, 4 steps")
    assert "\rstep " in out
    assert "adaptive_nb: completed after 4 steps" in out
