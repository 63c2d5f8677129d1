"""Validation metrics of a controller on labelled sequences, against window, sink and H2O.

precision / recall   of "i is in t's top-K" predicted as sigmoid(s(i, t)) > 0.5
topk_overlap         |top-K by score ∩ true top-K| / K per row
coverage at budget m the share of attention each query would find in the cache, for:
  static   the best m tokens by the controller's score for that row (any token may come back)
  dynamic  the cache a policy actually holds at step t, simulated with the engine's Policy objects
           (`simulate`): ADORE (release lowest-score down to m; rebuild "promote" or "every", R per
           step), window, sink and H2O, each with AdoreConfig's defaults for its own knobs.
  Two figures each: `topk_mass` = share of the true top-K attention mass covered (the issue's
  measure), `mass` = share of all attention covered (counting only the stored top-`keep` weights).
"""

from __future__ import annotations

from dataclasses import replace

import torch

from ..config import AdoreConfig
from ..controller import Controller
from ..policies import Policy, SlotView, make_policy, select_keep
from ..policies.adore import AdorePolicy


@torch.no_grad()
def score_matrix(ctrl: Controller, emb: torch.Tensor, chunk: int = 512) -> torch.Tensor:
    """All scores of one sequence: emb [T, E] -> [T, T] (row t = query t; -inf after t)."""
    T = emb.shape[0]
    h = ctrl.run_batch(emb[None], torch.arange(T)[None])
    return torch.cat([ctrl.pair_scores(h, torch.arange(a, min(T, a + chunk)))[0]
                      for a in range(0, T, chunk)])


def _dense(idx: torch.Tensor, val: torch.Tensor, T: int) -> torch.Tensor:
    """idx/val [T, keep] -> attention [T, T] (zeros outside the stored entries)."""
    a = torch.zeros(idx.shape[0], T + 1)
    ii = idx.long()
    a.scatter_add_(1, torch.where(ii >= 0, ii, T), val.float())
    return a[:, :T]


def simulate(policy: Policy, T: int, att: torch.Tensor | None = None,
             scores: torch.Tensor | None = None) -> torch.Tensor:
    """Cache membership at each step: [T, T] bool, row t = the positions query t can attend to.

    The decisions are the policy object's own, in the engine's order: an ADORE policy scores every
    position (`rule_scores` over the controller's scores) and picks released tokens to rebuild
    (`pick_released`); after the step the cache is cut back to the budget by `keep_scores`
    (`select_keep`). Here each position has its own slot; the engine's packed slots hold the same set.

    att [T, T] true attention, standing in for the attention mass h2o accumulates (needs_mass);
    scores [T, T] the controller's scores (row t = query t), for policies that use a controller."""
    pos = torch.arange(T)
    cached = torch.zeros(T, dtype=torch.bool)
    released = torch.zeros(T, dtype=torch.bool)
    acc = torch.zeros(T)
    out = torch.zeros(T, T, dtype=torch.bool)
    adore = isinstance(policy, AdorePolicy)
    for t in range(T):
        pos_scores = None
        if adore:
            raw = scores[t : t + 1, : t + 1] if policy.uses_controller else None
            pos_scores = policy.rule_scores(raw, t - pos[None, : t + 1])
            if policy.rebuild > 0:
                cached_min = pos_scores[0].masked_fill(~cached[: t + 1], float("inf")).min()
                pick, ok = policy.pick_released(pos_scores, released[None, : t + 1], cached_min[None])
                pick = pick[ok]
                cached[pick], released[pick] = True, False
        cached[t] = True
        out[t] = cached
        if policy.needs_mass:
            w = att[t] * cached
            acc += w / w.sum().clamp(min=1e-9)
        if policy.budget is None or int(cached.sum()) <= policy.budget:
            continue
        view = SlotView(torch.where(cached, pos, -1)[None], torch.tensor([t]), acc[None], pos_scores)
        drop = cached & ~select_keep(policy, view, cached[None])[0]
        cached &= ~drop
        released |= drop
    return out


def _coverage(member: torch.Tensor, att: torch.Tensor, top: torch.Tensor) -> dict:
    """member [T, T] bool; att [T, T]; top [T, T] bool (true top-K) -> mean coverage figures."""
    tm = (att * top * member).sum(1) / (att * top).sum(1).clamp(min=1e-9)
    return {"topk_mass": round(tm.mean().item(), 4), "mass": round((att * member).sum(1).mean().item(), 4)}


@torch.no_grad()
def evaluate(ctrl: Controller, emb: torch.Tensor, idx: torch.Tensor, val: torch.Tensor, top_k: int,
             budget: int, rebuild: int, dynamic: bool = True) -> dict:
    """Metrics over sequences emb [N, T, E] with labels idx/val [N, T, keep] (see module doc)."""
    from .labels import dense_labels

    N, T, _ = emb.shape
    agg: dict[str, list[float]] = {}
    # the paper's controller, rebuilding by recomputation: what the simulation models
    cfg = AdoreConfig(cache_size=budget, top_k=None, rebuild=rebuild, scorer="controller", rebuild_source="recompute")
    policies = {"adore": make_policy("adore", cfg),
                "adore-every": make_policy("adore", replace(cfg, rebuild_mode="every")),
                **{p: make_policy(p, cfg) for p in ("adore-norebuild", "window", "sink", "h2o")}}

    def add(name, v):
        agg.setdefault(name, []).append(v)

    for j in range(N):
        s = score_matrix(ctrl, emb[j])
        att = _dense(idx[j], val[j], T)
        top = dense_labels(idx[j], top_k, T)
        valid = torch.isfinite(s)
        pred = (s > 0) & valid
        tp = (pred & top).sum().item()
        add("precision", tp / max(1, pred.sum().item()))
        add("recall", tp / max(1, top.sum().item()))
        k = torch.clamp(torch.arange(T) + 1, max=top_k)
        rank = s.topk(min(top_k, T), dim=1).indices
        hit = top.gather(1, rank).float().cumsum(1).gather(1, (k - 1)[:, None])[:, 0]
        add("topk_overlap", (hit / k).mean().item())
        static = torch.zeros(T, T, dtype=torch.bool).scatter_(1, s.topk(min(budget, T), 1).indices, True)
        static &= valid
        for name, c in _coverage(static, att, top).items():
            add(f"static_{name}:adore", c)
        if not dynamic:
            continue
        for name, pol in policies.items():
            member = simulate(pol, T, att, s)
            for key, c in _coverage(member, att, top).items():
                add(f"dynamic_{key}:{name}", c)
    return {k: round(sum(v) / len(v), 4) for k, v in agg.items()}
