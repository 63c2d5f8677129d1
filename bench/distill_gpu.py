"""Search for a top-K adapter that keeps greedy generation faithful to dense attention, on one GPU.

The CPU takes ~27 min for 300 distillation steps of SmolLM2-135M, and the free-running fidelity of
50 prompts swings by ~10 BLEU between close adapters, so the CPU cannot compare recipes. This runs
several `adore finetune --distill` recipes back to back on a GPU and scores each on 200 held-out
prompts (Northanger Abbey, 128 tokens + 256 greedy), the same prompts as bench/quality.py's
200-prompt rows, in two ways:
- teacher-forced agreement (less noisy): full attention's greedy continuation is fed through the
  policy; the share of steps where the policy's argmax is full's token, and the mean step of the
  first miss;
- free-running: each policy's own greedy continuation, BLEU against full's (texts kept, so ROUGE-L
  and BERTScore are scored afterwards on the CPU by adore/evaluation.py, bench/quality.py's scorers).

Evaluation runs in fp32 without TF32 (so that top-K is the only difference from dense); training
allows TF32. Work (adapters, results) goes to --work and is resumed: a second call trains and scores
only what is missing. Every variant is `name=key:value,...` with keys data (books|self|mix),
steps, batch, lr, r, hard, seed.

    python bench/distill_gpu.py --work gpu_work --out $OUT --train-files train_text/*.txt
    python bench/distill_gpu.py --summarize OUT/results.json "<the commands that made it>"  # CPU
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from adore.config import AdoreConfig, SamplingParams  # noqa: E402
from adore.engine import Engine  # noqa: E402
from adore.evaluation import corpus_bleu, fidelity_summary, paired_bootstrap, spread_spans  # noqa: E402
from adore.models import load_model  # noqa: E402
from adore.policies import make_policy  # noqa: E402
from adore.train.cli import interleaved_segments  # noqa: E402
from adore.train.finetune import FinetuneConfig, apply_adapter, finetune  # noqa: E402
from adore.train.labels import segments, self_generated  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
DEFAULTS = {"data": "self", "steps": 600, "batch": 8, "lr": 5e-4, "r": 8, "hard": 0.0, "seed": 0}


def parse_variant(spec: str) -> tuple[str, dict]:
    name, _, rest = spec.partition("=")
    v = dict(DEFAULTS)
    for kv in filter(None, rest.split(",")):
        k, _, val = kv.partition(":")
        if k not in v:
            raise SystemExit(f"unknown key {k!r} in variant {spec!r}")
        v[k] = type(DEFAULTS[k])(val)
    return name, v


def held_out_prompts(tok, path: str, n: int, span: int) -> list[list[int]]:
    """The prompts of bench/quality.py (prompts_from): n spans spread evenly over the text."""
    with open(path, encoding="utf-8") as f:
        return spread_spans(tok.encode(f.read(), add_special_tokens=False), n, span, name=path)


def evaluate(model, tok, info, spec: str, prompts, ref_ids, max_new: int) -> dict:
    """Teacher-forced agreement with full's continuation, then the policy's own greedy text (info: the
    model's ModelInfo, which picks the shipped controller and, after an adapter, the top-K prefill)."""
    name, _, opt = spec.partition(":")
    cfg = AdoreConfig(cache_size=192, top_k=None if opt == "top_k=none" else 96)
    n, L = len(prompts), len(prompts[0]) + max_new + 1
    t0 = time.perf_counter()
    eng = Engine(model, tok, make_policy(name, cfg), info=info, max_batch=n, max_seq_len=L)
    rids = [eng.add_request(p, SamplingParams(forced_tokens=r)) for p, r in zip(prompts, ref_ids)]
    while eng.has_work():
        eng.step()
    # from `start` (the cache first full): bench/quality.py's agreement; before it only top-K acts
    start = max(0, 192 - len(prompts[0]))
    hits, first = [], []
    for rid in rids:
        h = eng.result(rid).top1
        hits.append(h)
        first.append(next((i for i, x in enumerate(h) if not x), len(h)))
    eng = Engine(model, tok, make_policy(name, cfg), info=info, max_batch=n, max_seq_len=L)
    outs = eng.generate(prompts, SamplingParams(max_tokens=max_new, ignore_eos=True))
    texts = [o.text for o in outs]
    late = [x for h in hits for x in h[start:]]
    return {"top1": round(100 * sum(late) / len(late), 3),
            "top1_all": round(100 * sum(map(sum, hits)) / sum(map(len, hits)), 3),
            "first_miss_all": round(sum(first) / n, 1), "prompts_no_miss": sum(f == max_new for f in first),
            "texts": texts,
            "token_ids": [o.token_ids for o in outs], "seconds": round(time.perf_counter() - t0, 1)}


def summarize(path: str, command: str) -> None:
    """On the CPU: score a run's results.json (from --out) with adore/evaluation.py (BLEU,
    ROUGE-L, BERTScore, paired bootstrap against plain adore), write bench/results/distill_gpu.json
    (figures) and distill_gpu_generations.json.gz (texts, to rescore), print a table."""
    import gzip

    res = json.load(open(path))
    ref = res["full"]["texts"]
    out, gens = {"device": res.get("device"), "command": command}, {"full": ref}
    for key, r in res.items():
        if not isinstance(r, dict) or "texts" not in r or key == "full":
            continue
        sc = fidelity_summary(r["texts"], ref)
        gens[key] = r["texts"]
        row = {k: v for k, v in r.items() if k not in ("texts", "token_ids")}
        row.update({k: sc[k] for k in ("bleu", "rougeL", "bertscore_f1", "exact_match")}, per_prompt=sc["per_prompt"])
        out[key] = row
    for key, row in out.items():
        if key.startswith("adore+"):
            row["minus_adore"] = paired_bootstrap(row["per_prompt"], out["adore"]["per_prompt"])
    dst = os.path.join(RESULTS, "distill_gpu.json")
    json.dump({k: ({x: y for x, y in v.items() if x != "per_prompt"} if isinstance(v, dict) else v)
               for k, v in out.items()}, open(dst, "w"), indent=1)
    with gzip.open(os.path.join(RESULTS, "distill_gpu_generations.json.gz"), "wt") as f:
        json.dump(gens, f)
    print(f"{'policy':22s} {'top1':>7s} {'top1 all':>8s} {'1st miss':>8s} {'BLEU':>6s} {'ROUGE-L':>7s} {'BERT':>6s}")
    for key, r in out.items():
        if isinstance(r, dict):
            print(f"{key:22s} {r['top1']:7.3f} {r.get('top1_all') or float('nan'):8.3f} "
                  f"{r.get('first_miss_all') or float('nan'):8.1f} {r['bleu']:6.2f} {r['rougeL']:7.2f} "
                  f"{r['bertscore_f1']:6.2f} {r.get('minus_adore', '')}")


def main() -> None:
    if sys.argv[1:2] == ["--summarize"]:
        return summarize(sys.argv[2], " ".join(sys.argv[3:]))
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", required=True, help="resumable work directory (adapters, results.json)")
    p.add_argument("--out", required=True, help="where results.json and the adapters are copied")
    p.add_argument("--train-files", nargs="+", required=True)
    p.add_argument("--heldout", default="data/austen/northangerabbey.txt")
    p.add_argument("--prompts", type=int, default=200)
    p.add_argument("--self-seqs", type=int, default=1024, help="self-generated training sequences")
    p.add_argument("--variants", nargs="+", default=[
        "books300=data:books,steps:300,batch:1", "self600=data:self", "self600h1=data:self,hard:1",
        "self600h1r32=data:self,hard:1,r:32", "self2000h1=data:self,hard:1,steps:2000",
        "mix2000h1=data:mix,hard:1,steps:2000"])
    p.add_argument("--max-new", type=int, default=256, help="greedy tokens after each 128-token prompt")
    p.add_argument("--device", default="cuda")
    p.add_argument("--deadline", type=float, default=560, help="seconds: start no variant after ~this")
    args = p.parse_args()
    t_start = time.time()
    os.makedirs(args.work, exist_ok=True)
    res_path = os.path.join(args.work, "results.json")
    results = json.load(open(res_path)) if os.path.exists(res_path) else {}

    def save():
        json.dump(results, open(res_path, "w"), indent=1)
        os.makedirs(args.out, exist_ok=True)
        shutil.copy(res_path, args.out)

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    model, tok, info = load_model("smollm2-135m", device=args.device)
    results["device"] = torch.cuda.get_device_name() if args.device == "cuda" else args.device
    prompts = held_out_prompts(tok, args.heldout, args.prompts, 128)
    if "full" not in results:
        eng = Engine(model, tok, make_policy("full", AdoreConfig()), info=info, max_batch=len(prompts),
                     max_seq_len=129 + args.max_new)
        outs = eng.generate(prompts, SamplingParams(max_tokens=args.max_new, ignore_eos=True))
        results["full"] = {"texts": [o.text for o in outs], "token_ids": [o.token_ids for o in outs]}
        save()
    ref = results["full"]
    for spec in ("adore", "adore:top_k=none", "sink", "h2o"):
        if spec not in results or spec == "adore" and "top1_all" not in results[spec]:
            r = evaluate(model, tok, info, spec, prompts, ref["token_ids"], args.max_new)
            r["bleu"] = round(corpus_bleu(r["texts"], ref["texts"]), 2)
            results[spec] = r
            save()
            print(f"{spec:24s} top1 {r['top1']:.3f} all {r['top1_all']:.3f} first_miss {r['first_miss_all']} "
                  f"bleu {r['bleu']}", flush=True)

    texts = [open(f, encoding="utf-8").read() for f in args.train_files]
    data = {}
    for spec in args.variants:
        name, v = parse_variant(spec)
        key = f"adore+{name}"
        if key in results:
            continue
        if time.time() - t_start > args.deadline:
            print(f"deadline: {name} not started", flush=True)
            break
        if v["data"] in ("self", "mix") and "self" not in data:
            per = -(-args.self_seqs // len(texts))
            pr = interleaved_segments(tok, texts, 128, per)[: args.self_seqs]
            data["self"] = self_generated(model, tok, pr, args.max_new, batch=256, progress=False)
        if v["data"] in ("books", "mix") and "books" not in data:
            data["books"] = segments(tok, texts, 128 + args.max_new)
        seqs = data["self"] + data["books"] if v["data"] == "mix" else data[v["data"]]
        torch.backends.cuda.matmul.allow_tf32 = True
        base = load_model("smollm2-135m", device=args.device)[0]
        cfg = FinetuneConfig(top_k=96, seq_len=128 + args.max_new, steps=v["steps"], batch=v["batch"], lr=v["lr"],
                             lora_r=v["r"], lora_alpha=2 * v["r"], quantize=False, seed=v["seed"],
                             distill=True, hard=v["hard"])
        adir = os.path.join(args.work, "adapters", name)
        if os.path.exists(os.path.join(adir, "adore_finetune.json")):  # trained by an earlier call
            rep = json.load(open(os.path.join(adir, "adore_finetune.json")))
        else:
            _, rep = finetune(base, seqs, cfg, out_dir=adir, progress=False,
                              meta={"model": "smollm2-135m", "variant": spec, "train_seqs": len(seqs)})
        torch.backends.cuda.matmul.allow_tf32 = False
        del base
        merged, merged_info = apply_adapter(load_model("smollm2-135m", device=args.device)[0], info, adir)
        r = evaluate(merged, tok, merged_info, "adore", prompts, ref["token_ids"], args.max_new)
        r.update(bleu=round(corpus_bleu(r["texts"], ref["texts"]), 2), variant=v, train_seconds=rep["seconds"],
                 loss_first=rep["loss_first"], loss_last10=rep["loss_last10"], train_seqs=len(seqs))
        results[key] = r
        save()
        shutil.copytree(adir, os.path.join(args.out, "adapters", name), dirs_exist_ok=True)
        print(f"{key:24s} top1 {r['top1']:.3f} all {r['top1_all']:.3f} first_miss {r['first_miss_all']} "
              f"bleu {r['bleu']} "
              f"loss {rep['loss_first']:.4f}->{rep['loss_last10']:.4f} train {rep['seconds']}s", flush=True)
        del merged
        torch.cuda.empty_cache()
    save()
    print(f"total {time.time() - t_start:.0f}s")


if __name__ == "__main__":
    main()
