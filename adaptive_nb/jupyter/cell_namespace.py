"""The namespace the ``%%adaptive_train`` cell body runs in, and the step built from it.

The body reads the notebook's variables but writes into a dict of the run's own
(:class:`RunNamespace`): a background run must never overwrite the user's ``model``,
``batch`` or ``loss`` from its worker thread, and a ``model`` the user reassigns while it
trains must stay theirs. ``exec`` accepts only a real dict as globals, so the run's
namespace is a dict subclass whose ``__missing__`` reads the notebook's namespace; CPython
looks globals up with ``PyObject_GetItem`` when they are not an exact dict, which honours
``__missing__`` for module-level names, functions, lambdas and comprehensions alike
(``tests/test_cell_namespace.py`` checks it on this interpreter).

What the body assigned after the last step is kept explicitly (:meth:`CellStep.last_step`,
shown as ``_adaptive.last_step``), never copied into the notebook.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import CodeType
from typing import Any

import torch
from torch import nn

from ..errors import UsageError

__all__ = ["CellStep", "RunNamespace", "attach_last_step"]


class RunNamespace(dict[str, Any]):
    """A run's own globals: names it assigns live here, other names are read from the
    notebook's namespace at the moment the body reads them (so a helper function the user
    redefines meanwhile is seen, as in a plain loop)."""

    def __init__(self, fallback: Mapping[str, Any]) -> None:
        super().__init__()
        self._fallback = fallback

    def __missing__(self, key: str) -> Any:
        return self._fallback[key]


class _RawCallGuard:
    """Notices the body calling the raw module outside the wrapper's forward.

    A forward pre-hook on the wrapper counts wrapper forwards in progress; one on the raw
    module flags a call made while none is (replicas share the raw module's hook dict, so
    the wrapper's own calls of its replicas count as inside)."""

    def __init__(self, raw: nn.Module, wrapped: nn.Module) -> None:
        self.inside = 0
        self.direct = False
        self._handles = [
            wrapped.register_forward_pre_hook(self._enter),
            wrapped.register_forward_hook(self._leave, always_call=True),
            raw.register_forward_pre_hook(self._raw),
        ]

    def _enter(self, _module: nn.Module, _args: Any) -> None:
        self.inside += 1

    def _leave(self, _module: nn.Module, _args: Any, _out: Any) -> None:
        self.inside -= 1

    def _raw(self, _module: nn.Module, _args: Any) -> None:
        if self.inside <= 0:
            self.direct = True

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


class CellStep:
    """``step(model, batch) -> loss`` running the compiled cell body in a
    :class:`RunNamespace` of its own.

    ``raw`` is the user's module and ``raw_name`` the notebook variable holding it: when
    the engine wraps it (weighted DataParallel), the first step checks that the body
    called the wrapper (``model``), not the raw module, and raises a :class:`UsageError`
    before the loss is returned, so nothing is applied."""

    def __init__(
        self,
        code: CodeType,
        user_ns: Mapping[str, Any],
        *,
        loss_name: str,
        raw: nn.Module,
        raw_name: str,
    ) -> None:
        self.code = code
        self.namespace = RunNamespace(user_ns)
        self.loss_name = loss_name
        self._raw = raw
        self._raw_name = raw_name
        self._checked: set[int] = set()

    def __call__(self, wrapped: nn.Module, batch: Any) -> Any:
        ns = self.namespace
        ns["model"] = wrapped
        ns["batch"] = batch
        ns.pop(self.loss_name, None)
        if wrapped is self._raw or id(wrapped) in self._checked:
            exec(self.code, ns)
            return ns.get(self.loss_name)
        guard = _RawCallGuard(self._raw, wrapped)
        try:
            exec(self.code, ns)
        finally:
            guard.remove()
        if guard.direct:
            ns.pop(self.loss_name, None)  # the loss of a wrong call is not kept
            name = self._raw_name
            raise UsageError(
                f"the cell called `{name}(...)` directly; call `model(...)` so adaptive_nb "
                f"can split the batch across the devices (`model` is `{name}` as wrapped "
                "for the step). Nothing was trained."
            )
        self._checked.add(id(wrapped))
        return ns.get(self.loss_name)

    def last_step(self) -> dict[str, Any]:
        """What the body assigned, as the last step left it: ``batch`` and the body's own
        variables (tensors detached), ``loss`` as a float; not the wrapped ``model``."""
        out: dict[str, Any] = {}
        for key, value in dict.items(self.namespace):
            if key in ("model", "__builtins__"):
                continue
            if isinstance(value, torch.Tensor):
                value = value.detach()
                if key == self.loss_name and value.numel() == 1:
                    value = float(value.item())
            out[key] = value
        return out


def attach_last_step(report: Any, values: dict[str, Any]) -> None:
    """Put the body's last-step values on the report as ``report.last_step`` (a plain
    attribute: it stays in the notebook and is not part of the report's exports)."""
    if report is not None:
        report.last_step = values
