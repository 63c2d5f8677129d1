"""Which layers' top-K attention changes the greedy token? (SmolLM2-135M, CPU)

The default `adore` keeps each query's top-96 keys per head in every layer, and its greedy outputs
drift from full attention's far more than a dense bounded cache's do (README, Quality). This feeds
prompts from the held-out novel plus the model's own dense greedy continuation through the model
teacher-forced, with top-K in every layer, in none, in one layer only (each layer in turn) and in all
but the first n layers, and counts the positions whose argmax differs from the dense forward's: how
the damage spreads over depth. Top-K here runs over all causal keys (as in `adore finetune`), not
over a 192-token cache.

    python bench/topk_layers.py --text-file ../shared/data/austen/northangerabbey.txt
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
from tqdm import tqdm

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from adore.cli import add_knob_args  # noqa: E402
from adore.evaluation import spread_spans  # noqa: E402
from adore.models import load_model  # noqa: E402
from adore.train.finetune import set_topk_attention  # noqa: E402

RESULTS = os.path.join(os.path.dirname(__file__), "results", "topk_layers.json")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--text-file", default="data/austen/northangerabbey.txt")
    p.add_argument("--prompts", type=int, default=20)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--max-new", type=int, default=256)
    add_knob_args(p, names=("top_k",))  # the only knob that applies: no cache, top-K over every causal key
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.time()
    model, tok, _ = load_model("smollm2-135m")
    ids = tok.encode(open(args.text_file, encoding="utf-8").read(), add_special_tokens=False)
    prompts = torch.tensor(spread_spans(ids, args.prompts, args.prompt_len, name=args.text_file))
    with torch.no_grad():  # the model's own dense greedy text: what it attends over when it generates
        seqs = model.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=args.max_new,
                              min_new_tokens=args.max_new, do_sample=False, pad_token_id=0)
    n_layers = len(model.model.layers)
    scored = slice(args.prompt_len - 1, -1)  # the positions that predict the generated tokens

    def argmax(per_layer: dict[int, int | None]) -> torch.Tensor:
        set_topk_attention(model, None, per_layer)
        with torch.no_grad():
            return torch.cat([model(input_ids=seqs[i : i + 5]).logits[:, scored].argmax(-1)
                              for i in range(0, len(seqs), 5)])

    dense = argmax({})
    K = args.top_k
    runs = {"all layers": {i: K for i in range(n_layers)}}
    runs.update({f"layer {i} only": {i: K} for i in range(n_layers)})
    runs.update({f"all but the first {n}": {i: K for i in range(n, n_layers)} for n in (1, 2, 4, 8)})
    runs.update({f"all but the last {n}": {i: K for i in range(n_layers - n)} for n in (4, 8)})
    res = {}
    for name, per_layer in tqdm(runs.items(), desc="configs"):
        res[name] = round(100 * (argmax(per_layer) != dense).float().mean().item(), 3)
    out = {"changed_argmax_pct": res, "positions": dense.numel(), "top_k": K, "prompts": args.prompts,
           "prompt_len": args.prompt_len, "max_new": args.max_new, "text_file": args.text_file,
           "seconds": round(time.time() - t0, 1), "command": "python bench/topk_layers.py " + " ".join(sys.argv[1:])}
    json.dump(out, open(RESULTS, "w"), indent=1)
    for name, v in res.items():
        print(f"{name:24s} {v:6.3f}% of argmaxes differ from dense")


if __name__ == "__main__":
    main()
