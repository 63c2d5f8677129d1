"""Streamed perplexity in one masked forward pass, for policies whose cache does not feed back.

When `adore ppl` streams tokens one per step, query t attends to the tokens its policy holds at step
t, and each token's K/V were computed when it was itself the current token, under its own step's
cache. So whenever the cache membership at every step is a function of the token sequence alone
(full, window, sink, strided, and ADORE without rebuild: the controller reads tokens, never the
LLM), the whole stream equals ONE causal forward in which row t may attend only to the keys its
step held (plus top-K per head, as the engine's slot attention does). That is ~T times fewer weight
passes than the engine's token-by-token run. H2O (its scores are the attention it receives) and
ADORE with rebuild (rebuilt tokens get new K/V) are not of this kind: they need the engine.
tests/test_train_eval.py checks that both give the same perplexity.
"""

from __future__ import annotations

import math

import torch

from ..attention import attention_scale, decoder_parts, run_layers
from ..config import AdoreConfig
from ..kernels import keep_top_k
from ..policies import make_policy
from .metrics import score_matrix, simulate


def is_static(policy: str, cfg: AdoreConfig) -> bool:
    """Whether `policy` under cfg has a cache membership the token sequence alone decides."""
    return make_policy(policy, cfg).static


def membership(policy: str, cfg: AdoreConfig, T: int, ctrl=None, emb: torch.Tensor | None = None
               ) -> torch.Tensor:
    """[T, T] bool: row t = the positions query t may attend to under the policy (t included), as
    the policy object decides it (metrics.simulate). ctrl/emb ([T, E], the LLM's input embeddings)
    are needed for policies that use a controller."""
    pol = make_policy(policy, cfg)
    if pol.budget is None or T <= pol.budget:
        return torch.ones(T, T, dtype=torch.bool).tril()
    return simulate(pol, T, scores=score_matrix(ctrl, emb) if pol.uses_controller else None)


@torch.no_grad()
def masked_logprobs(model, ids: torch.Tensor, allowed: torch.Tensor, top_k: int | None = None,
                    chunk: int = 256) -> torch.Tensor:
    """One causal forward of ids [T] where query t attends to keys allowed[t] ([T, T] bool), keeping
    each (row, head)'s top_k scores (ties kept). Returns log p(ids[t+1] | ...) for t < T-1: [T-1]."""
    embed, _, norm, lm_head, _ = decoder_parts(model)
    T = ids.shape[0]
    allowed = allowed.to(ids.device)
    scale = attention_scale(model)

    def attend(i, q, k, v):  # q [1, Hq, T, D]; query rows in chunks, so at most [Hq, chunk, T] scores
        G = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(G, 1), v.repeat_interleave(G, 1)
        o = torch.empty_like(q)
        for a in range(0, T, chunk):
            b = min(T, a + chunk)
            s = torch.matmul(q[:, :, a:b], k[:, :, :b].transpose(-1, -2)).float() * scale
            s = keep_top_k(s.masked_fill(~allowed[a:b, :b], float("-inf")), top_k)
            o[:, :, a:b] = torch.matmul(torch.softmax(s, -1).to(v.dtype), v[:, :, :b])
        return o

    x = run_layers(model, embed(ids[None]), torch.arange(T, device=ids.device)[None], attend)
    logits = lm_head(norm(x))[0, :-1].float()
    return torch.log_softmax(logits, -1).gather(1, ids[1:, None])[:, 0]


def stream_ppl(model, ids: list[int], policy: str, cfg: AdoreConfig, ctrl=None) -> dict:
    """Perplexity of ids streamed under a static policy (see module doc), like `adore ppl`."""
    t = torch.tensor(ids, device=next(model.parameters()).device)
    emb = decoder_parts(model)[0](t).float().cpu() if ctrl is not None else None
    allowed = membership(policy, cfg, len(ids), ctrl, emb)
    pol = make_policy(policy, cfg)
    lp = masked_logprobs(model, t, allowed, pol.top_k)
    nll = -lp.mean().item()
    return {"ppl": math.exp(nll), "nll": nll, "tokens": len(ids) - 1, "policy": policy,
            "cache_size": pol.budget, "top_k": pol.top_k,
            "rebuild": 0, "peak_cache_tokens": int(allowed.sum(1).max()) - pol.bounded,
            "method": "masked forward (equals the engine's stream)"}
