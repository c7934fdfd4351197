"""The real-workload example notebooks run headless in their short form and do what they say.

Each runs on this interpreter's kernelspec with ``ADAPTIVE_NB_EXAMPLE_FAST=1`` in a copy of
``examples/`` under the test's temporary folder, so their ``../build`` output (reports,
checkpoints) lands there, not in the checkout. The assertions read the exported reports and
the lines the notebooks print; the thresholds are far from what the seeded short runs reach
(digits: ~98% validation accuracy; transformer: training loss ~4.2 → ~2.8)."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import nbformat
import pytest
import torch
from conftest import NotebookKernel

from adaptive_nb import RunReport
from adaptive_nb.engine.replica_loss import gather_weighted

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Executed:
    text: str  # every stream output, in order
    html: list[str]  # every text/html output
    build: Path  # the notebook's ../build


def execute(name: str, tmp_path: Path, kernel: NotebookKernel) -> Executed:
    out, work = tmp_path / "out", tmp_path / "examples"
    env = kernel.env()
    env["ADAPTIVE_NB_EXAMPLE_FAST"] = "1"
    subprocess.run(
        [
            sys.executable,
            str(ROOT / "examples" / "execute.py"),
            str(ROOT / "examples" / f"{name}.ipynb"),
            str(out),
            "--kernel",
            kernel.name,
            "--workdir",
            str(work),
        ],
        check=True,
        timeout=600,
        env=env,
    )
    nb = nbformat.read(out / f"{name}.ipynb", as_version=4)
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    errors = [o for o in outputs if o.get("output_type") == "error"]
    assert not errors, errors[0].get("evalue")
    text = "\n".join(o.get("text", "") for o in outputs)
    html = [o["data"]["text/html"] for o in outputs if "text/html" in o.get("data", {})]
    return Executed(text=text, html=html, build=tmp_path / "build")


def number_after(pattern: str, text: str) -> list[float]:
    found = re.search(pattern, text)
    assert found, f"{pattern!r} not in the notebook's output:\n{text[-2000:]}"
    return [float(g) for g in found.groups()]


def test_digits_cnn_trains_stops_resumes_and_learns(
    tmp_path: Path, nb_kernel: NotebookKernel
) -> None:
    nb = execute("digits_cnn", tmp_path, nb_kernel)
    first = RunReport.from_json(nb.build / "digits_cnn_first_part.json")
    resumed = RunReport.from_json(nb.build / "digits_cnn_report.json")
    train_images, batches, epochs = 1797 - 360, 23, 4  # the notebook's split and FAST form
    half = epochs * batches // 2 + batches // 3
    assert first.summary["ended"] == "completed" and first.summary["steps"] == half
    # the second run picked up the first one's last checkpoint, mid-epoch
    resumed_at = [e.detail for e in resumed.events if e.detail.startswith("resumed from")]
    assert len(resumed_at) == 1 and f"step-{half:09d}.pt at step {half} " in resumed_at[0]
    assert resumed.summary["ended"] == "completed"
    assert resumed.summary["steps"] == epochs * batches
    # no batch lost or trained twice across the stop: the two parts add up to the epochs
    assert first.summary["samples"] + resumed.summary["samples"] == epochs * train_images
    # one evaluation per epoch, the history carried over from the first part
    assert [e["epoch"] for e in resumed.evaluations] == list(range(epochs))
    # warm-up then cosine decay, one learning rate per applied step
    lrs = resumed.lr
    assert len(lrs) == epochs * batches
    assert lrs[0] < max(lrs) / 5 and lrs[-1] < max(lrs) / 100
    assert resumed.summary["grad_norm_max"] is not None  # --clip-grad-norm measured the norms
    (accuracy,) = number_after(r"final validation accuracy: ([\d.]+)", nb.text)
    assert accuracy > 0.8  # chance is 0.1; the seeded short run reaches ~0.98
    assert any("adaptive_nb run report" in h for h in nb.html)


def test_tiny_transformer_returns_its_own_loss_and_the_loss_falls(
    tmp_path: Path, nb_kernel: NotebookKernel
) -> None:
    nb = execute("tiny_transformer", tmp_path, nb_kernel)
    report = RunReport.from_json(nb.build / "tiny_transformer_report.json")
    assert report.summary["ended"] == "completed" and report.summary["steps"] == 50
    assert report.summary["precision"] == "bf16"
    assert [e["step"] for e in report.evaluations] == [25, 50]
    first, last = number_after(
        r"training loss: first \d+ steps ([\d.]+), last \d+ steps ([\d.]+)", nb.text
    )
    assert last < first - 0.5  # ~4.2 → ~2.8 in the seeded short run
    before, after = number_after(r"validation loss: before ([\d.]+), after ([\d.]+)", nb.text)
    assert after < before - 0.5
    assert report.evaluations[-1]["metrics"]["val_loss"] == pytest.approx(after, abs=1e-3)
    # --log tensorboard:DIR streamed every applied step's loss and both evaluations
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(nb.build / "tensorboard" / "tiny_transformer"), {"scalars": 0})
    acc.Reload()
    assert [e.step for e in acc.Scalars("loss")] == list(range(1, 51))
    assert [e.value for e in acc.Scalars("eval/val_loss")] == pytest.approx(
        [e["metrics"]["val_loss"] for e in report.evaluations], rel=1e-5
    )


def test_resnet_throughput_reports_devices_shares_and_throughput(
    tmp_path: Path, nb_kernel: NotebookKernel
) -> None:
    nb = execute("resnet_throughput", tmp_path, nb_kernel)
    report = RunReport.from_json(nb.build / "resnet_throughput_report.json")
    assert report.summary["ended"] == "completed" and report.summary["steps"] == 16
    assert len(report.info.devices) >= 1
    assert report.summary["samples_per_s"] > 0
    assert report.timeline
    for rec in report.timeline:
        assert sum(rec.shares.values()) == pytest.approx(1.0)
    (devices,) = number_after(r"devices: (\d+)", nb.text)
    assert devices == len(report.info.devices)
    (throughput,) = number_after(r"throughput: ([\d.]+) samples/s", nb.text)
    assert throughput > 0
    if torch.cuda.is_available():
        assert re.search(r"ran on \d+ GPU\(s\): GPU", nb.text)
    else:
        assert "ran on CPU" in nb.text
    assert "samples/s  shares of the batch" in nb.text  # the timeline table


# --- the example networks themselves (examples/models.py), in-process -------------------


def example_models() -> ModuleType:
    """``examples/models.py`` under a name of its own (no ``models`` on ``sys.path``)."""
    name = "adaptive_nb_example_models"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / "models.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses look their module up while decorating
        spec.loader.exec_module(module)
    return sys.modules[name]


def test_char_transformer_is_causal() -> None:
    models = example_models()
    torch.manual_seed(0)
    net = models.CharTransformer(vocab=20, context=12, d_model=16, heads=2, layers=2).eval()
    ids = torch.randint(0, 20, (2, 12))
    changed = ids.clone()
    changed[:, 7:] = (changed[:, 7:] + 1) % 20  # only the characters from position 7 on
    with torch.no_grad():
        a, b = net(ids).logits, net(changed).logits
    torch.testing.assert_close(a[:, :7], b[:, :7])  # earlier positions never see later ones
    assert not torch.allclose(a[:, 7:], b[:, 7:])


def test_char_transformer_loss_combines_across_replicas_as_the_full_batch_loss() -> None:
    """What weighted DataParallel does with the model's own ``LMOutput.loss``: each
    replica's mean loss weighted by its share of the batch is the full batch's loss."""
    models = example_models()
    torch.manual_seed(0)
    net = models.CharTransformer(vocab=20, context=10, d_model=16, heads=2, layers=1).eval()
    ids, labels = torch.randint(0, 20, (8, 10)), torch.randint(0, 20, (8, 10))
    with torch.no_grad():
        full = net(input_ids=ids, labels=labels)
        parts = [net(input_ids=ids[s], labels=labels[s]) for s in (slice(0, 3), slice(3, 8))]

    # nn.DataParallel's gather: concatenate along the batch, scalars stacked into a vector
    def gather(ts: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat([t.unsqueeze(0) if t.dim() == 0 else t for t in ts])

    combined = gather_weighted(parts, [3 / 8, 5 / 8], gather)
    assert isinstance(combined, models.LMOutput) and combined.loss.dim() == 0
    torch.testing.assert_close(combined.loss, full.loss)
    torch.testing.assert_close(combined.logits, full.logits, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("width", [4, 8])
def test_resnet18_has_resnet18s_layout_and_classifies_small_images(width: int) -> None:
    models = example_models()
    net = models.resnet18(classes=10, width=width)
    blocks = [m for m in net.modules() if isinstance(m, models.BasicBlock)]
    convs = [m for m in net.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(blocks) == 8  # 2 + 2 + 2 + 2
    assert len(convs) == 1 + 16 + 3  # stem, two per block, three projection shortcuts
    assert net(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    assert models.DigitsCNN(width=width)(torch.randn(3, 1, 8, 8)).shape == (3, 10)
