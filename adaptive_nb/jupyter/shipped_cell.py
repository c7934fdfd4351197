"""The ``%%adaptive_train`` cell body as a step function that travels to the rank
processes of ``--engine ddp`` and the Ray Train workers of ``--engine ray``.

The ranks are fresh Python processes: they cannot see the notebook's namespace. So the
body ships as its source plus the notebook variables it references (found from its
compiled code: every name it loads, nested functions and comprehensions included), each
pickled with cloudpickle — functions and classes defined in the notebook included. A
variable that cannot be pickled (an open file, a lock, a CUDA stream...) is refused before
anything starts, by name. Each rank runs the body in a namespace of its own made of those
variables plus ``model`` and ``batch``; what it assigns stays on the rank.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import CodeType
from typing import Any

import cloudpickle

from ..errors import UsageError

__all__ = ["ShippedCellStep", "referenced_names", "ship_cell"]

_FILENAME = "<%%adaptive_train cell>"


def referenced_names(code: CodeType) -> set[str]:
    """Every global name ``code`` (and the code nested in it) may load."""
    names = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, CodeType):
            names |= referenced_names(const)
    return names


class ShippedCellStep:
    """``step(model, batch) -> loss`` from the cell's source and its captured variables;
    picklable (the compiled code is rebuilt where it runs)."""

    def __init__(self, source: str, captured: dict[str, Any], loss_name: str) -> None:
        self.source = source
        self.captured = captured
        self.loss_name = loss_name
        self._code: CodeType | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {"source": self.source, "captured": self.captured, "loss_name": self.loss_name}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._code = None

    def last_step(self) -> dict[str, Any]:
        """The body's values stay on the ranks: nothing to show in the notebook."""
        return {}

    def __call__(self, model: Any, batch: Any) -> Any:
        if self._code is None:
            self._code = compile(self.source, _FILENAME, "exec")
        ns: dict[str, Any] = dict(self.captured)
        ns["model"] = model
        ns["batch"] = batch
        exec(self._code, ns)
        return ns.get(self.loss_name)


def ship_cell(
    source: str,
    user_ns: Mapping[str, Any],
    *,
    loss_name: str,
    skip: set[str],
    engine: str = "ddp",
) -> ShippedCellStep:
    """The cell as a :class:`ShippedCellStep`; UsageError naming a variable it references
    that cannot travel. ``skip``: names the run provides itself (``model``, ``batch``) or
    that are shipped anyway (the model, optimizer and data variables)."""
    code = compile(source, _FILENAME, "exec")
    wanted = referenced_names(code) - {"model", "batch", loss_name} - skip
    captured = {n: user_ns[n] for n in sorted(wanted) if n in user_ns and not n.startswith("__")}
    for name, value in captured.items():
        try:
            cloudpickle.dumps(value)
        except Exception as exc:
            raise UsageError(
                f"--engine {engine} ships the variables the cell uses to its worker processes, and "
                f"`{name}` ({type(value).__name__}) cannot be sent ({exc}). Create it inside "
                "the cell, or keep it out of the cell (e.g. pass a path instead of an open "
                "file)."
            ) from None
    return ShippedCellStep(source, captured, loss_name)
