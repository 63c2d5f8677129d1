"""H2O (Zhang et al. 2023): heavy hitters by accumulated attention + the most recent tokens.

`recent_frac` of the budget goes to the latest tokens; the rest to the tokens that have received the
most attention so far (summed over layers, heads and steps). One set for all layers (our cache is
uniform across layers), which measured 36.1 ppl against 33.4 for per-layer sets on SmolLM2."""

from __future__ import annotations

from dataclasses import dataclass

from .base import BIG, Policy, SlotView, recent


@dataclass
class H2OPolicy(Policy):
    name = "h2o"
    knobs = ("recent_frac",)
    needs_mass = True

    def keep_scores(self, view: SlotView):
        local = recent(view, max(1, int(self.cfg.cache_size * self.cfg.recent_frac)))
        return view.mass.double() + BIG * local
