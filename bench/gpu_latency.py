"""Time to first token under load, on one GPU: a burst of short prompts, and long prompts arriving
while many sequences decode. The engine itself (no HTTP), Llama-2-7B shapes with random weights.

    python bench/gpu_latency.py --methods adore,full --out bench/results/gpu_latency_h200.json

burst  --burst prompts of --burst-len tokens submitted at once to an idle engine. Per request: time
       from submission to its first token. Target (issue 19): every first token within 1 s.
mixed  --decoders sequences decoding (32-token prompts); then --arrivals prompts of --arrival-len
       tokens arrive at once. Recorded from the arrival until every arrival has its first token and
       --after more steps: each step's wall time (its p50 and p99: the decode rows' inter-token
       latency) and the arrivals' time to first token. Targets: step p99 <= 2x its median, every
       first token within 2 s.

Each scenario is preceded by a short warm-up of the same shapes (CUDA graphs captured, kernels
compiled), as a server does before it takes traffic. A scenario that does not fit in memory is
recorded with its error and the others go on.

--profile K  runs the mixed scenario's first K steps after the arrival under torch.profiler and prints
             where their time goes (the engine's adore.* labels and the top kernels); those steps'
             timings then include the profiler's overhead: a diagnosis, not a figure.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from adore import AdoreConfig, SamplingParams  # noqa: E402
from adore.cli import add_knob_args  # noqa: E402
from adore.config import knob_values  # noqa: E402
from adore.engine import Engine  # noqa: E402
from adore.models import load_model  # noqa: E402
from adore.policies import policy_from_spec  # noqa: E402


def prompts(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (n, length), generator=g).tolist()


def make_engine(lm, method: str, args, max_batch: int, max_seq_len: int) -> Engine:
    model, tok, info = lm
    policy = policy_from_spec(method, AdoreConfig(**knob_values(args)), adapters=False)
    return Engine(model, tok, policy, info=info, max_batch=max_batch,
                  max_seq_len=max_seq_len, max_prefill_tokens=args.max_prefill_tokens)


def drain(eng: Engine) -> None:
    for rid in list(eng.requests):
        eng.abort(rid)
    eng.requests.clear()


def timed_step(eng: Engine) -> tuple[float, list]:
    t = time.perf_counter()
    outs = eng.step()
    if eng.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t, outs


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def burst(lm, method: str, args) -> dict:
    vocab = lm[0].config.vocab_size
    eng = make_engine(lm, method, args, args.burst, args.burst_len + args.gen + 2)
    params = SamplingParams(max_tokens=args.gen, ignore_eos=True)
    for p in prompts(args.burst, args.burst_len, vocab, 1):  # warm-up: the same shapes, then dropped
        eng.add_request(p, params)
    for _ in range(8):
        eng.step()
    drain(eng)
    t0 = time.perf_counter()
    sent = {eng.add_request(p, params) for p in prompts(args.burst, args.burst_len, vocab, 2)}
    first: dict[str, float] = {}
    steps = 0
    while len(first) < len(sent):
        _, outs = timed_step(eng)
        steps += 1
        now = time.perf_counter()
        for o in outs:
            if o.token_id is not None and o.request_id not in first:
                first[o.request_id] = now - t0
    ttft = list(first.values())
    return {"scenario": "burst", "method": method, "requests": args.burst, "prompt_len": args.burst_len,
            "max_prefill_tokens": eng.max_prefill_tokens,
            "steps_to_all_first_tokens": steps, "ttft_p50_s": statistics.median(ttft), "ttft_p99_s": pct(ttft, 0.99),
            "ttft_max_s": max(ttft), "target_max_s": 1.0, "met": max(ttft) <= 1.0}


def mixed(lm, method: str, args) -> dict:
    vocab = lm[0].config.vocab_size
    rows = args.decoders + args.arrivals
    eng = make_engine(lm, method, args, rows, args.arrival_len + args.gen + 2)
    long = SamplingParams(max_tokens=args.gen, ignore_eos=True)
    # warm-up: a few long prompts beside decoding rows (graphs, prefill kernels), then dropped
    for p in prompts(args.decoders, 32, vocab, 3):
        eng.add_request(p, long)
    while eng.waiting:
        eng.step()
    for p in prompts(min(4, args.arrivals), args.arrival_len, vocab, 4):
        eng.add_request(p, long)
    for _ in range(4 + args.arrival_len * 4 // eng.max_prefill_tokens):
        eng.step()
    drain(eng)
    for p in prompts(args.decoders, 32, vocab, 5):
        eng.add_request(p, long)
    while eng.waiting:
        eng.step()
    base = [timed_step(eng)[0] for _ in range(16)]  # decode alone
    t0 = time.perf_counter()
    sent = {eng.add_request(p, SamplingParams(max_tokens=16, ignore_eos=True))
            for p in prompts(args.arrivals, args.arrival_len, vocab, 6)}
    first: dict[str, float] = {}
    steps: list[float] = []
    # the caching allocator's retries (out of memory: it frees its cache, syncing, and tries again), counted
    # and its new device allocations (cudaMalloc), counted
    def allocs() -> tuple[int, int]:
        st = torch.cuda.memory_stats()
        return st.get("num_alloc_retries", 0), st.get("num_device_alloc", 0)

    retries = [allocs()] if eng.device.type == "cuda" else []
    after = 0

    def step() -> None:
        dt, outs = timed_step(eng)
        steps.append(dt)
        if eng.device.type == "cuda":
            retries.append(allocs())
        now = time.perf_counter()
        for o in outs:
            if o.request_id in sent and o.token_id is not None and o.request_id not in first:
                first[o.request_id] = now - t0

    if args.profile:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(args.profile):
                step()
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=40, max_name_column_width=60))
    while after < args.after:
        step()
        after += len(first) == len(sent)
    ttft = list(first.values())
    med = statistics.median(steps)
    return {"scenario": "mixed", "method": method, "decoders": args.decoders, "arrivals": args.arrivals,
            "arrival_len": args.arrival_len, "max_prefill_tokens": eng.max_prefill_tokens,
            "decode_alone_step_ms": 1e3 * statistics.median(base), "step_p50_ms": 1e3 * med,
            "step_p99_ms": 1e3 * pct(steps, 0.99), "steps": len(steps), "p99_over_p50": pct(steps, 0.99) / med,
            "ttft_p50_s": statistics.median(ttft), "ttft_max_s": max(ttft), "target_ttft_s": 2.0,
            "met": pct(steps, 0.99) <= 2 * med and max(ttft) <= 2.0, "profiled_steps": args.profile,
            "step_ms": [round(1e3 * t, 2) for t in steps],
            "alloc_retries_by_step": [b[0] - a[0] for a, b in zip(retries, retries[1:])],
            "device_allocs_by_step": [b[1] - a[1] for a, b in zip(retries, retries[1:])]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="default: random:llama2-7b (cuda), random:tiny (cpu)")
    ap.add_argument("--methods", default="adore,full", help="comma-separated; settings as adore:store_size=128")
    ap.add_argument("--scenarios", default="burst,mixed")
    ap.add_argument("--burst", type=int, default=512)
    ap.add_argument("--burst-len", type=int, default=32)
    ap.add_argument("--decoders", type=int, default=256)
    ap.add_argument("--arrivals", type=int, default=64)
    ap.add_argument("--arrival-len", type=int, default=2000)
    ap.add_argument("--gen", type=int, default=256, help="tokens the decoding rows may generate")
    ap.add_argument("--after", type=int, default=16, help="steps recorded after the last first token")
    ap.add_argument("--max-prefill-tokens", type=int, default=None, help="default: by device (4096 cuda, 1024 cpu)")
    add_knob_args(ap.add_argument_group("method"))
    ap.add_argument("--profile", type=int, default=0, metavar="K", help="profile the mixed scenario's first K steps")
    ap.add_argument("--device", default="cuda", help="cpu: a smoke run of the script (random:tiny)")
    ap.add_argument("--out", default="bench/results/gpu_latency.json")
    args = ap.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("gpu_latency.py needs a CUDA GPU (bench/serve_bench.py measures the CPU)")
    torch.backends.cuda.matmul.allow_tf32 = True
    args.model = args.model or ("random:llama2-7b" if args.device == "cuda" else "random:tiny")
    dtype = "bfloat16" if args.device == "cuda" else "float32"
    lm = load_model(args.model, dtype=dtype, device=args.device)
    runs = []
    for method in args.methods.split(","):
        for scenario in args.scenarios.split(","):
            t0 = time.perf_counter()
            try:
                r = {"burst": burst, "mixed": mixed}[scenario](lm, method, args)
            except Exception as e:  # noqa: BLE001 - record and go on (an OOM loses one cell, not the call)
                r = {"scenario": scenario, "method": method, "error": f"{type(e).__name__}: {e}"[:400]}
            r["wall_s"] = time.perf_counter() - t0
            runs.append(r)
            print(json.dumps(r), flush=True)
            if args.device == "cuda":
                torch.cuda.empty_cache()
    out = {"command": "python " + " ".join(sys.argv),
           "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
           "torch": torch.__version__, "model": args.model, "dtype": dtype, "date": time.strftime("%Y-%m-%d"),
           "alloc_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF"), "config": knob_values(args), "runs": runs}
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    json.dump(out, open(args.out, "w"), indent=1)


if __name__ == "__main__":
    main()
