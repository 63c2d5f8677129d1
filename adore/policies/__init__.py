"""KV policies behind one interface (base.Policy), one file each."""

from __future__ import annotations

from ..config import AdoreConfig, UserError
from .adore import AdoreNoControllerPolicy, AdoreNoRebuildPolicy, AdorePolicy
from .base import Policy, SlotView
from .full import FullPolicy
from .h2o import H2OPolicy
from .sink import SinkPolicy
from .strided import StridedPolicy
from .window import WindowPolicy

POLICIES: dict[str, type[Policy]] = {p.name: p for p in (
    FullPolicy, WindowPolicy, StridedPolicy, SinkPolicy, H2OPolicy,
    AdorePolicy, AdoreNoRebuildPolicy, AdoreNoControllerPolicy)}


def policy_names() -> list[str]:
    return list(POLICIES)


def make_policy(name: str, cfg: AdoreConfig | None = None, controller=None) -> Policy:
    """Build a policy by name. ADORE policies take a Controller (None: the engine supplies the
    default one for the model, see Engine)."""
    if name not in POLICIES:
        raise UserError(f"unknown policy {name!r}; known: {', '.join(POLICIES)}")
    cfg = cfg or AdoreConfig()
    cls = POLICIES[name]
    if cls.bounded and cfg.cache_size is None:
        raise UserError(f"policy {name!r} needs a cache size")
    if issubclass(cls, AdorePolicy):
        return cls(cfg, controller=controller if cls.uses_controller else None)
    return cls(cfg)


__all__ = ["Policy", "SlotView", "POLICIES", "make_policy", "policy_names"]
