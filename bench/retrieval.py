"""Long-context retrieval accuracy per policy at one budget (adore/retrieval.py's tasks).

Every policy answers the same generated prompts (passkey, single- and multi-key needles, variable
tracking; lengths x needle depths, seeded) greedily; accuracy by string match. Full attention is the
reference. Writes rows in the evaluation job's format (task "retrieval", retrieval_json), so that
`--plot` draws them with the report's heat map.

    python bench/retrieval.py --model smollm2-135m --text data/austen/northangerabbey.txt \\
        --lengths 256,512,1024,2048,4096 --out bench/results/retrieval_h200.json      # on a GPU
    python bench/retrieval.py --plot bench/results/retrieval_h200.json                 # the PNG, here
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from adore.cli import add_knob_args  # noqa: E402

DEFAULT_POLICIES = "full,window,sink,h2o,adore"


def measure(args) -> dict:
    import torch

    from adore.config import AdoreConfig, knob_values
    from adore.models import load_model
    from adore.policies import policy_from_spec
    from adore.retrieval import TASKS, answer, make_samples, mean_accuracy

    torch.backends.cuda.matmul.allow_tf32 = False
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, tok, info = load_model(args.model, dtype=args.dtype, device=device)
    text = open(args.text, encoding="utf-8").read()
    lengths = [int(x) for x in args.lengths.split(",")]
    depths = [float(x) for x in args.depths.split(",")]
    kinds = args.kinds.split(",") if args.kinds else list(TASKS)
    samples = make_samples(tok, text, tasks=kinds, lengths=lengths, depths=depths, per_cell=args.per_cell,
                           seed=args.seed)
    cfg = AdoreConfig(**knob_values(args))
    rows = []
    res = {"command": "python " + " ".join(sys.argv),
           "device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "rows": rows}
    for policy in args.policies.split(","):
        t0 = time.time()
        # a policy or a spec with settings of its own (adore:prompt_cut=mean), as bench/gpu_throughput.py
        recs, _ = answer(model, tok, info, lambda p=policy: policy_from_spec(p, cfg, adapters=False), samples,
                         args.batch)
        name = policy.split(":")[0]
        rows.append({"task": "retrieval", "model": args.model, "dtype": args.dtype, "policy": policy,
                     "cache_size": args.cache_size if name != "full" else None,
                     "top_k": args.top_k if name.startswith("adore") else None,
                     "rebuild": args.rebuild if name == "adore" else None,
                     "rebuild_mode": args.rebuild_mode if name == "adore" else None,
                     "retrieval_acc": mean_accuracy(recs),
                     "retrieval_json": json.dumps(recs), "seconds": round(time.time() - t0, 1)})
        print(f"{policy:8s} acc {rows[-1]['retrieval_acc']:.3f}  {rows[-1]['seconds']} s", flush=True)
        if args.out:  # after every policy: a run stopped midway keeps the policies it finished
            save(res, args.out)
    return res


def save(res: dict, path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(res, f, indent=1)


def table(res: dict) -> str:
    """Accuracy by policy x prompt length (all tasks and depths), and each policy relative to full."""
    rows = res["rows"]
    lengths = sorted({x["length"] for r in rows for x in json.loads(r["retrieval_json"])})
    acc = {}
    for r in rows:
        for n in lengths:
            xs = [x for x in json.loads(r["retrieval_json"]) if x["length"] == n]
            acc[(r["policy"], n)] = sum(x["acc"] * x["n"] for x in xs) / sum(x["n"] for x in xs)
    out = ["| policy | " + " | ".join(f"{n} tok" for n in lengths) + " |", "|---|" + "---:|" * len(lengths)]
    for r in rows:
        cells = []
        for n in lengths:
            a, f = acc[(r["policy"], n)], acc[("full", n)] if ("full", n) in acc else None
            cells.append(f"{a:.2f}" + (f" ({a / f:.0%})" if f and r["policy"] != "full" else ""))
        out.append(f"| {r['policy']} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--text", default="data/austen/northangerabbey.txt")
    p.add_argument("--policies", default=DEFAULT_POLICIES)
    p.add_argument("--kinds", default="", help="comma list of retrieval tasks (default: all)")
    p.add_argument("--lengths", default="256,512,1024,2048")
    p.add_argument("--depths", default="0,0.25,0.5,0.75,1")
    p.add_argument("--per-cell", type=int, default=2)
    add_knob_args(p.add_argument_group("method"))
    p.set_defaults(top_k=None)  # the committed results ran dense attention over the cache
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="results JSON")
    p.add_argument("--plot", help="draw the heat maps of this results JSON next to it (no GPU needed)")
    args = p.parse_args()
    if args.plot:
        from jobs.report.plots import retrieval_plot

        res = json.load(open(args.plot))
        name = retrieval_plot(res["rows"], res["rows"][0]["model"], os.path.dirname(os.path.abspath(args.plot)))
        print(table(res), "\n", name)
        return 0
    res = measure(args)
    print(table(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
