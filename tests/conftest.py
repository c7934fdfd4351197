"""Shared fixtures: small models and data that train in milliseconds on CPU, and the
kernelspec every notebook test runs its kernels on."""

from __future__ import annotations

import json
import os
import secrets
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch import nn

os.environ.setdefault("JUPYTER_PLATFORM_DIRS", "1")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device (run on a GPU machine)")
    if not torch.cuda.is_available():
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _fresh_thread_memory() -> Iterator[None]:
    """Each test starts with no learned CPU thread counts (they live for the process, so one
    test's runs would otherwise decide whether another's probe)."""
    from adaptive_nb.plan.thread_probe import forget_learned

    forget_learned()
    yield
    forget_learned()


class TinyNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def make_data(
    n: int = 96, batch: int = 16, seed: int = 0
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g)
    y = torch.randint(0, 3, (n,), generator=g)
    return [(x[i : i + batch], y[i : i + batch]) for i in range(0, n, batch)]


def make_model(seed: int = 0) -> TinyNet:
    torch.manual_seed(seed)
    return TinyNet()


def ce_step(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = batch
    return nn.functional.cross_entropy(model(x), y)


@pytest.fixture
def tiny() -> Iterator[
    tuple[TinyNet, torch.optim.Optimizer, list[tuple[torch.Tensor, torch.Tensor]]]
]:
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    yield model, opt, make_data()


def params_of(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def same_params(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


# --- the test's own kernel ---------------------------------------------------------------


@dataclass(frozen=True)
class NotebookKernel:
    """A kernelspec that runs ``ipykernel`` on the interpreter running the tests.

    Notebook tests must not run on whichever ``python3`` kernel Jupyter finds first (a
    system or user kernelspec can point at another interpreter without this checkout's
    torch or adaptive_nb). ``jupyter_path`` is the ``share/jupyter`` folder holding
    ``kernels/<name>/kernel.json``; put it on ``JUPYTER_PATH`` (see :meth:`env`)."""

    name: str
    jupyter_path: Path

    def env(self, base: dict[str, str] | None = None) -> dict[str, str]:
        """``base`` (default: ``os.environ``) with ``jupyter_path`` first on JUPYTER_PATH."""
        env = dict(os.environ if base is None else base)
        rest = env.get("JUPYTER_PATH", "")
        env["JUPYTER_PATH"] = os.pathsep.join(p for p in (str(self.jupyter_path), rest) if p)
        return env

    def metadata(self) -> dict[str, str]:
        """The notebook's ``metadata.kernelspec`` naming this kernel."""
        return {"name": self.name, "display_name": self.name, "language": "python"}


def install_test_kernel(prefix: Path) -> NotebookKernel:
    """Write a uniquely named kernelspec for ``sys.executable`` under ``prefix``."""
    name = f"adaptive-nb-test-{os.getpid()}-{secrets.token_hex(4)}"
    share = prefix / "share" / "jupyter"
    spec_dir = share / "kernels" / name
    spec_dir.mkdir(parents=True)
    spec = {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": name,
        "language": "python",
    }
    (spec_dir / "kernel.json").write_text(json.dumps(spec, indent=1))
    return NotebookKernel(name=name, jupyter_path=share)


@pytest.fixture(scope="session")
def _nb_kernel_spec(tmp_path_factory: pytest.TempPathFactory) -> NotebookKernel:
    return install_test_kernel(tmp_path_factory.mktemp("kernelspec"))


@pytest.fixture
def nb_kernel(_nb_kernel_spec: NotebookKernel, monkeypatch: pytest.MonkeyPatch) -> NotebookKernel:
    """This interpreter's kernelspec, on ``JUPYTER_PATH`` for the test (and the servers and
    subprocesses it starts); pass ``nb_kernel.name`` as the kernel name."""
    monkeypatch.setenv("JUPYTER_PATH", _nb_kernel_spec.env()["JUPYTER_PATH"])
    return _nb_kernel_spec
