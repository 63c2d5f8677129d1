"""Strided attention (Child et al. 2019): a local window plus every s-th earlier token.

The budget is split: `recent_frac` of m for the local window, the rest for the latest tokens whose
position is a multiple of `stride`; anything left over goes to recency."""

from __future__ import annotations

from dataclasses import dataclass

from .base import BIG, Policy, SlotView, recent


@dataclass
class StridedPolicy(Policy):
    name = "strided"
    knobs = ("stride", "recent_frac")

    def keep_scores(self, view: SlotView):
        local = recent(view, max(1, int(self.cfg.cache_size * self.cfg.recent_frac)))
        on_stride = view.pos % self.cfg.stride == 0
        return view.pos.double() + BIG * on_stride + 2 * BIG * local
