"""Decode speed on this machine: the engine's policies beside transformers' generate().

    python bench/cpu_decode.py --out bench/results/cpu_decode.json   (SmolLM2-135M fp32, batch 1 and 8)

For every (method, batch) one run generates --max-len tokens per sequence (ignore EOS) after a short
prompt; each step's wall time is recorded, so one run gives tokens/s and per-step time at every
length 256..max-len. Methods: the engine's `full`, `adore` (rebuild every / promote), `adore-norebuild`,
and `transformers` = model.generate() with its dynamic KV cache and SDPA (full attention).

Beside each measurement the JSON records the step's arithmetic: query rows through the linear
layers, FLOPs, and the bytes a step must read (weights once, plus the K/V it attends to), so the
figures can be explained rather than just quoted.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import replace

import torch
from tqdm import tqdm

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from adore import AdoreConfig, SamplingParams  # noqa: E402
from adore.attention import head_dim  # noqa: E402
from adore.cli import add_knob_args  # noqa: E402
from adore.config import knob_values  # noqa: E402
from adore.engine import Engine  # noqa: E402
from adore.models import load_model  # noqa: E402
from adore.policies import make_policy  # noqa: E402

METHODS = {
    "full": ("full", "promote"),
    "adore-every": ("adore", "every"),
    "adore-promote": ("adore", "promote"),
    "adore-norebuild": ("adore-norebuild", "promote"),
    "transformers": (None, None),
}


def prompt_ids(tok, n: int, seed: int) -> list[int]:
    text = open(os.path.join(os.path.dirname(__file__), "..", "data", "austen", "emma.txt")).read()
    ids = tok.encode(text, add_special_tokens=False)
    start = 1000 + 97 * seed
    return ids[start : start + n]


def run_engine(model, tok, info, policy_name, mode, batch, max_len, prompt_len, cfg: AdoreConfig):
    cfg = replace(cfg, rebuild_mode=mode)  # the method's mode (METHODS) wins over --rebuild-mode
    eng = Engine(model, tok, make_policy(policy_name, cfg), info=info, max_batch=batch,
                 max_seq_len=prompt_len + max_len + 2,
                 max_prefill_tokens=batch * prompt_len)  # every prefill in the first step (left out below)
    for b in range(batch):
        eng.add_request(prompt_ids(tok, prompt_len, b), SamplingParams(max_tokens=max_len, ignore_eos=True))
    times, rows = [], []
    eng.step()  # prefill of every sequence + the first decode step: not decode-only, left out
    bar = tqdm(total=max_len - 1, desc=f"{policy_name}/{mode} b={batch}", leave=False)
    while eng.has_work():
        rebuilt0 = eng.stats["rebuilt"]
        t0 = time.perf_counter()
        eng.step()
        times.append(time.perf_counter() - t0)
        rows.append((eng.stats["rebuilt"] - rebuilt0) / batch)
        bar.update(1)
    bar.close()
    extra = {"rebuilt_per_seq_step": sum(rows) / max(1, len(rows)),
             "peak_cache_tokens": eng.stats["peak_cache_tokens"],
             "kv_bytes_per_sequence": eng.cache.kv_bytes_per_sequence()}
    return times, extra


def run_transformers(model, tok, batch, max_len, prompt_len):
    from transformers import StoppingCriteria, StoppingCriteriaList

    class Clock(StoppingCriteria):
        def __init__(self):
            self.stamps = []

        def __call__(self, input_ids, scores, **kw):
            self.stamps.append(time.perf_counter())
            return torch.zeros(input_ids.shape[0], dtype=torch.bool)

    ids = torch.tensor([prompt_ids(tok, prompt_len, b) for b in range(batch)])
    clock = Clock()
    with torch.no_grad():
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_len,
                       min_new_tokens=max_len, do_sample=False, stopping_criteria=StoppingCriteriaList([clock]),
                       pad_token_id=0)
    s = clock.stamps  # one stamp per generated token; the first follows the prefill
    return [b - a for a, b in zip(s, s[1:])], {}


def arithmetic(model, rows: float, kv_tokens: float, batch: int) -> dict:
    """Per decode step: FLOPs of the linear layers and attention, and bytes that must be read."""
    c = model.config
    params = sum(p.numel() for p in model.parameters())
    hd = head_dim(c)
    linear_flops = 2 * params * rows * batch
    attn_flops = 4 * c.num_hidden_layers * c.num_attention_heads * hd * kv_tokens * rows * batch
    kv_bytes = 2 * c.num_hidden_layers * c.num_key_value_heads * hd * 4 * kv_tokens * batch
    return {"rows_per_seq": rows, "gflop": (linear_flops + attn_flops) / 1e9,
            "weight_mb": params * 4 / 1e6, "kv_read_mb": kv_bytes / 1e6}


def summarize(times, lengths, batch):
    """tokens/s to generate the first L tokens, and the median step time around length L."""
    out = {}
    for L in lengths:
        n = min(L, len(times) + 1) - 1
        if n < 1:
            continue
        window = times[max(0, n - 32) : n]
        out[str(L)] = {"tokens_per_s": round(batch * n / sum(times[:n]), 2),
                       "step_ms": round(1000 * statistics.median(window), 2)}
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--max-len", type=int, default=2048)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--methods", default=",".join(METHODS))
    add_knob_args(ap.add_argument_group("method (--rebuild-mode: the methods set their own)"))
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--out", default="bench/results/cpu_decode.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, tok, info = load_model(args.model)
    lengths = [L for L in (32, 64, 128, 256, 512, 1024, 2048, 4096) if L <= args.max_len]
    cfg = AdoreConfig(**knob_values(args))
    results = []

    def save():  # after every run, so that an interrupted benchmark keeps what it measured
        meta = {"command": "python " + " ".join(sys.argv), "model": args.model, "dtype": "float32",
                "threads": args.threads, "cpu": platform.processor() or platform.machine(),
                "cores": os.cpu_count(), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
                # the rebuild mode is each method's own (METHODS)
                "config": {k: v for k, v in knob_values(args).items() if k != "rebuild_mode"},
                "loadavg_at_end": open("/proc/loadavg").read().split()[:3]}
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out, "w") as f:
            json.dump({"meta": meta, "results": results}, f, indent=1)

    for batch in [int(b) for b in args.batches.split(",")]:
        for name in args.methods.split(","):
            pol, mode = METHODS[name]
            gc.collect()
            t0 = time.perf_counter()
            if pol is None:
                times, extra = run_transformers(model, tok, batch, args.max_len, args.prompt_len)
            else:
                times, extra = run_engine(model, tok, info, pol, mode, batch, args.max_len, args.prompt_len, cfg)
            rows = 1 + extra.get("rebuilt_per_seq_step", 0.0)
            bounded = pol not in (None, "full")
            per_len = summarize(times, lengths, batch)
            for L, v in per_len.items():
                kv = min(int(L), args.cache_size + rows) if bounded else args.prompt_len + int(L)
                v.update(arithmetic(model, rows, kv, batch))
            results.append({"method": name, "batch": batch, "wall_s": round(time.perf_counter() - t0, 1),
                            "loadavg": open("/proc/loadavg").read().split()[:3],
                            "by_length": per_len, **extra})
            last = per_len[str(lengths[-1])]
            save()
            print(f"{name:16s} b={batch}  {last['tokens_per_s']:8.1f} tok/s  "
                  f"{last['step_ms']:7.1f} ms/step at {lengths[-1]}", flush=True)
    plot(results, args.out.replace(".json", ".png"))


def plot(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batches = sorted({r["batch"] for r in results})
    fig, axes = plt.subplots(1, len(batches), figsize=(6 * len(batches), 4), squeeze=False)
    for ax, b in zip(axes[0], batches):
        for r in (r for r in results if r["batch"] == b):
            Ls = [int(L) for L in r["by_length"]]
            ax.plot(Ls, [r["by_length"][str(L)]["step_ms"] for L in Ls], marker="o", label=r["method"])
        ax.set(title=f"batch {b}", xlabel="generated tokens", ylabel="ms per decode step", xscale="log")
        ax.set_xticks(Ls, [str(L) for L in Ls])
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("SmolLM2-135M fp32 decode step time on CPU")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
