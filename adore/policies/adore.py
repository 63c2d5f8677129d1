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

Scorers (`scorer`):
  attention   (default, v2) a token's score is the attention the current token gives it, averaged over
              layers and heads and decayed over steps (score_decay), for cached and stored tokens
              alike: the current token's queries meet the cached keys and the second tier's stored
              keys once per step, after the layers. Sinks and recent tokens can be protected.
  learned     the v2 controller (adore/scorer.py): the same received attention kept at several decays,
              with the distance and sink-ness, through an MLP trained on the attention each token
              receives over the next steps (adore/train/scorer.py; shipped per model)
  controller  the paper's GRU over token embeddings and positions (adore/controller.py)

Rebuild source (`rebuild_source`):
  stored      (default) released tokens' K/V go to the cache's second tier (store_size per sequence);
              a rebuilt token's K/V is copied back, exactly what it left with, and is not run again
  recompute   the paper: the token runs through every layer again, beside the current token, so its
              K/V is computed against today's cache

Ablations: `adore-norebuild` (R = 0) and `adore-nocontroller` (scores from a fixed prior, the first
`sink_tokens` positions then recency, instead of the learned controller).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch

from .. import kernels
from ..config import UserError
from ..controller import Controller
from ..models import ModelInfo
from ..scorer import LearnedScorer
from .base import BIG, Policy, SlotView


@dataclass
class AdorePolicy(Policy):
    name = "adore"
    uses_controller = True
    knobs = ("top_k", "rebuild", "rebuild_mode", "promote_margin", "protect_recent", "protect_sinks",
             "scorer", "scorer_path", "score_decay", "score_layers", "prompt_cut", "rebuild_source", "store_size")
    controller: Controller | None = field(default=None, repr=False)
    embed: object = field(default=None, repr=False)  # the LLM's token embedding (bind)
    learned: LearnedScorer | None = field(default=None, repr=False)  # scorer 'learned' (bind loads it)

    @property
    def rebuild(self) -> int:
        return self.cfg.rebuild

    @property
    def top_k(self) -> int | None:
        return self.cfg.top_k

    @property
    def by_attention(self) -> bool:
        """Scored from the attention each token receives (scorers 'attention' and 'learned')."""
        return self.uses_controller and self.cfg.scorer in ("attention", "learned")

    @property
    def decays(self) -> tuple[float, ...]:
        """The decayed averages of received attention kept per position (by_attention)."""
        return self.learned.cfg.decays if self.cfg.scorer == "learned" else (self.cfg.score_decay,)

    @property
    def needs_queries(self) -> bool:
        return self.by_attention

    @property
    def rebuild_source(self) -> str:
        return self.cfg.rebuild_source if self.rebuild else "recompute"

    @property
    def store_size(self) -> int:
        return self.cfg.store_size if self.rebuild_source == "stored" else 0

    def position_scores(self, feat_at: torch.Tensor | None, cur_pos: torch.Tensor,
                        query: torch.Tensor | None, P: int | None = None) -> torch.Tensor:
        """Score of every position 0..P-1 for each row's current token: [n, P], -inf after cur_pos.

        feat_at [n, P, S+1] stored controller features; query [n, S] the current tokens' queries;
        P: 1 + cur_pos.max() where the caller knows it (else a device sync finds it)."""
        n = cur_pos.shape[0]
        P = int(cur_pos.max()) + 1 if P is None else P
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

    def received_scores(self, received: torch.Tensor, cur_pos: torch.Tensor, P: int | None = None) -> torch.Tensor:
        """received [n, >= P, F] each position's decayed received attention (one per decay) -> scores
        [n, P] (scorer 'attention': its log; 'learned': the scorer's), with the policy's rules
        (protected sinks and recent, -inf ahead). P as in position_scores."""
        P = int(cur_pos.max()) + 1 if P is None else P
        dist = cur_pos[:, None] - torch.arange(P, device=cur_pos.device)[None, :]
        if self.learned is not None:
            return self.rule_scores(self.learned(received[:, :P], dist).double(), dist)
        return self.rule_scores(torch.log(received[:, :P, 0].double() + 1e-12), dist)

    @property
    def static(self) -> bool:
        # rebuilt tokens get new K/V; the no-controller prior never promotes a released token; the
        # attention scorer reads the LLM's attention
        if self.by_attention:
            return False
        return self.rebuild == 0 or (not self.uses_controller and self.cfg.rebuild_mode == "promote")

    def keep_scores(self, view: SlotView):
        return view.pos_scores.gather(1, view.pos.clamp(min=0))

    # -- engine hooks (see base.py) ---------------------------------------------------------
    def bind(self, model, info: ModelInfo, embed, device) -> None:
        from ..attention import attention_scale

        self.scale = attention_scale(model)
        self.scoring_layers = scoring_layers(model.config.num_hidden_layers, self.cfg.score_layers)
        if self.by_attention:
            self.controller = None
            if self.cfg.scorer == "learned" and self.learned is None:
                from ..assets import find_asset

                path = self.cfg.scorer_path
                if path is not None and not os.path.isfile(path):
                    raise UserError(f"scorer_path {path!r}: no such file")
                path = path or find_asset(info, "scorers")
                if path is None:
                    raise UserError(f"scorer 'learned': no trained scorer is shipped for model {info.name!r}; "
                                    f"train one with `python -m adore.train.scorer` (see adore/assets/scorers/"
                                    f"MADE.md) and give it as scorer_path, or use scorer 'attention'")
                try:
                    self.learned = LearnedScorer.load(str(path))
                except Exception as e:  # noqa: BLE001 - a user's file that is not a scorer: say so
                    raise UserError(f"{path}: not a trained scorer ({type(e).__name__}: {e})"[:400]) from e
            if self.learned is not None:
                self.learned.to(device).eval().requires_grad_(False)
            self.decay_weights = torch.tensor(self.decays, device=device)  # [F], once: observe runs every step
        elif self.uses_controller and self.controller is None:
            self.controller = default_controller(model, info)
        if self.controller is not None:
            self.controller.to(device).eval().requires_grad_(False)
        self.embed = embed

    def state_dims(self) -> tuple[int, int]:
        if self.by_attention:
            return len(self.decays), 0  # per position: its decayed received attention, per decay
        c = self.controller
        return (c.cfg.score_dim + 1, c.cfg.hidden_dim) if c is not None else (0, 0)

    def prefill_scores(self, cache, rows, lengths, queries=None, keys=None):
        dev = cache.pos.device
        P = max(lengths)
        last = torch.tensor(lengths, device=dev) - 1  # [k] each prompt's last position
        if self.by_attention:  # each prompt's last token's attention over its prompt
            ok = torch.arange(P, device=dev)[None, :] <= last[:, None]  # [k, P]
            got = received_attention(queries, [keys[:, :, :, :P]], [ok], self.scale, self.scoring_layers)[0]
            cache.feat_at[rows, :P] = got[..., None]  # every average starts from it
            if self.cfg.prompt_cut == "max" and self.budget is not None and P > self.budget:
                # a prompt that is cut (it comes alone): ranked by the one head that attends most, so
                # that what a single retrieval head reads survives the cut; the averages start as above
                peak = received_attention(queries, [keys[:, :, :, :P]], [ok], self.scale, self.scoring_layers,
                                          reduce="max")[0]
                dist = last[:, None] - torch.arange(P, device=dev)[None, :]
                return self.rule_scores(torch.log(peak.double() + 1e-12), dist)
            return self.received_scores(cache.feat_at[rows], last, P)
        query, feats = None, None
        if self.controller is not None:  # the GRU over each prompt (padded: a row's state at its end)
            pos = torch.arange(P, device=dev)
            h = self.controller.run_batch(self.embed(cache.tok_at[rows, :P]), pos.expand(len(lengths), P))
            feats = cache.feat_at[rows]
            feats[:, :P] = self.controller.token_features(h)
            h_last = h[torch.arange(len(lengths), device=dev), last]  # [k, H]
            cache.ctrl_h[rows] = h_last
            query = self.controller.query_features(h_last)
        return self.position_scores(feats, last, query, P)

    def step_scores(self, cache, n, cur_tok, cur_pos):
        if self.by_attention:  # the current token has received nothing yet: observe scores the step
            # (a 0-d device value: a Python 0 would be copied from pageable host memory, a device sync)
            cache.feat_at[torch.arange(n, device=cur_pos.device), cur_pos] = cache.feat_at.new_zeros(())
            return None
        query = None
        if self.controller is not None:
            h = self.controller.step(self.embed(cur_tok), cur_pos, cache.ctrl_h[:n])
            cache.ctrl_h[:n] = h
            cache.feat_at[torch.arange(n, device=cur_pos.device), cur_pos] = self.controller.token_features(h)
            query = self.controller.query_features(h)
        return self.position_scores(cache.feat_at, cur_pos, query, cache.pos_bound)

    def observe(self, cache, n, cur_pos, queries, pos_scores):
        """Scorers 'attention' and 'learned': fold this step's received attention into every cached
        and stored token's decayed averages; the cut then uses the updated scores."""
        if not self.by_attention:
            return pos_scores
        d = self.decay_weights  # [F]
        used, held = cache.read_widths(n)
        keys, ok, where = [cache.k[:, :n, :, :used]], [cache.valid(n)[:, :used]], [cache.pos[:n, :used]]
        if cache.store_k is not None:
            keys.append(cache.store_k[:, :n, :, :held])
            ok.append(cache.stored(n)[:, :held])
            where.append(cache.store_pos[:n, :held])
        got = received_attention(queries, keys, ok, self.scale, self.scoring_layers)
        e = cache.feat_at[:n]  # [n, P, F]
        e.mul_(d)
        for a, m, p in zip(got, ok, where):
            e.scatter_add_(1, p.clamp(min=0)[..., None].expand(-1, -1, len(d)), (1 - d) * (a * m)[..., None])
        return self.received_scores(e, cur_pos, cache.pos_bound)

    def choose_rebuild(self, cache, n, pos_scores):
        """The R best released positions (promote: only those beating the weakest cached token by
        promote_margin); they are marked not released here, as they re-enter the cache this step.
        With rebuild_source 'stored' only tokens still in the second tier can come back. No scores
        (the attention scorer before the layers): nothing to choose by."""
        if self.rebuild == 0 or pos_scores is None:
            return super().choose_rebuild(cache, n, pos_scores)
        valid = cache.valid(n)
        cached = pos_scores.gather(1, cache.pos[:n, : cache.capacity].clamp(min=0))
        cached_min = cached.masked_fill(~valid, float("inf")).min(1).values
        back = cache.released[:n]
        if self.rebuild_source == "stored":
            sp = cache.store_pos[:n, : cache.store_size]
            back = torch.zeros_like(back).scatter_(1, sp.clamp(min=0), sp >= 0)
        # recomputed rebuilds run as query rows: trim the columns no row uses (stored ones are copies)
        rb_pos, rb_ok = self.pick_released(pos_scores, back, cached_min, trim=self.rebuild_source == "recompute")
        # (topk's positions are distinct within a row: a scatter with no device sync)
        rel = cache.released[:n]
        rel.scatter_(1, rb_pos, rel.gather(1, rb_pos) & ~rb_ok)
        return rb_pos, rb_ok

    def pick_released(self, pos_scores: torch.Tensor, released: torch.Tensor, cached_min: torch.Tensor,
                      trim: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """Pick released positions to rebuild.

        pos_scores [n, P]; released [n, P] bool; cached_min [n] the weakest cached token's score.
        Returns positions [n, r] and validity [n, r] (trim: r <= R, the most any row rebuilds this
        step, which costs a device sync; else r = R)."""
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
        if not trim:
            return top.indices, ok
        r = int(ok.sum(1).max())
        return top.indices[:, :r], ok[:, :r]


def scoring_layers(L: int, k: int | None) -> list[int]:
    """The k layers of L whose queries score (knob score_layers): evenly spaced, the first and the last
    among them for k >= 2; None or k >= L: all."""
    if k is None or k >= L:
        return list(range(L))
    return sorted({round(i * (L - 1) / max(k - 1, 1)) for i in range(k)})


def received_attention(queries: torch.Tensor, keys: list[torch.Tensor], ok: list[torch.Tensor],
                       scale: float, layers: list[int] | None = None, reduce: str = "mean") -> list[torch.Tensor]:
    """The attention one query per sequence gives sets of keys, averaged over layers and heads.

    Parameters
    ----------
    queries : [L, n, Hq, D] the query of every layer
    keys : groups of keys [L, n, Hkv, N_g, D] (the cache's slots, the second tier's), softmaxed together
    ok : per group [n, N_g] bool, which keys exist
    scale : the model's softmax scale
    layers : the layers to average over (None: all L)
    reduce : "mean" over layers and query heads, or their "max"

    Returns
    -------
    per group [n, N_g] float32: the mean (or max) over layers and query heads of each key's softmax
    weight (0 where not ok); with the mean the groups of a row sum to 1.
    """
    L, n, Hq, D = queries.shape
    layers = list(range(L)) if layers is None else list(layers)
    peak = reduce == "max"
    total = kernels.received_attention(queries, keys, ok, scale, layers, "max" if peak else "sum").double()
    # Under tensor parallelism each rank holds some of the heads: the sum (max) over all heads is the
    # sum (max) over ranks, and every rank then holds the same scores (its decisions stay in lock-step).
    dist, ranks = torch.distributed, 1
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(total, op=dist.ReduceOp.MAX if peak else dist.ReduceOp.SUM)
        ranks = dist.get_world_size()
    out = (total if peak else total / (len(layers) * Hq * ranks)).float()
    return list(out.split([m.shape[1] for m in ok], -1))


def default_controller(model, info: ModelInfo) -> Controller:
    """The trained controller shipped for the model (by its ModelInfo) if there is one, else a fresh
    one initialised from seed 0 (in a forked RNG: the caller's global random state is left as it was)."""
    from ..assets import find_asset
    from ..controller import ControllerConfig

    path = find_asset(info)
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
