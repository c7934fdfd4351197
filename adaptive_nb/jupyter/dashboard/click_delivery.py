"""Can a dashboard click reach the kernel while the training cell is still running?

Only with ipykernel 7 (kernel subshells, and comm messages routed to the subshell the
frontend chose: ``BaseComm._reply_subshell_for``, which
:func:`~.controls.accept_on_frontend_subshell` relies on) *and* JupyterLab >= 4.4
(``commsOverSubshells``). Otherwise the click waits in the kernel's queue until the cell
ends, so a Pause or Stop on a foreground run acts only after training is over. The
kernel side can be detected here; the frontend's version cannot be seen from the kernel.
The dashboard says so instead of ignoring clicks silently; a background run
(``--background``) is unaffected, its cell has already ended.
"""

from __future__ import annotations

import importlib.metadata

__all__ = ["DELIVERY_NOTE", "clicks_during_cell"]

DELIVERY_NOTE = (
    "This kernel ({why}) takes widget clicks only after the running cell ends: the controls "
    "act after the cell. Use <code>--background</code> (or <code>adaptive_nb.start</code>) "
    "for live control."
)


def clicks_during_cell() -> tuple[bool | None, str]:
    """``(True, "")`` when the kernel can deliver clicks during a cell; ``(False, why)``
    when it cannot; ``(None, "")`` outside a kernel (plain IPython, scripts)."""
    try:
        from ipykernel.kernelbase import Kernel
    except ImportError:
        return None, ""
    if not Kernel.initialized():
        return None, ""
    try:
        version = importlib.metadata.version("ipykernel")
        major = int(version.split(".")[0])
    except (importlib.metadata.PackageNotFoundError, ValueError):
        return None, ""
    if major < 7:
        return False, f"ipykernel {version}, before 7"
    try:
        from ipykernel.comm.comm import BaseComm
    except ImportError:
        return False, f"ipykernel {version} without comm routing"
    if not hasattr(BaseComm, "_reply_subshell_for"):
        return False, f"ipykernel {version} without comm routing to subshells"
    return True, ""
