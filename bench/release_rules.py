"""Which tokens should a bounded cache hold? Release rules compared by two-pass simulation.

For each span of a held-out text: pass 1 is a full-attention forward that gives A [T, T], the causal
attention of every query averaged over layers and heads; a rule turns A (and positions) into a
membership matrix allowed [T, T] (row t: the <= m positions query t attends to, t included); pass 2
is one masked forward (adore/train/streameval.masked_logprobs) that gives the rule's streamed
perplexity. When a rule may bring back a released token it uses the token's exact stored K/V (the
second tier of issue "Controller v2"); rules without re-admission only ever drop.

The rules read A from full attention, not from their own cache's attention, so the figures are an
approximation of the deployed policy (which the engine measures); they rank the signals:

    sink         StreamingLLM: the first 4 and the most recent m - 4
    oracle       the m largest A[t, :] (the current query's own attention: not deployable)
    lag1         the m largest A[t-1, :] (the previous query's attention: known before step t),
                 t itself always in; sinks and the last `recent` always in
    ema:d        the m largest of sum_s d^(t-1-s) A[s, :] over s < t (decayed received attention)
    max:w        the m largest max_{t-w <= s < t} A[s, :] (an observation window, SnapKV-like)
    tova         no re-admission: each step drops the cached token with the least A[t-1, :]
    h2o          no re-admission: each step drops the cached token with the least summed A
    fut:n        the m largest sum_{s=t..t+n-1} A[s, :] (future mass: the labels' target, not deployable)

    python bench/release_rules.py --spans 5 --rules sink,oracle,lag1,ema:0.5,tova --out bench/results/release_rules.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from adore.evaluation import add_span_args  # noqa: E402

HELD_OUT = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "austen", "northangerabbey.txt")


def protected(T: int, m: int, sinks: int, recent: int, device) -> torch.Tensor:
    """[T, T] bool: positions every rule keeps at step t: the first `sinks`, the last `recent`, t."""
    t = torch.arange(T, device=device)[:, None]
    i = torch.arange(T, device=device)[None, :]
    return (i <= t) & ((i < sinks) | (i > t - recent) | (i == t))


def top_m(score: torch.Tensor, keep: torch.Tensor, m: int) -> torch.Tensor:
    """Rows of score [T, T] (-inf = not available): keep [T, T] plus the best others, m in all."""
    s = score.masked_fill(keep, float("inf"))
    idx = s.topk(min(m, s.shape[1]), dim=1).indices
    out = torch.zeros_like(keep).scatter_(1, idx, True)
    return out & torch.isfinite(score).logical_or(keep)


def causal(T: int, device) -> torch.Tensor:
    return torch.ones(T, T, dtype=torch.bool, device=device).tril()


def rule_allowed(rule: str, A: torch.Tensor, m: int, sinks: int, recent: int) -> torch.Tensor:
    """allowed [T, T] for one rule (see the module doc)."""
    T, dev = A.shape[0], A.device
    c = causal(T, dev)
    keep = protected(T, m, sinks, recent, dev)
    name, _, arg = rule.partition(":")
    if name == "full":
        return c
    if name == "sink":
        return protected(T, m, 4, m - 4, dev)
    if name == "oracle":
        return top_m(A.masked_fill(~c, float("-inf")), keep, m)
    prev = torch.cat([torch.zeros(1, T, device=dev), A[:-1]])  # row t: A[t-1]
    if name == "lag1":
        return top_m(prev.masked_fill(~c, float("-inf")), keep, m)
    if name == "ema":
        d, acc, rows = float(arg), torch.zeros(T, device=dev), []
        for t in range(T):
            rows.append(acc.clone())
            acc = d * acc + A[t]
        return top_m(torch.stack(rows).masked_fill(~c, float("-inf")), keep, m)
    if name == "max":
        w = int(arg)
        win = torch.stack([prev.roll(j, 0).masked_fill(torch.arange(T, device=dev)[:, None] < j, 0)
                           for j in range(w)]).amax(0)
        return top_m(win.masked_fill(~c, float("-inf")), keep, m)
    if name == "fut":
        n = int(arg)
        cs = torch.cat([torch.zeros(1, T, device=dev), A.cumsum(0)])
        hi = torch.arange(T, device=dev).add(n).clamp(max=T)
        fut = cs[hi] - cs[:-1]
        return top_m(fut.masked_fill(~c, float("-inf")), keep, m)
    if name in ("tova", "h2o"):  # sequential: a dropped token never returns
        held = torch.zeros(T, dtype=torch.bool, device=dev)
        acc = torch.zeros(T, device=dev)
        out = torch.zeros(T, T, dtype=torch.bool, device=dev)
        for t in range(T):
            held[t] = True
            if int(held.sum()) > m:
                s = (prev[t] if name == "tova" else acc).masked_fill(~held, float("inf"))
                s = s.masked_fill(keep[t], float("inf"))
                held[int(s.argmin())] = False
            out[t] = held
            acc += A[t]
        return out
    raise SystemExit(f"unknown rule {rule!r}")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_span_args(p, HELD_OUT)
    p.add_argument("--sinks", type=int, default=4)
    p.add_argument("--recent", type=int, default=16)
    p.add_argument("--rules", default="full,sink,oracle,lag1,ema:0.5,ema:0.9,max:8,tova,h2o,fut:16")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)

    from adore.evaluation import spread_spans
    from adore.models import load_model
    from adore.train.labels import averaged_attention_rows, collect_qk
    from adore.train.streameval import masked_logprobs

    torch.backends.cuda.matmul.allow_tf32 = False
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    model, tok, info = load_model(args.model, device=dev)
    ids = tok.encode(open(args.text, encoding="utf-8").read())
    spans = spread_spans(ids, args.spans, args.tokens, name=args.text)
    rules = args.rules.split(",")
    nll = {r: [] for r in rules}
    t0 = time.time()
    for si, span in enumerate(spans):
        x = torch.tensor(span, device=dev)
        L = model.config.num_hidden_layers
        q, k, scale = collect_qk(model, x, list(range(L)))
        A = torch.cat([averaged_attention_rows(q, k, scale, a, min(len(span), a + 256))
                       for a in range(0, len(span), 256)])
        del q, k
        for r in rules:
            allowed = rule_allowed(r, A, args.cache_size, args.sinks, args.recent)
            assert int(allowed.sum(1).max()) <= (len(span) if r == "full" else args.cache_size), r
            nll[r].append(-masked_logprobs(model, x, allowed).mean().item())
        print(f"span {si}: " + " ".join(f"{r} {math.exp(nll[r][-1]):.2f}" for r in rules),
              f"({time.time() - t0:.0f} s)", flush=True)
    full = nll.get("full")
    res = {"command": "python " + " ".join(sys.argv), "model": args.model, "text": os.path.basename(args.text),
           "spans": args.spans, "tokens": args.tokens, "cache_size": args.cache_size, "sinks": args.sinks,
           "recent": args.recent, "rules": {}}
    for r in rules:
        ppl = [math.exp(v) for v in nll[r]]
        ratio = [math.exp(v - f) for v, f in zip(nll[r], full)] if full else None
        res["rules"][r] = {"ppl": ppl, "ratio": ratio,
                           "mean_ratio": sum(ratio) / len(ratio) if ratio else None}
        print(f"{r:10s} ppl {' '.join(f'{v:6.2f}' for v in ppl)}"
              + (f"  x full {' '.join(f'{v:.3f}' for v in ratio)}  mean {res['rules'][r]['mean_ratio']:.3f}"
                 if ratio else ""))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
