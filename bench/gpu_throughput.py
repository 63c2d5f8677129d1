"""Decode throughput on one GPU: ADORE against full attention, Llama-2-7B shapes.

    python bench/gpu_throughput.py --out bench/results/gpu_throughput.json
    python bench/gpu_throughput.py --methods transformers,full --append   (split across calls)

Random weights (`random:llama2-7b`, bf16): throughput does not depend on weight values. For each
method and generation length, the largest batch whose KV cache fits in the free memory (capped by
--max-batch) generates that many tokens per sequence after a short prompt. Methods: the engine's
`adore` (m=192, K=96, R=8, --rebuild-mode), `window`, `h2o` and `full`, and `transformers` =
model.generate() with SDPA and its dynamic cache (full attention).

Recorded per run: generated tokens/s end to end (prefill included) and decode-only, per-step time
against length, peak memory, and the bandwidth floor of a step: the bytes it must read (weights once
plus the K/V of every attended slot) over the copy bandwidth measured in the same run. Bounded
policies need one run at the longest length: their batch does not depend on the length, and the
tokens/s at a shorter length L is read off the same run's first L steps.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from adore import AdoreConfig, SamplingParams  # noqa: E402
from adore.attention import head_dim  # noqa: E402
from adore.cache import SlotCache  # noqa: E402
from adore.cli import add_knob_args  # noqa: E402
from adore.config import knob_values  # noqa: E402
from adore.engine import Engine  # noqa: E402
from adore.models import load_model  # noqa: E402
from adore.policies import policy_from_spec  # noqa: E402

ENGINE_METHODS = ("adore", "adore-norebuild", "window", "h2o", "full")


def copy_bandwidth(dev) -> float:
    """Device copy bandwidth in bytes/s (bytes read + bytes written), median of 20."""
    x = torch.empty(1 << 30, dtype=torch.uint8, device=dev)
    y = torch.empty_like(x)
    times = []
    for _ in range(25):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        y.copy_(x)
        e.record()
        torch.cuda.synchronize()
        times.append(s.elapsed_time(e) / 1e3)
    del x, y
    return 2 * (1 << 30) / statistics.median(times[5:])


def kv_bytes_per_token(cfg, dtype_bytes=2) -> int:
    return 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * head_dim(cfg) * dtype_bytes


def fit_batch(model, tokens_per_seq: int, cap: int, headroom: float, extra_per_seq: int = 0) -> int:
    """Largest batch whose KV (tokens_per_seq each) fits in free memory with `headroom` kept back."""
    free, _ = torch.cuda.mem_get_info()
    per_seq = kv_bytes_per_token(model.config) * tokens_per_seq + extra_per_seq
    return max(1, min(cap, int(free * (1 - headroom) / per_seq)))


def prompts(batch: int, n: int, vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(0)
    return torch.randint(3, vocab, (batch, n), generator=g).tolist()


def engine_policy(method: str, args):
    """'adore' or a spec with settings ('adore:store_size=128') over the command line's knobs."""
    return policy_from_spec(method, AdoreConfig(**knob_values(args)), adapters=False)


def run_engine(lm, method, batch, length, args):
    model, tok, info = lm
    eng = Engine(model, tok, engine_policy(method, args), info=info, max_batch=batch,
                 max_seq_len=args.prompt_len + length + 2, cuda_graphs=not args.no_graphs,
                 max_prefill_tokens=batch * args.prompt_len)  # every prefill in the first step (timed apart)
    for p in prompts(batch, args.prompt_len, model.config.vocab_size):
        eng.add_request(p, SamplingParams(max_tokens=length, ignore_eos=True))
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    eng.step()  # all prefills + the first decode step
    torch.cuda.synchronize()
    t_prefill = time.perf_counter() - t0
    steps = []
    while eng.has_work():
        s = time.perf_counter()
        eng.step()
        torch.cuda.synchronize()
        steps.append(time.perf_counter() - s)
    stats = dict(eng.stats)
    slots = eng.cache.capacity
    del eng
    return t_prefill, steps, stats, slots


def run_transformers(model, batch, length, args):
    from transformers import StoppingCriteria, StoppingCriteriaList

    class Clock(StoppingCriteria):
        def __init__(self):
            self.stamps = []

        def __call__(self, input_ids, scores, **kw):
            torch.cuda.synchronize()
            self.stamps.append(time.perf_counter())
            return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    ids = torch.tensor(prompts(batch, args.prompt_len, model.config.vocab_size), device="cuda")
    clock = Clock()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    with torch.no_grad():
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=length, min_new_tokens=length,
                       do_sample=False, stopping_criteria=StoppingCriteriaList([clock]), pad_token_id=0)
    s = clock.stamps
    return s[0] - t0, [b - a for a, b in zip(s, s[1:])], {}, None


def measure(lm, method, length, args, bw, weight_bytes):
    """One (method, length) cell at the largest batch that fits; halves the batch on OOM.
    lm: (model, tokenizer, ModelInfo) from load_model."""
    model = lm[0]
    bounded = method.split(":")[0] in ENGINE_METHODS and method != "full"
    max_seq_len = args.prompt_len + length + 2
    if bounded or method == "full":  # K/V slots a sequence owns: its cache row and its second tier
        pol = engine_policy(method, args)
        slots = pol.capacity(max_seq_len)  # attended at most (the floor's K/V)
        tokens = SlotCache.slots_allocated(slots) + (pol.store_size + 1 if pol.store_size else 0)
    else:
        slots = tokens = max_seq_len
    # transformers grows its cache by concatenation: budget twice the final size
    gc.collect()  # free the previous run's cache and graph pools before reading free memory
    torch.cuda.empty_cache()
    batch = fit_batch(model, tokens * (2 if method == "transformers" else 1), args.max_batch, args.headroom,
                      extra_per_seq=args.act_bytes_per_seq)
    while True:
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        try:
            if method == "transformers":
                t_pre, steps, stats, _ = run_transformers(model, batch, length, args)
            else:
                t_pre, steps, stats, _ = run_engine(lm, method, batch, length, args)
            break
        except torch.OutOfMemoryError:
            if batch == 1:
                raise
            batch //= 2
            print(f"  OOM: {method} L={length}, retrying at batch {batch}", flush=True)
    peak = torch.cuda.max_memory_allocated()
    by_len = {}
    kv_tok = kv_bytes_per_token(model.config)
    for L in args.lengths:
        if L > length or (not bounded and L != length):  # unbounded: the batch depends on the length
            continue
        n = L - 1
        decode = sum(steps[:n])
        window = steps[max(0, n - 16) : n]
        attended = min(slots, args.prompt_len + L) if bounded else args.prompt_len + L
        floor = (weight_bytes + batch * attended * kv_tok) / bw
        step = statistics.median(window)
        by_len[str(L)] = {"tokens_per_s": batch * L / (t_pre + decode), "decode_tokens_per_s": batch * n / decode,
                          "step_ms": 1e3 * step, "floor_ms": 1e3 * floor, "floor_fraction": floor / step}
    return {"method": method, "gen_len": length, "batch": batch, "prefill_s": t_pre, "peak_mem_gb": peak / 1e9,
            "rebuilt_per_seq_step": stats.get("rebuilt", 0) / max(1, stats.get("decode_tokens", 1)),
            "by_length": by_len}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="random:llama2-7b")
    ap.add_argument("--methods", default="adore,window,h2o,full,transformers",
                    help="comma-separated; an engine policy may carry settings: adore:store_size=128")
    ap.add_argument("--lengths", default="512,1024,2048,4096")
    ap.add_argument("--prompt-len", type=int, default=32)
    add_knob_args(ap.add_argument_group("method"))
    ap.add_argument("--max-batch", type=int, default=512)
    ap.add_argument("--headroom", type=float, default=0.15, help="share of free memory kept back")
    ap.add_argument("--act-bytes-per-seq", type=int, default=4 << 20, help="activation allowance per sequence")
    ap.add_argument("--no-graphs", action="store_true", help="eager decode steps (no CUDA graphs)")
    ap.add_argument("--out", default="bench/results/gpu_throughput.json")
    ap.add_argument("--append", action="store_true", help="merge into an existing --out file")
    args = ap.parse_args()
    args.lengths = [int(x) for x in args.lengths.split(",")]
    if not torch.cuda.is_available():
        sys.exit("gpu_throughput.py needs a CUDA GPU (see bench/cpu_decode.py for the CPU benchmark)")
    torch.backends.cuda.matmul.allow_tf32 = True
    lm = load_model(args.model, dtype="bfloat16", device="cuda")
    model = lm[0]
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    bw = copy_bandwidth("cuda")
    print(f"{torch.cuda.get_device_name()}: copy bandwidth {bw / 1e12:.2f} TB/s, weights {weight_bytes / 1e9:.1f} GB",
          flush=True)
    results = []
    for method in args.methods.split(","):
        bounded = method.split(":")[0] in ENGINE_METHODS and method != "full"
        for length in ([max(args.lengths)] if bounded else args.lengths):
            t0 = time.perf_counter()
            try:
                r = measure(lm, method, length, args, bw, weight_bytes)
            except Exception as e:  # record and go on: one failure must not lose the other cells
                r = {"method": method, "gen_len": length, "error": f"{type(e).__name__}: {e}"[:500]}
            r["wall_s"] = time.perf_counter() - t0
            results.append(r)
            for L, v in r.get("by_length", {}).items():
                print(f"{method:16s} L={L:>5s} b={r['batch']:4d} {v['tokens_per_s']:9.0f} tok/s "
                      f"step {v['step_ms']:6.2f} ms (floor {v['floor_ms']:5.2f}, {100 * v['floor_fraction']:3.0f}%)",
                      flush=True)
            if "error" in r:
                print(f"{method} L={length}: {r['error']}", flush=True)
    meta = {"command": "python " + " ".join(sys.argv), "device": torch.cuda.get_device_name(),
            "torch": torch.__version__, "model": args.model, "dtype": "bfloat16", "copy_bw_Bps": bw,
            "weight_bytes": weight_bytes, "cuda_graphs": not args.no_graphs, "date": time.strftime("%Y-%m-%d"),
            "config": {**knob_values(args), "prompt_len": args.prompt_len, "max_batch": args.max_batch}}
    out = {"runs": []}
    if args.append and os.path.exists(args.out):
        out = json.load(open(args.out))
    out.setdefault("meta_by_call", []).append(meta)
    out["runs"] = [r for r in out["runs"] if r["method"] not in args.methods.split(",")] + results
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    json.dump(out, open(args.out, "w"), indent=1)
    summarize(out)
    plot(out, args.out.replace(".json", ".png"))


def summarize(out):
    """The targets: adore vs transformers at 2048 tokens, and step time against the floor."""
    at = {r["method"]: r["by_length"].get("2048") for r in out["runs"] if "by_length" in r}
    if at.get("adore") and at.get("transformers"):
        print(f"adore / transformers at 2048 tokens: "
              f"{at['adore']['tokens_per_s'] / at['transformers']['tokens_per_s']:.2f}x")


def plot(out, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.2))
    for m in dict.fromkeys(r["method"] for r in out["runs"]):
        pts = sorted((int(L), v) for r in out["runs"] if r["method"] == m for L, v in r.get("by_length", {}).items())
        if pts:
            a.plot([L for L, _ in pts], [v["tokens_per_s"] for _, v in pts], marker="o", label=m)
            b.plot([L for L, _ in pts], [v["step_ms"] for _, v in pts], marker="o", label=f"{m}")
            b.plot([L for L, _ in pts], [v["floor_ms"] for _, v in pts], ls=":", color=b.lines[-1].get_color())
    a.set(xlabel="generated tokens", ylabel="generated tokens/s (largest batch that fits)", xscale="log")
    b.set(xlabel="generated tokens", ylabel="ms per decode step (dotted: bandwidth floor)", xscale="log")
    for ax in (a, b):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"Llama-2-7B shapes, bf16, {out['meta_by_call'][-1]['device']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
