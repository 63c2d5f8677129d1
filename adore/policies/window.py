"""Window attention: keep the last m tokens."""

from __future__ import annotations

from dataclasses import dataclass

from .base import Policy, SlotView


@dataclass
class WindowPolicy(Policy):
    name = "window"

    def keep_scores(self, view: SlotView):
        return view.pos.double()
