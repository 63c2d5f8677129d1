"""ADORE: adaptive token release with rebuild (Zhang et al. 2024).

Every step the controller scores every past position for the current token (cached or released).
Cached tokens are released lowest-score-first down to the budget m; the best released ones are
rebuilt (run through all layers again at their original positions, as extra query rows beside the
current token) so that a token released too early comes back. Each query row keeps its top-K keys.

Rebuild modes:
  every    the R best released tokens every step (the paper)
  promote  only released tokens whose score now beats the weakest cached token by promote_margin,
           at most R a step: on most steps few or none, so the R+1x row cost of rebuild is paid only
           when it matters. Without the margin a query-dependent controller keeps swapping near-tied
           tokens in and out (4.6 rebuilds a step on SmolLM2 for the same perplexity as 0.6 with it).

Ablations: `adore-norebuild` (R = 0) and `adore-nocontroller` (scores from a fixed prior, the first
`sink_tokens` positions then recency, instead of the learned controller).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..controller import Controller
from .base import BIG, Policy, SlotView


@dataclass
class AdorePolicy(Policy):
    name = "adore"
    uses_controller = True
    knobs = ("top_k", "rebuild", "rebuild_mode", "promote_margin", "protect_recent", "protect_sinks")
    controller: Controller | None = field(default=None, repr=False)

    @property
    def rebuild(self) -> int:
        return self.cfg.rebuild

    @property
    def top_k(self) -> int | None:
        return self.cfg.top_k

    def position_scores(self, feat_at: torch.Tensor | None, cur_pos: torch.Tensor,
                        query: torch.Tensor | None) -> torch.Tensor:
        """Score of every position 0..P-1 for each row's current token: [n, P], -inf after cur_pos.

        feat_at [n, P, S+1] stored controller features; query [n, S] the current tokens' queries."""
        n = cur_pos.shape[0]
        P = int(cur_pos.max()) + 1
        dist = cur_pos[:, None] - torch.arange(P, device=cur_pos.device)[None, :]
        raw = self.controller.score(query, feat_at[:n, :P], dist) if self.controller is not None else None
        return self.rule_scores(raw, dist)

    def rule_scores(self, raw: torch.Tensor | None, dist: torch.Tensor) -> torch.Tensor:
        """The policy's rules over the controller's scores raw [n, P] (None: the no-controller
        prior, sinks then recency); dist [n, P] = current position - position. [n, P], -inf ahead.
        The engine and the training metrics' simulation (adore/train/metrics.py) both score this way."""
        pos = torch.arange(dist.shape[1], device=dist.device)
        s = raw
        if s is None:
            s = (-dist).double() + BIG * (pos[None, :] < self.cfg.sink_tokens)
        if self.cfg.protect_recent:
            s = s.double() + BIG * (dist < self.cfg.protect_recent)
        if self.cfg.protect_sinks:
            s = s.double() + BIG * (pos[None, :] < self.cfg.protect_sinks)
        return s.masked_fill(dist < 0, float("-inf"))

    @property
    def static(self) -> bool:
        # rebuilt tokens get new K/V; the no-controller prior never promotes a released token
        return self.rebuild == 0 or (not self.uses_controller and self.cfg.rebuild_mode == "promote")

    def keep_scores(self, view: SlotView):
        return view.pos_scores.gather(1, view.pos.clamp(min=0))

    def choose_rebuild(self, pos_scores: torch.Tensor, released: torch.Tensor,
                       cached_min: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Pick released positions to rebuild.

        pos_scores [n, P]; released [n, P] bool; cached_min [n] the weakest cached token's score.
        Returns positions [n, r] and validity [n, r] (r <= R, the most any row rebuilds this step)."""
        n = pos_scores.shape[0]
        R = min(self.rebuild, pos_scores.shape[1])
        if R == 0:
            return pos_scores.new_zeros(n, 0, dtype=torch.long), pos_scores.new_zeros(n, 0, dtype=torch.bool)
        cand = released[:, : pos_scores.shape[1]]
        if self.cfg.rebuild_mode == "promote":
            cand = cand & (pos_scores > cached_min[:, None] + self.cfg.promote_margin)
        s = pos_scores.masked_fill(~cand, float("-inf"))
        top = s.topk(R, dim=1)
        ok = torch.isfinite(top.values)
        r = int(ok.sum(1).max()) if ok.any() else 0
        return top.indices[:, :r], ok[:, :r]


@dataclass
class AdoreNoRebuildPolicy(AdorePolicy):
    name = "adore-norebuild"

    @property
    def rebuild(self) -> int:
        return 0


@dataclass
class AdoreNoControllerPolicy(AdorePolicy):
    name = "adore-nocontroller"
    uses_controller = False
    knobs = (*AdorePolicy.knobs, "sink_tokens")
