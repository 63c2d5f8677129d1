"""Validation metrics of a controller on labelled sequences, against window, sink and H2O.

precision / recall   of "i is in t's top-K" predicted as sigmoid(s(i, t)) > 0.5
topk_overlap         |top-K by score ∩ true top-K| / K per row
coverage at budget m the share of attention each query would find in the cache, for:
  static   the best m tokens by the controller's score for that row (any token may come back)
  dynamic  the cache a policy actually holds at step t, simulated exactly as the engine runs it:
           ADORE (release lowest-score down to m; rebuild "promote" or "every", R per step), window,
           sink (4 + recent) and H2O (recent m/2 + accumulated attention, one set for all layers).
  Two figures each: `topk_mass` = share of the true top-K attention mass covered (the issue's
  measure), `mass` = share of all attention covered (counting only the stored top-`keep` weights).
"""

from __future__ import annotations

import torch

from ..controller import Controller


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


def simulate(policy: str, T: int, m: int, att: torch.Tensor | None, scores: torch.Tensor | None = None,
             rebuild: int = 0, mode: str = "promote", sink: int = 4, stride: int = 16,
             local: int | None = None) -> torch.Tensor:
    """Cache membership at each step: [T, T] bool, row t = the tokens query t can attend to, with the
    engine's rules (release after each step down to m by the policy's keep score; adore rebuilds).

    att [T, T] true attention (for h2o's accumulated mass); scores [T, T] controller scores (adore);
    local: recent tokens protected by h2o and strided (default m // 2)."""
    local = max(1, m // 2 if local is None else local)
    cached = torch.zeros(T, dtype=torch.bool)
    released = torch.zeros(T, dtype=torch.bool)
    acc = torch.zeros(T)
    pos = torch.arange(T)
    out = torch.zeros(T, T, dtype=torch.bool)
    for t in range(T):
        if policy == "adore" and rebuild > 0 and released[:t].any():
            s = scores[t, :t]
            cand = released[:t].clone()
            if mode == "promote":
                cand &= s > scores[t, :t + 1][cached[: t + 1]].min() if cached.any() else cand
            if cand.any():
                pick = s.masked_fill(~cand, float("-inf")).topk(min(rebuild, int(cand.sum()))).indices
                cached[pick], released[pick] = True, False
        cached[t] = True
        out[t] = cached
        if policy == "h2o":
            w = att[t] * cached
            acc += w / w.sum().clamp(min=1e-9)
        n = int(cached.sum())
        if n <= m:
            continue
        if policy == "window":
            key = pos.double()
        elif policy == "sink":
            key = pos.double() + 1e12 * (pos < sink)
        elif policy == "h2o":
            key = acc.double() + 1e12 * (pos > t - local)
        elif policy == "strided":
            key = pos.double() + 1e12 * (pos % stride == 0) + 2e12 * (pos > t - local)
        else:
            key = scores[t].double()
        key = key.masked_fill(~cached, float("-inf"))
        keep = key.topk(m).indices
        drop = cached.clone()
        drop[keep] = False
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
        runs = {"adore": dict(policy="adore", scores=s, rebuild=rebuild, mode="promote"),
                "adore-every": dict(policy="adore", scores=s, rebuild=rebuild, mode="every"),
                "adore-norebuild": dict(policy="adore", scores=s, rebuild=0),
                "window": dict(policy="window"), "sink": dict(policy="sink"), "h2o": dict(policy="h2o")}
        for name, kw in runs.items():
            member = simulate(T=T, m=budget, att=att, **kw)
            for key, c in _coverage(member, att, top).items():
                add(f"dynamic_{key}:{name}", c)
    return {k: round(sum(v) / len(v), 4) for k, v in agg.items()}
