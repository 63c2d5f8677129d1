"""Serving benchmark: throughput and time-to-first-token of the HTTP API, `adore` vs `full`.

Starts its own Ray + Serve application (cluster.app:build_app) with one deployment per policy, then
for each policy and each client count C runs C concurrent streaming /v1/completions clients, each
generating exactly --max-tokens tokens (the `ignore_eos` extension), all sent at once. Per run:

    throughput_tok_s     generated tokens / wall time (first request sent -> last token received)
    ttft_s               p50 / p95 / mean of request sent -> first token chunk
    itl_s                per-token latency of each request: (last chunk - first chunk) / (tokens - 1),
                         p50 / p95 / mean over requests
    e2e_s                request latency p50 / p95
    mean_batch           decode rows per engine step during the run (from the replica's counters)
    released, rebuilt    tokens released / rebuilt by the KV policy during the run

    python bench/serve_bench.py                                   # the full run: 1, 8, 32 clients x 512
    python bench/serve_bench.py --max-tokens 16 --clients 1,2 --out /tmp/smoke.json   # a smoke run

Results go to --out (default bench/results/serve_cpu.json) with the exact command and the machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from adore.cli import add_knob_args  # noqa: E402
from adore.config import knob_values, prefill_tokens_for  # noqa: E402
from adore.loadgen import free_port, run_clients  # noqa: E402

PROMPT_FILE = REPO / "data" / "austen" / "prideprejudice.txt"


def prompt_text(i: int, chars: int) -> str:
    """A different passage of Austen per client (same length), so no two prompts are identical."""
    if PROMPT_FILE.exists():
        text = PROMPT_FILE.read_text(encoding="utf-8", errors="replace")
    else:
        text = "Once upon a time. " * 500
    start = (5000 + 7919 * i) % max(1, len(text) - chars)
    return " ".join(text[start : start + chars].split())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--policies", default="adore,full")
    p.add_argument("--clients", default="1,8,32", help="comma list of concurrent client counts")
    p.add_argument("--max-tokens", type=int, default=512)
    p.add_argument("--prompt-chars", type=int, default=400, help="prompt length in characters (~100 tokens)")
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads per rank (default: all cores / tp)")
    add_knob_args(p.add_argument_group("method"))
    p.add_argument("--warmup-tokens", type=int, default=8, help="one short request per policy first")
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "serve_cpu.json"))
    a = p.parse_args(argv)
    clients = [int(x) for x in a.clients.split(",") if x.strip()]
    policies = [x.strip() for x in a.policies.split(",") if x.strip()]
    threads = a.threads or max(1, (os.cpu_count() or 1) // a.tp)

    import ray
    from ray import serve

    from cluster.app import build_app
    from cluster.config import ServeArgs

    args = {"model": a.model, "policies": ",".join(policies), "tp": a.tp, "num_replicas": 1,
            "max_batch": max(clients), "max_queue": max(clients), "max_ongoing_requests": 2 * max(clients),
            "max_seq_len": a.prompt_chars + a.max_tokens + 64, **knob_values(a), "threads": threads, "device": "cpu"}
    cfg = ServeArgs.parse(args)
    tmp = tempfile.mkdtemp(prefix="arb", dir="/tmp")
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    ray.init(num_cpus=max(4, a.tp * len(policies)), _temp_dir=tmp, include_dashboard=False,
             log_to_driver=False)
    results = []
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        t0 = time.perf_counter()
        serve.run(build_app(args), name="adore", route_prefix="/")
        startup = time.perf_counter() - t0
        for policy in policies:
            model = cfg.model_id(policy)
            asyncio.run(run_clients(base, model, [prompt_text(0, a.prompt_chars)], a.warmup_tokens))
            for n in clients:
                ps = [prompt_text(i, a.prompt_chars) for i in range(n)]
                r = asyncio.run(run_clients(base, model, ps, a.max_tokens))[0]
                r["policy"] = policy
                results.append(r)
                print(f"{policy:>6} clients={n:<3} {r['throughput_tok_s']:8.1f} tok/s  "
                      f"ttft p50 {r['ttft_s']['p50']}s p95 {r['ttft_s']['p95']}s  "
                      f"itl p50 {r['itl_s']['p50']}s  batch {r['mean_batch']}  ok {r['ok']}/{n}", flush=True)
    finally:
        serve.shutdown()
        ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)
    spec = cfg.engine_spec(policies[0])
    out = {
        "command": "python bench/serve_bench.py " + " ".join(
            shlex.quote(x) for x in (sys.argv[1:] if argv is None else argv)),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "machine": {"platform": platform.platform(), "python": platform.python_version(),
                    "cpus": os.cpu_count(), "processor": platform.processor()},
        "serve_args": args, "startup_s": round(startup, 1),
        # what the replicas ran with after ServeArgs resolved the defaults ("auto" dtype, chunk by device)
        "engine": {"dtype": spec.dtype, "device": spec.device,
                   "max_prefill_tokens": prefill_tokens_for(spec.device, spec.max_prefill_tokens)},
        "note": "streaming /v1/completions, greedy, ignore_eos; throughput = generated tokens / wall time",
        "results": results,
    }
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
