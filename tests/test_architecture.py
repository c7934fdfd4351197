"""The core never imports Jupyter: importing and training from a script pulls in none of it."""

from __future__ import annotations

import subprocess
import sys
import textwrap

FRONT_END_MODULES = (
    "IPython",
    "ipywidgets",
    "bqplot",
    "jupyter_server",
    "ipykernel",
    "adaptive_nb.jupyter",
)


def test_core_imports_and_trains_without_jupyter() -> None:
    code = textwrap.dedent(
        """
        import sys, torch
        import adaptive_nb, adaptive_nb.monitor, adaptive_nb.plan.threads, adaptive_nb.report
        net = torch.nn.Linear(4, 2)
        opt = torch.optim.SGD(net.parameters(), lr=0.1)
        data = [(torch.randn(8, 4), torch.randint(0, 2, (8,))) for _ in range(3)]
        step = lambda m, b: torch.nn.functional.cross_entropy(m(b[0]), b[1])
        adaptive_nb.train(step, model=net, optimizer=opt, data=data)
        front = FRONT
        bad = [m for m in sys.modules if m.split(".")[0] in front or m.startswith(front[-1])]
        print(sorted(bad))
        """
    ).replace("FRONT", repr(FRONT_END_MODULES))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "[]", out.stdout + out.stderr


def test_public_api_is_reexported() -> None:
    import adaptive_nb

    for name in adaptive_nb.__all__:
        assert hasattr(adaptive_nb, name), name


def test_server_extension_does_not_import_torch() -> None:
    code = "import sys, adaptive_nb.jupyter.server; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False", out.stderr
