"""Files shipped with the package: trained controllers (controllers/<model>.safetensors: the paper's GRU;
scorers/<model>.safetensors: the v2 controller over received attention, adore/scorer.py)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..models import ModelInfo

HERE = Path(__file__).parent


def find_asset(info: ModelInfo, kind: str = "controllers") -> Path | None:
    """The shipped controller ("controllers") or v2 scorer ("scorers") for a model (its ModelInfo from
    adore.models.load_model), if one exists."""
    if not info.name:
        return None
    path = HERE / kind / f"{info.name.replace(':', '_')}.safetensors"
    return path if path.exists() else None
