"""GPU micro-benchmark: Triton vs torch-reference `slot_attention`, and gather_slots vs slice_by_matmul.

Llama-2-7B-like shapes (Hq = Hkv = 32, D = 128, bf16 by default):
  attention:  B in {1, 16, 64} x R in {1, 9} x C in {201, 2048, 4096} x top_k in {None, 96}
              x want_mass in {False, True}; the caches are views k[:, :, :C] of a bigger buffer,
              as the engine passes them.
  slot move:  x [L=32, B, 32, C, 128] -> N = min(--move-n, C) slots per sequence, by gather and by
              the 0/1-matrix product (configs whose tensors do not fit in free GPU memory are skipped).
A correctness sweep over small shapes (all dtypes, MHA/GQA, both kernels) runs first.
Times are medians of `triton.testing.do_bench` in milliseconds.  Each attention config is also
checked against the reference (relative max error, vs the reference on the same dtype and vs the
reference on fp32-upcast inputs); a variant that fails records its error and the run goes on.

    python bench/kernel_bench.py [--out bench/results/kernels_gpu.json] [--quick] [--no-check]
                                 [--check-only]
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
import traceback
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x]


def _topks(s: str) -> list[int | None]:
    return [None if x.lower() == "none" else int(x) for x in s.split(",") if x]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(REPO / "bench/results/kernels_gpu.json"))
    p.add_argument("--batch", type=_ints, default=[1, 16, 64])
    p.add_argument("--rows", type=_ints, default=[1, 9])
    p.add_argument("--slots", type=_ints, default=[201, 2048, 4096])
    p.add_argument("--topk", type=_topks, default=[None, 96], help="comma list, 'none' for no top-K")
    p.add_argument("--mass", type=_ints, default=[0, 1], help="want_mass values to time (0,1)")
    p.add_argument("--heads", type=int, default=32, help="Hq")
    p.add_argument("--kv-heads", type=int, default=32, help="Hkv")
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--layers", type=int, default=32, help="L of the slot-move tensor")
    p.add_argument("--move-n", type=int, default=201, help="slots moved per sequence (capped at C)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--warmup", type=int, default=25, help="do_bench warmup, ms")
    p.add_argument("--rep", type=int, default=100, help="do_bench rep, ms")
    p.add_argument("--quick", action="store_true", help="B in {1,16}, C in {201,2048}, mass off")
    p.add_argument("--no-check", action="store_true", help="skip the correctness sweep and checks")
    p.add_argument("--check-only", action="store_true", help="run only the correctness sweep")
    p.add_argument("--no-sweep", action="store_true", help="skip the correctness sweep")
    p.add_argument("--no-move", action="store_true", help="skip the slot-move benchmark")
    a = p.parse_args(argv)
    if a.quick:
        a.batch, a.slots, a.mass = [1, 16], [201, 2048], [0]
    return a


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    den = b.float().abs().max().item()
    return (a.float() - b.float()).abs().max().item() / (den if den > 0 else 1.0)


def _err(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}".strip()[:500]


def _bench(fn, args) -> float:
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=args.warmup, rep=args.rep, return_mode="median"))


def make_inputs(B, Hq, Hkv, R, C, D, dtype, device, pad=64, seed=0):
    """Bounded-cache-like inputs: C occupied slots at shuffled positions (~3% empty), the R rows at
    the R latest positions (the new rows' K/V are already in slots), caches as slices of a buffer."""
    g = torch.Generator(device=device).manual_seed(seed)
    q = torch.randn(B, Hq, R, D, device=device, dtype=dtype, generator=g)
    kbuf = torch.randn(B, Hkv, C + pad, D, device=device, dtype=dtype, generator=g)
    vbuf = torch.randn(B, Hkv, C + pad, D, device=device, dtype=dtype, generator=g)
    pos = torch.argsort(torch.rand(B, C, device=device, generator=g), dim=1)  # a permutation per row
    pos = pos + 1000  # as if older tokens had been released
    empty = torch.rand(B, C, device=device, generator=g) < 0.03
    slot_pos = torch.where(empty, torch.full_like(pos, -1), pos)
    row_pos = (1000 + C - R + torch.arange(R, device=device)).repeat(B, 1)
    return q, kbuf[:, :, :C], vbuf[:, :, :C], slot_pos, row_pos


def bench_attention(args, device, dtype, rows_out):
    from adore.kernels.reference import slot_attention as slot_attention_torch
    from adore.kernels.triton_slot_attention import slot_attention_triton

    Hq, Hkv, D = args.heads, args.kv_heads, args.head_dim
    hdr = f"{'B':>3} {'R':>2} {'C':>5} {'topk':>4} {'mass':>4} | {'torch ms':>9} {'triton ms':>9}"
    hdr += f" {'speedup':>7} | {'err':>8} {'err32':>8} {'bad':>5}"
    print("\n== slot_attention ==\n" + hdr + "\n" + "-" * len(hdr))
    for B in args.batch:
        for R in args.rows:
            for C in args.slots:
                inputs = None
                try:
                    inputs = make_inputs(B, Hq, Hkv, R, C, D, dtype, device)
                except Exception as e:  # OOM for the inputs: record every variant of this shape
                    for top_k in args.topk:
                        for m in args.mass:
                            rows_out.append(
                                dict(B=B, R=R, C=C, top_k=top_k, want_mass=bool(m), error=_err(e))
                            )
                    print(f"{B:>3} {R:>2} {C:>5}  inputs failed: {_err(e)}")
                    torch.cuda.empty_cache()
                    continue
                for top_k in args.topk:
                    for m in args.mass:
                        rec = dict(B=B, R=R, C=C, top_k=top_k, want_mass=bool(m), Hq=Hq, Hkv=Hkv, D=D)
                        _one_attention(
                            args, inputs, top_k, bool(m), rec, slot_attention_torch, slot_attention_triton
                        )
                        rows_out.append(rec)
                        _print_attention(rec)
                del inputs
                torch.cuda.empty_cache()


def _print_attention(rec):
    f = lambda k, fmt="9.4f": format(rec[k], fmt) if isinstance(rec.get(k), float) else f"{'-':>{fmt[0]}}"
    tk = "none" if rec["top_k"] is None else rec["top_k"]
    print(
        f"{rec['B']:>3} {rec['R']:>2} {rec['C']:>5} {tk:>4} {int(rec['want_mass']):>4} | "
        f"{f('torch_ms')} {f('triton_ms')} {f('speedup', '6.2f')}x | "
        f"{f('err', '8.1e')} {f('err_fp32_ref', '8.1e')} {rec.get('rows_over_2pct', '-'):>5}"
        + (f" | sort {rec['triton_sort_ms']:.4f}" if "triton_sort_ms" in rec else "")
    )
    for k in ("torch_error", "triton_error", "check_error"):
        if k in rec:
            print(f"      {k}: {rec[k][:200]}")


def _one_attention(args, inputs, top_k, want_mass, rec, ref_fn, tri_fn):
    from adore.kernels.triton_slot_attention import MAX_ONE_TILE

    q, k, v, sp, rp = inputs
    call_ref = lambda: ref_fn(q, k, v, sp, rp, top_k, None, want_mass)
    call_tri = lambda: tri_fn(q, k, v, sp, rp, top_k, None, want_mass)
    ref = None
    try:
        ref = call_ref()
        rec["torch_ms"] = _bench(call_ref, args)
    except Exception as e:
        rec["torch_error"] = _err(e)
        torch.cuda.empty_cache()
    try:
        t0 = time.perf_counter()
        tri = call_tri()
        torch.cuda.synchronize()
        rec["triton_first_call_s"] = time.perf_counter() - t0  # includes compilation
        rec["triton_ms"] = _bench(call_tri, args)
    except Exception as e:
        rec["triton_error"] = _err(e)
        traceback.print_exc()
        torch.cuda.empty_cache()
        return
    if "torch_ms" in rec:
        rec["speedup"] = rec["torch_ms"] / rec["triton_ms"]
    if top_k is not None and k.shape[2] <= MAX_ONE_TILE:  # the one-tile kernel's other top-K method
        try:
            rec["triton_sort_ms"] = _bench(
                lambda: tri_fn(q, k, v, sp, rp, top_k, None, want_mass, topk_method="sort"), args
            )
        except Exception as e:
            rec["triton_sort_error"] = _err(e)
    if args.no_check:
        return
    try:
        if ref is not None:
            rec["err"] = _rel(tri[0], ref[0])
            if want_mass:
                rec["err_mass"] = _rel(tri[1], ref[1])
        del ref
        ref32 = ref_fn(q.float(), k.float(), v.float(), sp, rp, top_k, None, want_mass)
        rec["err_fp32_ref"] = _rel(tri[0], ref32[0])
        # rows off by > 2% of the output's max (with bf16/fp16 a near-tie at the K-th score can flip)
        row_err = (tri[0].float() - ref32[0]).abs().amax(-1) / ref32[0].abs().max().clamp_min(1e-30)
        rec["rows_over_2pct"] = int((row_err > 2e-2).sum())
        if want_mass:
            rec["err_mass_fp32_ref"] = _rel(tri[1], ref32[1])
        rec["nan"] = bool(torch.isnan(tri[0]).any())
    except Exception as e:
        rec["check_error"] = _err(e)
        torch.cuda.empty_cache()


def bench_slot_move(args, device, dtype, rows_out):
    L, H, D = args.layers, args.kv_heads, args.head_dim
    esize = torch.empty((), dtype=dtype).element_size()
    print("\n== slot move [L, B, H, C, D] -> N slots ==")
    print(f"{'B':>3} {'C':>5} {'N':>4} | {'gather ms':>9} {'matmul ms':>9} {'gather GB/s':>11} {'equal':>5}")
    for B in args.batch:
        for C in args.slots:
            N = min(args.move_n, C)
            rec = dict(L=L, B=B, H=H, C=C, N=N, D=D)
            need = L * B * H * (C + 2 * N) * D * esize + B * N * C * esize
            free = torch.cuda.mem_get_info()[0]
            if need > 0.85 * free:
                rec["skipped"] = f"needs {need / 2**30:.1f} GiB, {free / 2**30:.1f} GiB free"
                rows_out.append(rec)
                print(f"{B:>3} {C:>5} {N:>4} | skipped: {rec['skipped']}")
                continue
            _one_move(args, rec, device, dtype, esize)
            rows_out.append(rec)
            g = f"{rec['gather_ms']:9.3f}" if "gather_ms" in rec else f"{'fail':>9}"
            mm = f"{rec['matmul_ms']:9.3f}" if "matmul_ms" in rec else f"{'fail':>9}"
            bw = f"{rec['gather_GBps']:11.0f}" if "gather_GBps" in rec else f"{'-':>11}"
            print(f"{B:>3} {C:>5} {N:>4} | {g} {mm} {bw} {str(rec.get('equal', '-')):>5}")
            if "error" in rec:
                print(f"      error: {rec['error'][:200]}")


def _one_move(args, rec, device, dtype, esize):
    from adore.kernels.reference import gather_slots, slice_by_matmul

    L, B, H, C, N, D = (rec[k] for k in ("L", "B", "H", "C", "N", "D"))
    try:
        x = torch.randn(L, B, H, C, D, device=device, dtype=dtype)
        index = torch.stack([torch.randperm(C, device=device)[:N].sort().values for _ in range(B)])
        for name, fn in (("gather", gather_slots), ("matmul", slice_by_matmul)):
            try:
                rec[f"{name}_ms"] = _bench(lambda fn=fn: fn(x, index), args)
            except Exception as e:
                rec[f"{name}_error"] = _err(e)
                torch.cuda.empty_cache()
        if "gather_ms" in rec:  # reads N of C slots and writes them
            rec["gather_GBps"] = 2 * L * B * H * N * D * esize / rec["gather_ms"] / 1e6
        if not args.no_check:
            rec["equal"] = bool(torch.equal(gather_slots(x, index), slice_by_matmul(x, index)))
    except Exception as e:
        rec["error"] = _err(e)
    torch.cuda.empty_cache()


def _sweep_case(rec, device, g, dtype, tol):
    from adore.kernels.reference import slot_attention as ref_fn
    from adore.kernels.triton_slot_attention import slot_attention_triton as tri_fn

    B, Hkv, G, D, R, C, top_k = 3, rec["Hkv"], rec["G"], rec["D"], rec["R"], rec["C"], rec["top_k"]

    def rnd(*sh):
        if rec["ints"]:  # exact, heavily tied scores
            return torch.randint(-2, 3, sh, device=device, generator=g).float()
        return torch.randn(*sh, device=device, generator=g)

    q = rnd(B, R, Hkv * G, D).to(dtype).transpose(1, 2)  # a strided view
    k = rnd(B, Hkv, C + 8, D).to(dtype)[:, :, :C]
    v = torch.randn(B, Hkv, C + 8, D, device=device, generator=g).to(dtype)[:, :, :C]
    sp = torch.argsort(torch.rand(B, C, device=device, generator=g), dim=1)
    sp[torch.rand(B, C, device=device, generator=g) < 0.2] = -1
    rp = torch.randint(-1, C, (B, R), device=device, generator=g).sort(1).values
    rp[0] = -1  # a fully padded sequence
    out, mass = tri_fn(q, k, v, sp, rp, top_k, None, True)
    ro, rm = ref_fn(q.float(), k.float(), v.float(), sp, rp, top_k, None, True)
    rec["err"], rec["err_mass"] = _rel(out, ro), _rel(mass, rm)
    rec["ok"] = (
        max(rec["err"], rec["err_mass"]) < tol
        and not bool(torch.isnan(out).any())
        and out.dtype == dtype
        and bool((out[0] == 0).all())
    )


def check_sweep(args, device, rows_out) -> bool:
    """Correctness on GPU over small random shapes (fp32/fp16/bf16, MHA/GQA, one-tile and blocked
    kernels, strided views, top-K incl. ties at the threshold); vs the reference on fp32 inputs."""
    tol = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 5e-2}
    g = torch.Generator(device=device).manual_seed(1)
    n_bad, t0 = 0, time.perf_counter()
    print("\n== correctness sweep (vs reference on fp32 inputs) ==")
    shapes = {  # dtype -> (Hkv, G, D, R)
        torch.bfloat16: ((4, 1, 128, 1), (4, 1, 128, 9), (2, 4, 64, 17)),
        torch.float16: ((4, 1, 128, 9), (2, 3, 80, 5), (2, 4, 64, 17)),
        torch.float32: ((4, 1, 128, 1), (2, 4, 64, 9)),
    }
    for dtype, dshapes in shapes.items():
        slots = (37, 201, 1000) + ((256, 257, 4096) if dtype == torch.bfloat16 else ())
        for Hkv, G, D, R in dshapes:
            for C in slots:
                for top_k, ints in ((None, False), (1, False), (96, False), (96, True)):
                    rec = dict(dtype=str(dtype).split(".")[-1], Hkv=Hkv, G=G, D=D, R=R, C=C)
                    rec.update(top_k=top_k, ints=ints)
                    try:
                        _sweep_case(rec, device, g, dtype, tol[dtype])
                    except Exception as e:
                        rec["error"], rec["ok"] = _err(e), False
                    rows_out.append(rec)
                    if not rec["ok"]:
                        n_bad += 1
                        print("  FAIL", rec, flush=True)
            print(
                f"  {rec['dtype']} Hkv={Hkv} G={G} D={D} R={R} done ({time.perf_counter() - t0:.0f}s)",
                flush=True,
            )
    worst = {}
    for r in rows_out:
        if "err" in r:
            worst[r["dtype"]] = max(worst.get(r["dtype"], 0.0), r["err"], r["err_mass"])
    dt = time.perf_counter() - t0
    print(f"  {len(rows_out)} configs in {dt:.0f}s, {n_bad} failed; worst rel err per dtype: {worst}")
    return n_bad == 0


def main(argv=None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("kernel_bench: no CUDA device (torch.cuda.is_available() is False); it runs on GPU only.")
        return 2
    try:
        import triton
    except Exception as e:
        print(f"kernel_bench: triton is not importable ({_err(e)}); install triton to run this benchmark.")
        return 2
    device = torch.device("cuda")
    dtype = getattr(torch, args.dtype)
    result = {
        "device": torch.cuda.get_device_name(device),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "dtype": args.dtype,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "do_bench": {"warmup_ms": args.warmup, "rep_ms": args.rep, "return_mode": "median"},
        "check_sweep": [],
        "attention": [],
        "slot_move": [],
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    print(f"device {result['device']}  torch {torch.__version__}  triton {triton.__version__}  {args.dtype}")
    if not (args.no_check or args.no_sweep):
        try:
            result["check_sweep_ok"] = check_sweep(args, device, result["check_sweep"])
        except Exception as e:
            result["check_sweep_error"] = _err(e)
            traceback.print_exc()
        if args.check_only:
            out.write_text(json.dumps(result, indent=1))
            print(f"wrote {out}")
            return 0 if result.get("check_sweep_ok") else 1
    try:
        bench_attention(args, device, dtype, result["attention"])
    except Exception as e:  # keep what was measured
        result["attention_error"] = _err(e)
        traceback.print_exc()
    if not args.no_move:
        try:
            bench_slot_move(args, device, dtype, result["slot_move"])
        except Exception as e:
            result["slot_move_error"] = _err(e)
            traceback.print_exc()
    sp = [r["speedup"] for r in result["attention"] if "speedup" in r]
    if sp:
        result["attention_speedup_geomean"] = math.exp(sum(map(math.log, sp)) / len(sp))
        gm = result["attention_speedup_geomean"]
        print(f"\ntriton/torch speedup, geometric mean over {len(sp)} configs: {gm:.2f}x")
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
