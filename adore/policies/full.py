"""Full attention: keep everything (the reference every other policy is measured against)."""

from __future__ import annotations

from dataclasses import dataclass

from .base import Policy, SlotView


@dataclass
class FullPolicy(Policy):
    name = "full"
    bounded = False

    def keep_scores(self, view: SlotView):
        return view.pos.double()
