"""Files shipped with the package: trained controllers (controllers/<model>.safetensors)."""

from __future__ import annotations

from pathlib import Path

HERE = Path(__file__).parent


def find_controller(model) -> Path | None:
    """The shipped controller for a model loaded by adore.models.load_model, if one exists."""
    name = getattr(model, "adore_name", None)
    if not name:
        return None
    path = HERE / "controllers" / f"{name.replace(':', '_')}.safetensors"
    return path if path.exists() else None
