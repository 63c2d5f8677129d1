"""GPU micro-benchmark of ADORE's scorer signal: the fused Triton `received_attention` vs the torch
reference, on the engine's shapes.

    python bench/scorer_bench.py [--batches 64,256] [--layers all,4] [--sweep] [--out bench/results/scorer_gpu.json]

Llama-2-7B shapes (L = 32, Hq = Hkv = 32, D = 128, bf16): the current token's queries of every layer
against each sequence's cached keys (`--cache` used slots) and second-tier keys (`--store` used
slots), as views of the cache's bigger buffers, about a third of either masked empty. Reports the
median time of each (`triton.testing.do_bench`), the max error of the kernel against the reference,
and the kernel's key-read bandwidth (the bytes of keys it reads once / its time). --sweep also times
the kernel's launch settings (keys per block, warps, pipeline stages)
at the largest batch, all layers.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from adore.kernels.reference import received_attention  # noqa: E402
from adore.policies.adore import scoring_layers  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batches", default="64,256")
    ap.add_argument("--layers", default="all,4", help="scoring layers: all, or a count spread evenly")
    ap.add_argument("--cache", type=int, default=202)
    ap.add_argument("--store", type=int, default=512)
    ap.add_argument("--sweep", action="store_true", help="time the kernel's launch settings too")
    ap.add_argument("--out", default="bench/results/scorer_gpu.json")
    args = ap.parse_args()
    from triton.testing import do_bench

    from adore.kernels.triton_received_attention import received_attention_triton

    L, H, D, dt = 32, 32, 128, torch.bfloat16
    g = torch.Generator(device="cuda").manual_seed(0)
    rows, sweep = [], []
    for n in [int(b) for b in args.batches.split(",")]:
        k = torch.randn(L, n, H, args.cache + 8, D, device="cuda", dtype=dt, generator=g)[:, :, :, : args.cache]
        s = torch.randn(L, n, H, args.store + 1, D, device="cuda", dtype=dt, generator=g)[:, :, :, : args.store]
        q = torch.randn(L, n + 4, H, D, device="cuda", generator=g)[:, :n]
        oks = [torch.rand(n, N, device="cuda", generator=g) > 0.3 for N in (args.cache, args.store)]
        for spec in args.layers.split(","):
            layers = scoring_layers(L, None if spec == "all" else int(spec))
            call = (q, [k, s], oks, D**-0.5, layers)
            err = (received_attention_triton(*call).double() - received_attention(*call)).abs().max().item()
            t_torch = do_bench(lambda c=call: received_attention(*c))
            t_triton = do_bench(lambda c=call: received_attention_triton(*c))
            key_bytes = len(layers) * n * H * (args.cache + args.store) * D * 2
            rows.append(dict(batch=n, layers=len(layers), torch_ms=t_torch, triton_ms=t_triton,
                             speedup=t_torch / t_triton, max_abs_err=err, key_gb=key_bytes / 1e9,
                             triton_key_read_TBps=key_bytes / t_triton / 1e9))
            print(json.dumps(rows[-1]), flush=True)
        if args.sweep and n == max(int(b) for b in args.batches.split(",")):
            call = (q, [k, s], oks, D**-0.5, list(range(L)))
            grid = [(b, w, st) for b in (32, 64, 128, 256) for w in (4, 8) for st in (2, 3, 4)]
            for b, w, st in grid:
                kw = dict(block_n=b, num_warps=w, num_stages=st)
                try:
                    t = do_bench(lambda c=call, kw=kw: received_attention_triton(*c, **kw))
                except Exception as e:  # a setting that does not compile (too many registers, shared memory)
                    t = None
                    print(kw, type(e).__name__, str(e)[:200])
                sweep.append(dict(batch=n, **kw, ms=t))
                print(json.dumps(sweep[-1]), flush=True)
        del k, s
        torch.cuda.empty_cache()
    out = dict(command="python " + " ".join(sys.argv), device=torch.cuda.get_device_name(),
               torch=torch.__version__, date=time.strftime("%Y-%m-%d"), cache=args.cache, store=args.store,
               shapes=dict(L=L, Hq=H, Hkv=H, D=D, dtype=str(dt)), runs=rows, sweep=sweep)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
