"""The layers hold: nothing imports upward (not by ``import``, ``importlib`` or by a module
name in a string), there is no import loop, and a script that trains and renders a report
pulls in no Jupyter module."""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "adaptive_nb"

# Bottom up. A module belongs to the layer of its longest matching prefix; the package
# facade (``adaptive_nb/__init__.py``) is the composition root above every layer.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    (
        "errors and plain data types",
        (
            "adaptive_nb._version",
            "adaptive_nb.errors",
            "adaptive_nb.events",
            "adaptive_nb.step",
            "adaptive_nb.layout",
            "adaptive_nb.batches",
            "adaptive_nb.policies",
        ),
    ),
    ("monitor, predict", ("adaptive_nb.monitor", "adaptive_nb.predict")),
    ("plan", ("adaptive_nb.plan",)),
    ("engine", ("adaptive_nb.engine",)),
    ("run loop and report", ("adaptive_nb.run",)),
    ("sim, bench", ("adaptive_nb.sim", "adaptive_nb.bench")),
    ("jupyter", ("adaptive_nb.jupyter",)),
    ("facade", ("adaptive_nb",)),
]

FRONT_END_MODULES = (
    "adaptive_nb.jupyter",
    "IPython",
    "ipykernel",
    "ipywidgets",
    "bqplot",
    "jupyter_server",
    "jupyterlab",
)


def module_name(path: Path, root: Path = PACKAGE) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def layer_of(module: str) -> int:
    best: tuple[int, int] | None = None  # (prefix length, layer)
    for index, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and (
                best is None or len(prefix) > best[0]
            ):
                best = (len(prefix), index)
    if best is None:
        raise AssertionError(f"{module} is in no layer: add it to LAYERS")
    return best[1]


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def imports_of(
    source: str, module: str, is_package: bool, known: set[str]
) -> list[tuple[str, bool]]:
    """``(target module, typing_only)`` for every import of ``source`` into the package:
    ``import`` statements (relative ones resolved), ``import_module`` / ``__import__``
    calls with literal names, and any string constant that names a package module."""
    package = module if is_package else module.rpartition(".")[0]
    tree = ast.parse(source)
    typing_only: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and _is_type_checking(node):
            for inner in node.body:
                typing_only.update(id(n) for n in ast.walk(inner))
    found: list[tuple[str, bool]] = []

    def add(target: str, node: ast.AST) -> None:
        if target == "adaptive_nb" or target.startswith("adaptive_nb."):
            # the deepest known module named by the target (a name imported from a module
            # is not a module)
            while target not in known and "." in target:
                target = target.rpartition(".")[0]
            found.append((target, id(node) in typing_only))

    def resolve(level: int, name: str | None) -> str:
        base = package.split(".")
        if level > 1:
            base = base[: len(base) - (level - 1)]
        return ".".join([*base, name] if name else base)

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name, node)
        elif isinstance(node, ast.ImportFrom):
            origin = resolve(node.level, node.module) if node.level else (node.module or "")
            for alias in node.names:
                add(f"{origin}.{alias.name}", node)
        elif isinstance(node, ast.Call):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if name in {"import_module", "__import__"} and node.args:
                first = node.args[0]
                if isinstance(first, ast.Constant) and isinstance(first.value, str):
                    text = first.value
                    add(
                        resolve(len(text) - len(text.lstrip(".")), text.lstrip("."))
                        if text.startswith(".")
                        else text,
                        node,
                    )
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            text = node.value
            if text.startswith("adaptive_nb.") and text in known and text != module:
                add(text, node)  # (the bare "adaptive_nb" is also the logger's name)
    return [(t, typing) for t, typing in found if t != module]


def package_graph(root: Path = PACKAGE) -> dict[str, list[tuple[str, bool]]]:
    files = {module_name(p, root): p for p in root.rglob("*.py")}
    known = set(files)
    return {
        name: imports_of(path.read_text(encoding="utf-8"), name, path.name == "__init__.py", known)
        for name, path in files.items()
    }


def upward_edges(graph: dict[str, list[tuple[str, bool]]]) -> list[str]:
    bad = []
    for source, targets in graph.items():
        for target, _ in targets:
            if layer_of(target) > layer_of(source):
                bad.append(
                    f"{source} ({LAYERS[layer_of(source)][0]}) imports {target} "
                    f"({LAYERS[layer_of(target)][0]})"
                )
    return sorted(set(bad))


def import_cycles(graph: dict[str, list[tuple[str, bool]]]) -> list[list[str]]:
    """Cycles among run-time imports (``if TYPE_CHECKING:`` imports run at no time).
    A package's ``__init__`` is imported before any of its submodules, which is not
    an edge here: only what a module's own code imports."""
    edges = {m: sorted({t for t, typing in ts if not typing}) for m, ts in graph.items()}
    cycles: list[list[str]] = []
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for t in edges.get(m, []):
            if state.get(t) == 1:
                cycles.append([*stack[stack.index(t) :], t])
            elif t not in state:
                visit(t)
        stack.pop()
        state[m] = 2

    for m in sorted(edges):
        if m not in state:
            visit(m)
    return cycles


# -- the checker itself catches what it must ------------------------------------------------


def _fake_package(tmp_path: Path, files: dict[str, str]) -> Path:
    root = tmp_path / "adaptive_nb"
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text), encoding="utf-8")
    for d in [root, *(p for p in root.rglob("*") if p.is_dir())]:
        (d / "__init__.py").touch()
    return root


@pytest.mark.parametrize(
    "body",
    [
        "from ..jupyter import magics\n",
        "import adaptive_nb.jupyter.magics\n",
        "from importlib import import_module\nimport_module('adaptive_nb.jupyter')\n",
        "import importlib\nimportlib.import_module('..jupyter', __package__)\n",
        "NAME = 'adaptive_nb.jupyter.magics'\n",
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from ..jupyter import magics\n",
    ],
)
def test_checker_catches_every_kind_of_upward_import(tmp_path: Path, body: str) -> None:
    root = _fake_package(tmp_path, {"run/loop.py": body, "jupyter/magics.py": ""})
    bad = upward_edges(package_graph(root))
    assert bad and bad[0].startswith(
        "adaptive_nb.run.loop (run loop and report) imports adaptive_nb.jupyter"
    )


def test_checker_finds_an_import_loop(tmp_path: Path) -> None:
    root = _fake_package(
        tmp_path,
        {"run/report.py": "from . import loop\n", "run/loop.py": "from .report import RunReport\n"},
    )
    cycles = import_cycles(package_graph(root))
    assert cycles and set(cycles[0]) == {"adaptive_nb.run.loop", "adaptive_nb.run.report"}


def test_checker_allows_downward_imports(tmp_path: Path) -> None:
    root = _fake_package(
        tmp_path,
        {
            "jupyter/magics.py": "from ..run.loop import Run\n",
            "run/loop.py": "from ..errors import UsageError\n",
            "errors.py": "",
        },
    )
    graph = package_graph(root)
    assert ("adaptive_nb.run.loop", False) in graph["adaptive_nb.jupyter.magics"]
    assert upward_edges(graph) == [] and import_cycles(graph) == []


# -- the package -------------------------------------------------------------------------


def test_every_module_is_in_a_layer() -> None:
    for module in package_graph():
        layer_of(module)


def test_no_module_imports_a_higher_layer() -> None:
    assert upward_edges(package_graph()) == []


def test_no_import_loops() -> None:
    assert import_cycles(package_graph()) == []


def _fresh_interpreter(code: str) -> list[str]:
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            textwrap.dedent(code)
            + f"\nFRONT = {FRONT_END_MODULES!r}\n"
            + "print(sorted(m for m in sys.modules"
            + " if any(m == f or m.startswith(f + '.') for f in FRONT)))",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    last: list[str] = eval(out.stdout.strip().splitlines()[-1])  # a printed list of names
    return last


def test_training_and_rendering_a_report_import_no_front_end(tmp_path: Path) -> None:
    loaded = _fresh_interpreter(
        f"""
        import sys, torch
        import adaptive_nb
        torch.manual_seed(0)
        net = torch.nn.Linear(4, 2)
        opt = torch.optim.SGD(net.parameters(), lr=0.1)
        data = [(torch.randn(8, 4), torch.randint(0, 2, (8,))) for _ in range(3)]
        step = lambda m, b: torch.nn.functional.cross_entropy(m(b[0]), b[1])
        report = adaptive_nb.train(step, model=net, optimizer=opt, data=data, devices="cpu")
        assert report.summary["steps"] == 3
        text = repr(report) + report._repr_html_()
        assert "RunReport" in text and "<" in text
        report.to_json({str(tmp_path / "r.json")!r})
        report.to_csv({str(tmp_path / "r.csv")!r})
        """
    )
    assert loaded == []
    assert (tmp_path / "r.json").stat().st_size > 0 and (tmp_path / "r.csv").stat().st_size > 0


def test_simulated_fleet_run_imports_no_front_end() -> None:
    scenario = PACKAGE.parent / "benchmarks" / "scenarios" / "single_gpu.json"
    loaded = _fresh_interpreter(
        f"""
        import sys, torch
        import adaptive_nb
        net = torch.nn.Linear(4, 2)
        opt = torch.optim.SGD(net.parameters(), lr=0.1)
        data = [(torch.randn(8, 4), torch.randint(0, 2, (8,))) for _ in range(3)]
        step = lambda m, b: torch.nn.functional.cross_entropy(m(b[0]), b[1])
        report = adaptive_nb.train(step, model=net, optimizer=opt, data=data,
                                   devices="sim:{scenario}")
        assert report.summary["simulated"] and report.summary["steps"] == 3
        repr(report); report._repr_html_()
        """
    )
    assert loaded == []


def test_public_api_is_reexported() -> None:
    import adaptive_nb

    for name in adaptive_nb.__all__:
        assert hasattr(adaptive_nb, name), name


def test_server_extension_does_not_import_torch() -> None:
    code = "import sys, adaptive_nb.jupyter.server; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False", out.stderr
