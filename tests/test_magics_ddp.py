"""``%%adaptive_train --engine ddp``: the cell body and the notebook variables it uses
travel to the rank processes (a model class and a loss function defined in the notebook
included); a variable that cannot travel is refused by name before anything starts."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from ddp_support import worker_children
from IPython.core.error import UsageError as IPythonUsageError
from IPython.core.interactiveshell import InteractiveShell

from adaptive_nb import RunReport

pytestmark = pytest.mark.timeout(180)

SETUP = """
import torch
from torch import nn

class Net(nn.Module):          # defined in the notebook: travels by value
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))
    def forward(self, x):
        return self.body(x)

def smooth_ce(logits, y):      # a notebook function the cell uses
    return nn.functional.cross_entropy(logits, y, label_smoothing=0.1)

g = torch.Generator().manual_seed(0)
loader = [(torch.randn(10, 6, generator=g), torch.randint(0, 3, (10,), generator=g))
          for _ in range(4)]
torch.manual_seed(3); net = Net()
opt = torch.optim.SGD(net.parameters(), lr=0.1)
torch.manual_seed(3); ref = Net()
ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1)
for xb, yb in loader:
    ref_opt.zero_grad(); smooth_ce(ref(xb), yb).backward(); ref_opt.step()
"""

BODY = "x, y = batch\nloss = smooth_ce(model(x), y)\n"
OPTS = "--model net --optimizer opt --data loader --no-widget --engine ddp --workers 2"


@pytest.fixture
def ip() -> Iterator[InteractiveShell]:
    shell = InteractiveShell.instance()
    shell.run_line_magic("load_ext", "adaptive_nb")
    shell.run_cell(SETUP)
    yield shell
    for name in (
        "Net",
        "smooth_ce",
        "g",
        "loader",
        "net",
        "opt",
        "ref",
        "ref_opt",
        "handle",
        "xb",
        "yb",
    ):
        shell.user_ns.pop(name, None)


def test_cell_body_and_notebook_definitions_run_on_ddp_ranks(ip: InteractiveShell) -> None:
    report = ip.run_cell_magic("adaptive_train", OPTS, BODY)
    assert isinstance(report, RunReport)
    assert report.summary["ended"] == "completed" and report.summary["steps"] == 4
    net, ref = ip.user_ns["net"], ip.user_ns["ref"]
    for p, q in zip(net.parameters(), ref.parameters(), strict=True):
        assert torch.allclose(p, q, atol=1e-6)
    assert "loss" not in ip.user_ns and "x" not in ip.user_ns
    assert worker_children() == []


def test_a_variable_that_cannot_travel_is_named_before_anything_starts(
    ip: InteractiveShell, tmp_path: Path
) -> None:
    handle = open(tmp_path / "log.txt", "w")  # noqa: SIM115 - the point is an open file
    ip.user_ns["handle"] = handle
    before = [p.detach().clone() for p in ip.user_ns["net"].parameters()]
    try:
        with pytest.raises(IPythonUsageError, match=r"`handle` \(TextIOWrapper\) cannot be sent"):
            ip.run_cell_magic("adaptive_train", OPTS, BODY + "handle.write('step\\n')\n")
    finally:
        handle.close()
    after = list(ip.user_ns["net"].parameters())
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))
    assert worker_children() == []


def test_max_restarts_reaches_the_run_and_needs_a_checkpoint_directory(
    ip: InteractiveShell,
) -> None:
    with pytest.raises(IPythonUsageError, match=r"needs checkpoint_dir \(--checkpoint DIR\)"):
        ip.run_cell_magic("adaptive_train", OPTS + " --max-restarts 1", BODY)
    assert worker_children() == []
