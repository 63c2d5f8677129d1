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
from ..models import ModelInfo
from .base import BIG, Policy, SlotView


@dataclass
class AdorePolicy(Policy):
    name = "adore"
    uses_controller = True
    knobs = ("top_k", "rebuild", "rebuild_mode", "promote_margin", "protect_recent", "protect_sinks")
    controller: Controller | None = field(default=None, repr=False)
    embed: object = field(default=None, repr=False)  # the LLM's token embedding (bind)

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

    # -- engine hooks (see base.py) ---------------------------------------------------------
    def bind(self, model, info: ModelInfo, embed, device) -> None:
        if self.uses_controller and self.controller is None:
            self.controller = default_controller(model, info)
        if self.controller is not None:
            self.controller.to(device).eval().requires_grad_(False)
        self.embed = embed

    def state_dims(self) -> tuple[int, int]:
        c = self.controller
        return (c.cfg.score_dim + 1, c.cfg.hidden_dim) if c is not None else (0, 0)

    def prefill_scores(self, cache, row, ids, pos):
        query, feats = None, None
        if self.controller is not None:
            h = self.controller.run(self.embed(ids), pos)  # [P, H]: the GRU over the prompt
            cache.feat_at[row, : len(ids)] = self.controller.token_features(h)
            cache.ctrl_h[row] = h[-1]
            query = self.controller.query_features(h[-1:])
            feats = cache.feat_at[row : row + 1]
        return self.position_scores(feats, pos[-1:], query)

    def step_scores(self, cache, n, cur_tok, cur_pos):
        query = None
        if self.controller is not None:
            h = self.controller.step(self.embed(cur_tok), cur_pos, cache.ctrl_h[:n])
            cache.ctrl_h[:n] = h
            cache.feat_at[torch.arange(n, device=cur_pos.device), cur_pos] = self.controller.token_features(h)
            query = self.controller.query_features(h)
        return self.position_scores(cache.feat_at, cur_pos, query)

    def choose_rebuild(self, cache, n, pos_scores):
        """The R best released positions (promote: only those beating the weakest cached token by
        promote_margin); they are marked not released here, as they re-enter the cache this step."""
        if self.rebuild == 0:
            return super().choose_rebuild(cache, n, pos_scores)
        valid = cache.valid(n)
        cached = pos_scores.gather(1, cache.pos[:n, : cache.capacity].clamp(min=0))
        cached_min = cached.masked_fill(~valid, float("inf")).min(1).values
        rb_pos, rb_ok = self.pick_released(pos_scores, cache.released[:n], cached_min)
        b, j = rb_ok.nonzero(as_tuple=True)
        cache.released[b, rb_pos[b, j]] = False
        return rb_pos, rb_ok

    def pick_released(self, pos_scores: torch.Tensor, released: torch.Tensor,
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


def default_controller(model, info: ModelInfo) -> Controller:
    """The trained controller shipped for the model (by its ModelInfo) if there is one, else a fresh
    one initialised from seed 0 (in a forked RNG: the caller's global random state is left as it was)."""
    from ..assets import find_controller
    from ..controller import ControllerConfig

    path = find_controller(info)
    if path is not None:
        return Controller.load(str(path))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return Controller(ControllerConfig(embed_dim=model.config.hidden_size))


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
