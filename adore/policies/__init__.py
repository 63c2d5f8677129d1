"""KV policies behind one interface (base.Policy), one file each."""

from __future__ import annotations

from ..config import AdoreConfig, UserError
from .adore import AdoreNoControllerPolicy, AdoreNoRebuildPolicy, AdorePolicy
from .base import Policy, SlotView, select_keep
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
    """Build a policy by name. ADORE policies take a Controller, or the path of a controller
    checkpoint (.safetensors) to load (None: the engine supplies the default one for the model, see
    Engine). cfg may be any AdoreConfig, also one extended with other settings (EngineSpec,
    ServeArgs): the policy keeps only the knobs."""
    if name not in POLICIES:
        raise UserError(f"unknown policy {name!r}; known: {', '.join(POLICIES)}")
    cfg = cfg.adore_config() if cfg is not None else AdoreConfig()
    if isinstance(controller, str):
        controller = _load_controller(controller)
    cls = POLICIES[name]
    if cls.bounded and cfg.cache_size is None:
        raise UserError(f"policy {name!r} needs a cache size")
    if issubclass(cls, AdorePolicy):
        if controller is not None and cls.uses_controller and cfg.scorer != "controller":
            raise UserError(f"a controller was given, but {name}'s scorer is {cfg.scorer!r}: "
                            "set scorer to 'controller' to use it")
        return cls(cfg, controller=controller if cls.uses_controller else None)
    return cls(cfg)


def parse_policy_spec(spec: str, base: AdoreConfig | None = None) -> tuple[str, AdoreConfig, dict]:
    """'adore:top_k=none:rebuild=4' -> (policy name, config, extras {controller, adapter}): the
    benchmarks' way to name a setting. Any AdoreConfig field may be set (parsed by its type)."""
    from dataclasses import asdict

    from ..config import parse_knob

    name, *opts = spec.split(":")
    kw, extra = asdict(base if base is not None else AdoreConfig()), {}
    for o in opts:
        k, _, v = o.partition("=")
        if k in ("controller", "adapter"):
            extra[k] = v
        elif k in kw:
            kw[k] = parse_knob(k, v)
        else:
            raise UserError(f"unknown option {k!r} in policy spec {spec!r}")
    return name, AdoreConfig(**kw), extra


def policy_from_spec(spec: str, base: AdoreConfig | None = None, *, adapters: bool = True) -> Policy:
    """The policy a spec names (`parse_policy_spec`), with its controller file loaded if it gives one.
    adapters=False (a model with random weights, which no adapter was trained for): a spec that names an
    adapter is a UserError, not silently dropped."""
    name, cfg, extra = parse_policy_spec(spec, base)
    if "adapter" in extra and not adapters:
        raise UserError(f"{spec}: an adapter needs a trained model, not random weights")
    return make_policy(name, cfg, extra.get("controller"))


def _load_controller(path: str):
    import os

    from ..controller import Controller

    if not os.path.isfile(path):
        raise UserError(f"controller file not found: {path}")
    try:
        return Controller.load(path)
    except Exception as e:
        raise UserError(f"cannot load controller {path}: {e}") from None


__all__ = ["Policy", "SlotView", "select_keep", "POLICIES", "make_policy", "policy_names", "parse_policy_spec",
           "policy_from_spec"]
