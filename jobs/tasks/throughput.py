"""Throughput: generate `gen_len` tokens for `batch` prompts at once and time every engine step.

Measured (greedy, EOS ignored so every row generates exactly gen_len tokens):
  tokens_per_s         batch * gen_len / wall time, prefill included (end to end)
  decode_tokens_per_s  tokens emitted after the first step / time after the first step
  ttft_s               time of the first engine step: every row's prefill (which yields its first
                       token) and the first decode step (the engine runs both in one step)
  step_ctx, step_ms    per-step time against context length (prompt + generated): the decode steps
                       in at most 64 contiguous groups, each averaged
  peak_mem_bytes       CUDA: max allocated during the cell; CPU: the process's peak RSS during the
                       cell (Linux clear_refs reset; the model's weights included)
  kv_cache_bytes       K/V storage the engine holds for the batch (fixed for bounded policies)
A short warm-up generation on the same engine precedes the timed run.
"""

from __future__ import annotations

import time

import torch

from adore.config import SamplingParams
from adore.engine import Engine

from ..sources import prompt_ids

MAX_POINTS = 64


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _reset_peak(device: str) -> str:
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        return "cuda_max_allocated"
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM, the peak resident set size
        return "rss_peak"
    except OSError:
        return "rss_peak_process"


def _peak(device: str) -> int:
    if device.startswith("cuda"):
        return int(torch.cuda.max_memory_allocated())
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def _bin_means(steps: list[tuple[int, float]], n: int) -> list[tuple[int, float]]:
    """At most n points: the steps split into n contiguous groups, each averaged."""
    if len(steps) <= n:
        return list(steps)
    out = []
    for i in range(n):
        grp = steps[i * len(steps) // n : (i + 1) * len(steps) // n]
        out.append((round(sum(c for c, _ in grp) / len(grp)), sum(t for _, t in grp) / len(grp)))
    return out


def run(ctx, cell: dict) -> dict:
    p = cell["params"]
    gen_len, batch, plen = cell["gen_len"], cell["batch"], p["prompt_tokens"]
    prompts = prompt_ids(ctx.source(cell["data"]), ctx.tok, batch, plen)
    prompts = (prompts * batch)[:batch]  # a short prompt list is reused to fill the batch
    longest = max(len(x) for x in prompts)
    engine = Engine(ctx.model, ctx.tok, ctx.policy(cell), info=ctx.info, max_batch=batch,
                    max_seq_len=longest + gen_len,
                    max_prefill_tokens=batch * longest)  # every row's prefill in the first step (ttft_s)
    engine.generate([prompts[0][:8]], SamplingParams(max_tokens=min(4, gen_len), ignore_eos=True))
    engine.stats = dict.fromkeys(engine.stats, 0)
    params = SamplingParams(max_tokens=gen_len, ignore_eos=True)
    for x in prompts:
        engine.add_request(x, params)
    _sync(ctx.device)
    mem_kind = _reset_peak(ctx.device)
    times, ctx_len, emitted = [], [], []
    t0 = time.perf_counter()
    last = t0
    while engine.has_work():
        outs = engine.step()
        _sync(ctx.device)
        now = time.perf_counter()
        times.append(now - last)
        ctx_len.append(longest + len(times))  # tokens seen by the step's newest query
        emitted.append(sum(o.token_id is not None for o in outs))
        last = now
    total = last - t0
    n_tok = sum(emitted)
    ttft = times[0]
    decode_s = total - ttft
    steps = list(zip(ctx_len[1:], times[1:]))  # decode steps only
    pts = _bin_means(steps, MAX_POINTS)
    return {
        "tokens_per_s": n_tok / total,
        "decode_tokens_per_s": (n_tok - emitted[0]) / decode_s if decode_s > 0 else None,
        "ttft_s": ttft, "total_s": total, "prompt_tokens": longest, "generated_tokens": n_tok,
        "step_ms_mean": 1000 * decode_s / max(len(times) - 1, 1),
        "peak_mem_bytes": _peak(ctx.device), "mem_kind": mem_kind,
        "kv_cache_bytes": engine.cache.kv_bytes_per_sequence() * batch,
        "step_ctx": [c for c, _ in pts], "step_ms": [1000 * t for _, t in pts],
        **ctx.engine_stats(engine),
    }
