"""Where a decode step's time goes: torch.profiler over a few engine steps.

    python bench/profile_step.py --method adore --batch 512 --history 1024
    python bench/profile_step.py --device cpu --model smollm2-135m --threads 1 --batch 32 --history 1024

Random weights (`random:llama2-7b`, bf16, like bench/gpu_throughput.py) by default. Prefills
`--batch` sequences, decodes until each holds `--history` tokens, then profiles `--steps` decode steps
and prints the CUDA kernels and CPU ops that took the most time, plus the step time with and without
the profiler. Writes a Chrome trace when --trace is given. On a CPU (`--device cpu`) there are no
CUDA graphs and the parts table's GPU column reads 0: the host time is the step.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from adore import AdoreConfig, SamplingParams  # noqa: E402
from adore.cli import add_knob_args  # noqa: E402
from adore.config import knob_values  # noqa: E402
from adore.engine import Engine  # noqa: E402
from adore.models import auto_dtype, load_model  # noqa: E402
from adore.policies import make_policy  # noqa: E402


def parts_table(prof, steps: int, step_ms: float) -> str:
    """The engine's labelled parts of a decode step (adore.layers, adore.policy.*, adore.tokens): host
    time and GPU time per step, and the GPU time's share of the step (the controller's cost)."""
    # a label comes back twice: the host's range (its CPU time) and the GPU's span of the kernels it
    # launched (graph replays included); each row takes the larger of either time
    parts: dict[str, list[float]] = {}
    for e in prof.key_averages():
        if e.key.startswith("adore."):
            gpu = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0)
            host_gpu = parts.setdefault(e.key, [0.0, 0.0])
            host_gpu[:] = max(host_gpu[0], e.cpu_time_total), max(host_gpu[1], gpu)
    lines = [f"{'part':24s} {'host ms/step':>12s} {'GPU ms/step':>12s} {'GPU % of step':>13s}"]
    for key, (host, gpu) in sorted(parts.items()):
        lines.append(f"{key:24s} {host / 1e3 / steps:12.2f} {gpu / 1e3 / steps:12.2f} "
                     f"{100 * gpu / 1e3 / steps / step_ms:12.1f}%")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="random:llama2-7b")
    ap.add_argument("--method", default="adore")
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--history", type=int, default=1024, help="tokens each sequence holds when profiled")
    ap.add_argument("--steps", type=int, default=10)
    add_knob_args(ap.add_argument_group("method"))
    ap.add_argument("--no-graphs", action="store_true")
    ap.add_argument("--rows", type=int, default=25, help="table rows to print")
    ap.add_argument("--trace", default=None, help="write a Chrome trace here")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--dtype", default="auto", help="auto: bfloat16 on a GPU and on CPUs with AMX")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (CPU)")
    args = ap.parse_args()
    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        sys.exit("no CUDA GPU here: pass --device cpu")
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = auto_dtype(args.device) if args.dtype == "auto" else args.dtype
    model, tok, info = load_model(args.model, dtype=dtype, device=args.device)
    cfg = AdoreConfig(**knob_values(args))
    eng = Engine(model, tok, make_policy(args.method, cfg), info=info, max_batch=args.batch,
                 max_seq_len=args.history + 2 * args.steps + 16, cuda_graphs=cuda and not args.no_graphs)
    g = torch.Generator().manual_seed(0)
    for p in torch.randint(3, model.config.vocab_size, (args.batch, 32), generator=g).tolist():
        # long enough for the warm-up, the timed steps and the profiled steps: none may finish early
        eng.add_request(p, SamplingParams(max_tokens=args.history - 32 + 2 * args.steps + 8,
                                           ignore_eos=True))
    while eng.n_active < args.batch or eng.requests[next(iter(eng.requests))].next_pos < args.history:
        eng.step()

    def sync():
        if cuda:
            torch.cuda.synchronize()

    def timed(n):
        sync()
        t0 = time.perf_counter()
        for _ in range(n):
            eng.step()
        sync()
        return (time.perf_counter() - t0) / n * 1e3

    plain = timed(args.steps)
    assert eng.n_active == args.batch, "a sequence finished inside the measured steps"
    acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
    with torch.profiler.profile(activities=acts) as prof:
        profiled = timed(args.steps)
    assert eng.n_active == args.batch, "a sequence finished inside the profiled steps"
    where = torch.cuda.get_device_name() if cuda else f"CPU ({torch.get_num_threads()} threads, {dtype})"
    print(f"{where} {args.method} top-k {args.top_k} batch {args.batch} "
          f"history {args.history}: "
          f"{plain:.2f} ms/step ({profiled:.2f} under the profiler), rebuilt so far {eng.stats['rebuilt']}")
    print(parts_table(prof, args.steps, profiled))
    if cuda:
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=args.rows, max_name_column_width=60))
    print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=args.rows, max_name_column_width=60))
    if args.trace:
        prof.export_chrome_trace(args.trace)


if __name__ == "__main__":
    main()
