"""Load generation against the served OpenAI-compatible API (cluster/), for bench/serve_bench.py and
bench/multi_gpu.py: concurrent streaming /v1/completions clients, their latencies, and the replica's
engine counters (Prometheus /metrics) before and after.

httpx is imported inside the functions that need it: `import adore` stays light.
"""

from __future__ import annotations

import asyncio
import json
import re
import socket
import statistics
import time


def pct(xs: list[float], q: float) -> float | None:
    """The q-th percentile (nearest rank) of xs, 4 decimals; None for no values."""
    if not xs:
        return None
    xs = sorted(xs)
    i = min(len(xs) - 1, max(0, round(q / 100 * (len(xs) - 1))))
    return round(xs[i], 4)


def summary(xs: list[float]) -> dict:
    return {"p50": pct(xs, 50), "p95": pct(xs, 95), "mean": round(statistics.fmean(xs), 4) if xs else None}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def one_stream(c, model: str, prompt: str | list[int], max_tokens: int) -> dict:
    """One greedy streaming completion of exactly max_tokens tokens on httpx.AsyncClient c; its
    timings (perf_counter seconds) and text."""
    req = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
           "ignore_eos": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    first = last = None
    usage = None
    text = []
    async with c.stream("POST", "/v1/completions", json=req) as r:
        if r.status_code != 200:
            return {"status": r.status_code, "error": (await r.aread()).decode()[:300]}
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            ev = json.loads(line[6:])
            now = time.perf_counter()
            if ev.get("usage"):
                usage = ev["usage"]
            if ev.get("choices") and ev["choices"][0]["text"]:
                first = first if first is not None else now
                last = now
                text.append(ev["choices"][0]["text"])
    tokens = usage["completion_tokens"] if usage else 0
    return {"status": 200, "start": t0, "ttft": (first - t0) if first else None,
            "end": last or time.perf_counter(),
            "tokens": tokens, "prompt_tokens": usage["prompt_tokens"] if usage else None, "text": "".join(text),
            "itl": (last - first) / (tokens - 1) if first is not None and tokens > 1 else None}


def replica_counters(base: str, model: str) -> dict:
    """The engine counters of model's replica: steps, decode rows, tokens released and rebuilt."""
    import httpx

    text = httpx.get(base + "/metrics", timeout=60).text
    out = {}
    for key, name in (("steps", "engine_steps_total"), ("rows", "engine_decode_tokens_total"),
                      ("released", "tokens_released_total"), ("rebuilt", "tokens_rebuilt_total")):
        m = re.search(rf'^adore_{name}{{model="{re.escape(model)}"}} ([0-9.e+]+)$', text, re.M)
        out[key] = float(m.group(1)) if m else 0.0
    return out


async def run_clients(base: str, model: str, prompts: list, max_tokens: int) -> tuple[dict, list[str]]:
    """One client per prompt (text or token ids), all sent at once, each streaming max_tokens tokens.

    Returns
    -------
    (stats, texts): throughput (generated tokens / wall time, first request sent -> last token),
    p50/p95/mean of time to first token, per-token latency, request latency and prompt tokens, the
    engine's steps, mean decode batch and released / rebuilt tokens during the run; and each
    client's text ("" where its request failed).
    """
    import httpx

    before = replica_counters(base, model)
    limits = httpx.Limits(max_connections=len(prompts) + 4, max_keepalive_connections=len(prompts) + 4)
    async with httpx.AsyncClient(base_url=base, timeout=3600, limits=limits) as c:
        t0 = time.perf_counter()
        res = await asyncio.gather(*(one_stream(c, model, p, max_tokens) for p in prompts))
        wall = time.perf_counter() - t0
    after = replica_counters(base, model)
    ok = [r for r in res if r["status"] == 200]
    tokens = sum(r["tokens"] for r in ok)
    steps = after["steps"] - before["steps"]
    stats = {
        "clients": len(prompts), "max_tokens": max_tokens, "ok": len(ok),
        "failed": [r for r in res if r["status"] != 200][:3],  # the first few: each holds an error text
        "generated_tokens": tokens, "wall_s": round(wall, 3),
        "throughput_tok_s": round(tokens / wall, 3) if wall else None,
        "ttft_s": summary([r["ttft"] for r in ok if r["ttft"] is not None]),
        "itl_s": summary([r["itl"] for r in ok if r["itl"] is not None]),
        "e2e_s": summary([r["end"] - r["start"] for r in ok]),
        "prompt_tokens": summary([r["prompt_tokens"] for r in ok if r["prompt_tokens"]]),
        "engine_steps": steps,
        "mean_batch": round((after["rows"] - before["rows"]) / steps, 2) if steps else None,
        "released": after["released"] - before["released"], "rebuilt": after["rebuilt"] - before["rebuilt"],
    }
    return stats, [r.get("text", "") for r in res]
