"""Ray Train as an engine (``engine="ray"``): the DDP engine's kernel side and rank code
driving ``ray.train.torch.TorchTrainer`` workers through a hub actor (:mod:`.hub`),
restarting from Ray Train checkpoints with the steps after them replayed (:mod:`.engine`).

``ray`` itself is imported only when a run starts (it is an optional extra,
``pip install adaptive_nb[ray]``)."""

from __future__ import annotations

from .cluster import RayConnection, check_auth_mode
from .engine import RayEngine
from .group import GroupRestarted, RayGroup

__all__ = ["GroupRestarted", "RayConnection", "RayEngine", "RayGroup", "check_auth_mode"]
