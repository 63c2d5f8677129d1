"""Small learned modules saved as safetensors weights with their config in the file's metadata (the
paper's controller, adore/controller.py; the v2 scorer, adore/scorer.py)."""

from __future__ import annotations

import json
from dataclasses import asdict

from torch import nn


def save_module(module: nn.Module, kind: str, cfg, path: str, extra: dict | None = None) -> None:
    """Weights of module to path; cfg (a dataclass) under the metadata key `kind`."""
    from safetensors.torch import save_file

    meta = {kind: json.dumps(asdict(cfg)), "extra": json.dumps(extra or {})}
    save_file({k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}, path, meta)


def load_module(build, kind: str, path: str, device="cpu") -> nn.Module:
    """build(config dict) -> the module, its weights then loaded from path (in eval mode on device).
    A file without `kind` in its metadata is a ValueError naming what it is not."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(path, "pt") as f:
        meta = f.metadata() or {}
    if kind not in meta:
        raise ValueError(f"{path} is not an ADORE {kind.removeprefix('adore_')} checkpoint (no config in its metadata)")
    module = build(json.loads(meta[kind]))
    module.load_state_dict(load_file(path, device=str(device)))
    return module.to(device).eval()
