"""`adore train-controller` and `adore finetune` (registered by adore.cli)."""

from __future__ import annotations


def register(sub) -> None:
    """Add the training subcommands to the `adore` parser's subparsers."""
