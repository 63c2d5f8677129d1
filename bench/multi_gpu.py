"""Multi-GPU serving: one replica with tp=2 against two replicas with tp=1, and one GPU, behind Serve.

    python bench/multi_gpu.py --out bench/results/multi_gpu.json          # on a 2-GPU node: everything
    python bench/multi_gpu.py --policies adore --out a.json               # split across calls, then
    python bench/multi_gpu.py --merge a.json b.json --out bench/results/multi_gpu.json   # merge + plot
    python bench/multi_gpu.py --model random:tiny --device cpu --tokens 24 --batch 4 \\
        --check-tokens 8 --out /tmp/mg.json                                 # CPU smoke (gloo)

Layouts are "RxT": R Serve replicas of T tensor-parallel ranks (DeepSpeed AutoTP over NCCL, one Ray
actor and one GPU per rank). 1x1 is the one-GPU baseline, measured in the same call as 1x2 and 2x1.
Each (policy, layout) gets its own Serve application (cluster.app:build_app) on one local Ray; every
client streams one greedy /v1/completions of exactly --tokens tokens (`ignore_eos`) after a
--prompt-tokens prompt given as token ids, all clients sent at once.

Batch: B = the largest number of sequences whose KV cache fits on one GPU beside the weights (from
the GPU's memory, the model's shapes and the policy's slots per sequence), capped by --batch. Each
layout gets B sequences per GPU: 1x1 runs B clients, 1x2 and 2x1 run 2B (the tp=2 replica keeps half
the heads of every sequence per GPU, so 2B fit there too).

Recorded per run: throughput (generated tokens / wall time, first request sent -> last token),
time-to-first-token p50/p95, per-token latency, mean engine batch, and for 2-GPU layouts the scaling
efficiency = throughput / (2 x the 1x1 throughput of the same policy). Before the runs, a greedy
check builds one shard group with tp=1 and one with tp=2 directly (no Serve, --check-dtype, default
float32 so that summation order cannot flip a near-tie) and compares their tokens; the served runs'
texts are also compared across layouts (bf16: agreement is reported, not required).

NVLink multicast stays off: NCCL_NVLS_ENABLE=0, TORCH_SYMM_MEM_DISABLE_MULTICAST=1 and
NVSHMEM_DISABLE_NVLS=1 are set here and in every Ray worker's environment.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from adore.cli import add_knob_args  # noqa: E402
from adore.config import AdoreConfig, knob_values  # noqa: E402
from adore.loadgen import free_port, run_clients  # noqa: E402

NO_MULTICAST = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
GiB = 1 << 30


# -- sizing ------------------------------------------------------------------------------------------
def model_shapes(model: str) -> dict:
    from adore.attention import head_dim
    from adore.models import RANDOM_SHAPES

    if not model.startswith("random:"):
        raise SystemExit("multi_gpu.py sizes batches from random:<shape> models; give one (e.g. random:llama2-7b)")
    s = dict(RANDOM_SHAPES[model.split(":", 1)[1]])
    s.setdefault("num_key_value_heads", s["num_attention_heads"])
    s["head_dim"] = head_dim(SimpleNamespace(**s))  # the library's rule, read from the shape as a config
    return s


def weight_bytes(s: dict, dtype_bytes: int) -> int:
    h, i, L, v = s["hidden_size"], s["intermediate_size"], s["num_hidden_layers"], s["vocab_size"]
    kv = s["num_key_value_heads"] * s["head_dim"]
    per_layer = h * h * 2 + h * kv * 2 + 3 * h * i
    return dtype_bytes * (L * per_layer + 2 * v * h)


def slots_per_seq(policy: str, a) -> int:
    """KV slots the engine allocates per sequence: the policy's capacity plus SlotCache's trash slot."""
    from adore.cache import SlotCache
    from adore.policies import make_policy

    max_seq_len = a.prompt_tokens + a.tokens + 8  # run_layout's
    return SlotCache.slots_allocated(make_policy(policy, AdoreConfig(**knob_values(a))).capacity(max_seq_len))


def fit_batch(policy: str, a, gpu_bytes: int) -> tuple[int, int]:
    """(batch per GPU, the uncapped fit)."""
    if a.device == "cpu":
        return a.batch, a.batch
    s = model_shapes(a.model)
    nbytes = 2 if a.dtype in ("bfloat16", "float16") else 4
    kv_seq = 2 * s["num_hidden_layers"] * s["num_key_value_heads"] * s["head_dim"] * nbytes * slots_per_seq(policy, a)
    free = gpu_bytes * (1 - a.headroom) - weight_bytes(s, nbytes) - a.reserve_gib * GiB
    fit = max(1, int(free // kv_seq))
    return min(fit, a.batch), fit


def gpu_info() -> tuple[int, int, str]:
    """(GPU count, bytes per GPU, name) without touching CUDA in this process (Ray's actors own it)."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.total,name", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=30).stdout.strip().splitlines()
    except (OSError, subprocess.TimeoutExpired):
        return 0, 0, "none"
    if not out:
        return 0, 0, "none"
    mib, name = out[0].split(",", 1)
    return len(out), int(mib) << 20, name.strip()


# -- runs --------------------------------------------------------------------------------------------
def prompts(n: int, length: int, vocab: int = 259) -> list[list[int]]:
    """n distinct prompts of byte ids (valid for every model's tokenizer range here)."""
    import random

    rng = random.Random(0)
    return [[1] + [rng.randrange(3, vocab) for _ in range(length - 1)] for _ in range(n)]


def check_tp_tokens(a) -> dict:
    """Greedy tokens of tp=1 and tp=2 shard groups on the same prompts (no Serve in between)."""
    from adore.config import SamplingParams
    from workers import ShardGroup
    from workers.spec import EngineSpec

    spec = EngineSpec(model=a.model, policy="adore", **knob_values(a), dtype=a.check_dtype, device=a.device,
                      max_batch=a.check_prompts, max_seq_len=a.prompt_tokens + a.check_tokens + 8, threads=a.threads,
                      cuda_graphs=a.cuda_graphs)
    ps = prompts(a.check_prompts, a.prompt_tokens)
    out = {}
    for tp in (1, 2):
        t0 = time.perf_counter()
        group = ShardGroup(spec, tp, cpus_per_rank=a.cpus_per_rank)
        try:
            cmds = [("add", f"c{i}", p, SamplingParams(max_tokens=a.check_tokens, ignore_eos=True))
                    for i, p in enumerate(ps)]
            toks: dict[str, list[int]] = {f"c{i}": [] for i in range(len(ps))}
            while True:
                res = group.step_sync(cmds)
                cmds = []
                for o in res.outputs:
                    if o.token_id is not None:
                        toks[o.request_id].append(o.token_id)
                if res.n_active == 0 and res.n_waiting == 0:
                    break
        finally:
            group.shutdown()
        out[tp] = [toks[f"c{i}"] for i in range(len(ps))]
        print(f"check tp={tp}: {sum(map(len, out[tp]))} tokens in {time.perf_counter() - t0:.1f}s", flush=True)
    same = out[1] == out[2]
    first_diff = [next((j for j, (x, y) in enumerate(zip(s1, s2)) if x != y), None) for s1, s2 in zip(out[1], out[2])]
    print(f"check: tp=2 greedy tokens {'EQUAL' if same else 'DIFFER from'} tp=1 "
          f"({a.check_prompts} prompts x {a.check_tokens} tokens, {a.check_dtype})", flush=True)
    return {"equal": same, "dtype": a.check_dtype, "policy": "adore", "prompts": a.check_prompts,
            "tokens": a.check_tokens, "first_difference": first_diff, "tp1_tokens_head": out[1][0][:16],
            "tp2_tokens_head": out[2][0][:16]}


def wait_for_gpus(total: float, timeout_s: float = 120) -> None:
    """After serve.delete, wait until every rank actor has let go of its GPU."""
    import ray

    t0 = time.time()
    while time.time() - t0 < timeout_s:
        if ray.available_resources().get("GPU", 0) >= total:
            return
        time.sleep(1)
    print(f"warning: GPUs still held after {timeout_s}s: {ray.available_resources()}", flush=True)


def run_layout(a, policy: str, layout: str, per_gpu: int, base: str) -> tuple[dict, list[str]]:
    from ray import serve

    from cluster.app import build_app
    from cluster.config import ServeArgs

    r, t = (int(x) for x in layout.split("x"))
    per_replica = per_gpu * t
    args = {"model": a.model, "policies": policy, "tp": t, "num_replicas": r, "max_batch": per_replica,
            "max_queue": per_replica,
            # exactly the engine's rows: with more, Serve's router can give one replica extra requests
            # that wait a whole generation while the other replica has free rows
            "max_ongoing_requests": per_replica,
            "max_seq_len": a.prompt_tokens + a.tokens + 8, **knob_values(a), "dtype": a.dtype, "device": a.device,
            "cpus_per_rank": a.cpus_per_rank, "threads": a.threads, "stream_interval_s": a.stream_interval,
            "cuda_graphs": a.cuda_graphs}
    model = ServeArgs.parse(args).model_id(policy)
    t0 = time.perf_counter()
    serve.run(build_app(args), name="mg", route_prefix="/")
    startup = time.perf_counter() - t0
    try:
        # warm every replica (CUDA graphs of the first shapes, allocator) with short requests
        asyncio.run(run_clients(base, model, prompts(2 * r, a.prompt_tokens), 4))
        n = per_gpu * r * t
        stats, texts = asyncio.run(run_clients(base, model, prompts(n, a.prompt_tokens), a.tokens))
    finally:
        serve.delete("mg")
    stats.update({"policy": policy, "layout": layout, "replicas": r, "tp": t, "gpus": r * t,
                  "batch_per_replica": per_replica, "startup_s": round(startup, 1), "cuda_graphs": a.cuda_graphs,
            "stream_interval_s": a.stream_interval})
    return stats, texts


def agreement(texts_a: list[str], texts_b: list[str]) -> dict:
    """How far the served greedy outputs of two layouts agree (characters of common prefix)."""
    n = min(len(texts_a), len(texts_b))
    if n == 0:
        return {}
    pre = []
    for x, y in zip(texts_a[:n], texts_b[:n]):
        k = 0
        while k < min(len(x), len(y)) and x[k] == y[k]:
            k += 1
        pre.append(k / max(1, max(len(x), len(y))))
    return {"identical": sum(x == y for x, y in zip(texts_a[:n], texts_b[:n])), "compared": n,
            "mean_common_prefix": round(sum(pre) / n, 4)}


# -- output ------------------------------------------------------------------------------------------
def _same_setup(r: dict) -> tuple:
    """Runs comparable for scaling: same call (merged files keep theirs: the 1-GPU baseline is the one
    measured beside the run), policy, sequences per GPU and stream interval."""
    return r.get("call", 0), r["policy"], r["batch_per_replica"] // r["tp"], r.get("stream_interval_s", 0.0)


def add_efficiency(runs: list[dict]) -> None:
    base = {_same_setup(r): r["throughput_tok_s"] for r in runs if r["layout"] == "1x1" and r.get("throughput_tok_s")}
    for r in runs:
        one = base.get(_same_setup(r))
        if one and r["gpus"] > 1 and r.get("throughput_tok_s"):
            r["scaling_efficiency"] = round(r["throughput_tok_s"] / (r["gpus"] * one), 3)
            r["speedup_vs_1gpu"] = round(r["throughput_tok_s"] / one, 3)


def plot(out: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    main_interval = out.get("stream_interval_s", 0.0)
    runs = [r for r in out["runs"] if r.get("stream_interval_s", 0.0) == main_interval
            and "superseded_by_call" not in r]
    policies = sorted({r["policy"] for r in runs})
    layouts = ["1x1", "1x2", "2x1"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    w = 0.8 / max(1, len(policies))
    for j, p in enumerate(policies):
        by = {r["layout"]: r for r in runs if r["policy"] == p}
        xs = [i + j * w for i, lay in enumerate(layouts) if lay in by]
        present = [lay for lay in layouts if lay in by]
        axes[0].bar(xs, [by[lay]["throughput_tok_s"] for lay in present], w, label=p)
        for x, lay in zip(xs, present):
            eff = by[lay].get("scaling_efficiency")
            if eff:
                axes[0].text(x, by[lay]["throughput_tok_s"], f"{eff:.0%}", ha="center", va="bottom", fontsize=8)
        axes[1].bar(xs, [by[lay]["ttft_s"]["p50"] or 0 for lay in present], w, label=f"{p} p50")
        axes[1].scatter(xs, [by[lay]["ttft_s"]["p95"] or 0 for lay in present], marker="_", s=200, color="k")
    for ax, title in zip(axes, ("throughput (tokens/s; label: scaling efficiency)", "time to first token (s; -: p95)")):
        ax.set_xticks([i + w * (len(policies) - 1) / 2 for i in range(len(layouts))])
        ax.set_xticklabels(["1 GPU (1x1)", "tp=2 (1x2)", "2 replicas (2x1)"])
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=8)
    fig.suptitle(f"{out.get('model')} {out.get('dtype')}, {out.get('tokens')} tokens/request, "
                 f"{out.get('gpu', {}).get('name', '')}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def write(out: dict, path: Path) -> None:
    add_efficiency(out["runs"])
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2) + "\n")


def merge(files: list[str], path: Path) -> int:
    parts = [json.loads(Path(f).read_text()) for f in files]
    for i, part in enumerate(parts):  # files from before stream_interval_s existed ran with one chunk per step
        for r in part["runs"]:
            r.setdefault("stream_interval_s", part.get("stream_interval_s", 0.0))
            r["call"] = i
    out = dict(parts[-1])
    out["commands"] = [p["command"] for p in parts]
    out["runs"] = [r for p in parts for r in p["runs"]]
    for r in out["runs"]:  # a later call's run of the same setup replaces an earlier one (kept, marked)
        later = [q["call"] for q in out["runs"] if q["call"] > r["call"] and q["layout"] == r["layout"]
                 and _same_setup(q)[1:] == _same_setup(r)[1:]]
        if later:
            r["superseded_by_call"] = max(later)
    out["tp_check"] = next((p["tp_check"] for p in parts if p.get("tp_check")), None)
    out["agreement"] = {k: v for p in parts for k, v in p.get("agreement", {}).items()}
    write(out, path)
    plot(out, path.with_suffix(".png"))
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="random:llama2-7b")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--policies", default="adore,full")
    p.add_argument("--layouts", default="1x1,1x2,2x1", help="RxT: R replicas of tp=T")
    p.add_argument("--tokens", type=int, default=2048, help="generated tokens per request")
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--batch", type=int, default=256, help="cap on sequences per GPU")
    p.add_argument("--headroom", type=float, default=0.08, help="share of GPU memory kept back")
    p.add_argument("--reserve-gib", type=float, default=6.0, help="activations, graphs, workspaces per GPU")
    add_knob_args(p.add_argument_group("method"))
    p.add_argument("--stream-interval", type=float, default=0.5,
                   help="seconds between a request's stream chunks (first at once): cluster stream_interval_s")
    p.add_argument("--cuda-graphs", default="auto", choices=["auto", "on", "off"],
                   help="decode steps from CUDA graphs; auto: on for one GPU, off under tp (on: tp captures "
                        "its all-reduces in the graphs too)")
    p.add_argument("--cpus-per-rank", type=float, default=2.0)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--check-prompts", type=int, default=4)
    p.add_argument("--check-tokens", type=int, default=64, help="0: skip the tp=1 vs tp=2 token check")
    p.add_argument("--check-dtype", default="float32")
    p.add_argument("--merge", nargs="+", help="merge these result files into --out (and plot)")
    p.add_argument("--out", default="bench/results/multi_gpu.json")
    a = p.parse_args(argv)
    path = Path(a.out)
    if a.merge:
        return merge(a.merge, path)

    os.environ.update(NO_MULTICAST)
    n_gpu, gpu_bytes, gpu_name = gpu_info()
    if a.device == "cuda" and n_gpu < 2:
        raise SystemExit(f"this benchmark needs 2 GPUs; found {n_gpu}")
    policies = [x for x in a.policies.split(",") if x]
    layouts = [x for x in a.layouts.split(",") if x]

    import ray
    from ray import serve

    tmp = tempfile.mkdtemp(prefix="amg", dir="/tmp")
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items() if k.startswith(("NCCL_", "NVSHMEM_", "TORCH_SYMM"))}
    cpus = max(8, int(a.cpus_per_rank * 2 + 4))
    ray.init(num_cpus=cpus, num_gpus=n_gpu if a.device == "cuda" else 0, _temp_dir=tmp,
             include_dashboard=False, log_to_driver=False, runtime_env={"env_vars": env})
    out = {"command": "python bench/multi_gpu.py " + " ".join(
               shlex.quote(x) for x in (sys.argv[1:] if argv is None else argv)),
           "date": time.strftime("%Y-%m-%d %H:%M:%S"), "model": a.model, "dtype": a.dtype, "tokens": a.tokens,
           "prompt_tokens": a.prompt_tokens, "stream_interval_s": a.stream_interval,
           "method": knob_values(a),
           "gpu": {"count": n_gpu, "name": gpu_name, "memory_gib": round(gpu_bytes / GiB, 1)},
           "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
           "nccl_env": env, "runs": [], "agreement": {}, "tp_check": None}
    try:
        if a.check_tokens > 0:
            out["tp_check"] = check_tp_tokens(a)
            write(out, path)
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        for policy in policies:
            per_gpu, fit = fit_batch(policy, a, gpu_bytes)
            texts = {}
            for layout in layouts:
                t0 = time.perf_counter()
                stats, texts[layout] = run_layout(a, policy, layout, per_gpu, base)
                stats.update({"batch_fit_per_gpu": fit, "batch_capped": per_gpu < fit})
                out["runs"].append(stats)
                write(out, path)
                print(f"{policy:>6} {layout}: {stats['clients']:4d} clients {stats['throughput_tok_s']:9.1f} tok/s  "
                      f"ttft p50 {stats['ttft_s']['p50']}s p95 {stats['ttft_s']['p95']}s  "
                      f"itl p50 {stats['itl_s']['p50']}s  batch {stats['mean_batch']}  ok {stats['ok']}  "
                      f"({time.perf_counter() - t0:.0f}s with startup {stats['startup_s']}s)", flush=True)
                if a.device == "cuda":
                    wait_for_gpus(n_gpu)
            for x in layouts[1:]:
                out["agreement"][f"{policy}:{layouts[0]}~{x}"] = agreement(texts[layouts[0]], texts[x])
            write(out, path)
    finally:
        serve.shutdown()
        ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)
    write(out, path)
    plot(out, path.with_suffix(".png"))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
