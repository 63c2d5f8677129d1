"""Streamed perplexity over several spans of one held-out text, every policy through the engine.

The spans (default 5 x 2,048 tokens, spread evenly over the text) run as one batch of sequences,
each fed its own tokens (teacher forcing) one per step from a one-token prompt, so each policy's
cache works exactly as it does when serving. Reports each span's perplexity, its ratio to full
attention's on the same span, and the mean and spread of the ratios.

    python bench/ppl_spans.py --text ../shared/data/austen/northangerabbey.txt \\
        --policies full,sink,h2o,adore --out bench/results/ppl_spans_h200.json      # an H200: ~1 min a policy
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from adore.evaluation import add_span_args  # noqa: E402

HELD_OUT = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "austen", "northangerabbey.txt")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_span_args(p, HELD_OUT)
    p.add_argument("--policies", default="full,sink,h2o,window,strided,adore",
                   help="policy specs: name[:knob=value...], e.g. adore:scorer=controller:top_k=none")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)

    import torch
    from tqdm import tqdm

    from adore.config import AdoreConfig, SamplingParams
    from adore.engine import Engine
    from adore.evaluation import spread_spans
    from adore.models import load_model
    from adore.policies import make_policy, parse_policy_spec

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.backends.cuda.matmul.allow_tf32 = False
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    model, tok, info = load_model(args.model, device=dev)
    ids = tok.encode(open(args.text, encoding="utf-8").read())
    spans = spread_spans(ids, args.spans, args.tokens, name=args.text)
    res = {"command": "python " + " ".join(sys.argv), "model": args.model, "text": os.path.basename(args.text),
           "text_tokens": len(ids), "spans": args.spans, "tokens": args.tokens, "cache_size": args.cache_size,
           "device": torch.cuda.get_device_name() if dev == "cuda" else "cpu", "policies": {}}
    full = None
    for spec in args.policies.split(","):
        name, cfg, extra = parse_policy_spec(spec, AdoreConfig(cache_size=args.cache_size))
        eng = Engine(model, tok, make_policy(name, cfg, extra.get("controller")), info=info,
                     max_batch=len(spans), max_seq_len=args.tokens + 1)
        rids = [eng.add_request(s[:1], SamplingParams(forced_tokens=s[1:])) for s in spans]
        t0 = time.perf_counter()
        with tqdm(total=args.tokens - 1, desc=spec, unit="step", file=sys.stderr) as bar:
            while eng.has_work():
                eng.step()
                bar.update(1)
        nll = [-sum(eng.result(r).logprobs) / (args.tokens - 1) for r in rids]
        row = {"ppl": [math.exp(x) for x in nll], "nll": nll, "seconds": round(time.perf_counter() - t0, 1),
               **eng.policy.describe(), **{k: v for k, v in eng.stats.items()
                                           if k in ("released", "rebuilt", "peak_cache_tokens", "stored_tokens")},
               "config": {k: v for k, v in vars(cfg).items()}}
        if name == "full":
            full = nll
        if full is not None:
            row["ratio"] = [math.exp(a - b) for a, b in zip(nll, full)]
            row["mean_ratio"] = sum(row["ratio"]) / len(row["ratio"])
            row["ratio_spread"] = max(row["ratio"]) - min(row["ratio"])
        res["policies"][spec] = row
        print(f"{spec:40s} ppl " + " ".join(f"{v:6.2f}" for v in row["ppl"])
              + (f"  x full {row['mean_ratio']:.3f} [{min(row['ratio']):.3f}, {max(row['ratio']):.3f}]"
                 if "ratio" in row else "") + f"  rebuilt {row.get('rebuilt')}  {row['seconds']} s", flush=True)
        if args.out:
            with open(args.out, "w") as f:
                json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
