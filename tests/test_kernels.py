"""Triton slot attention vs the torch reference, on CPU through Triton's interpreter.

Triton only runs on CPU in its interpreter, and TRITON_INTERPRET=1 must be in the environment before
the `@triton.jit` kernels are defined (i.e. before `adore.kernels.triton_slot_attention`, and in
practice `triton`, is imported).  Other test modules of the same pytest process may already have
imported triton, and setting the flag in this process would also turn any later-compiled GPU kernel
into an interpreted one, so the kernel comparisons run in fresh subprocesses that get
TRITON_INTERPRET=1 in their environment: robust to import order, and this process's environment is
left alone.  All cases run in two worker processes at once (one per CPU core); each case is then
reported by its own parametrised test.

bf16 is not tested here: the interpreter's bf16 arithmetic is wrong (bench/kernel_bench.py checks
every bf16 config against the reference on GPU).  The fp16 cases compare with the reference run on
the same inputs upcast to fp32: with fp16 scores the reference's own rounding would flip near-tied
top-K picks.  Cases with top_k=None are also compared with the reference in fp16.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from adore.kernels.reference import copy_tokens, gather_slots, slice_by_matmul

REPO = Path(__file__).resolve().parents[1]
HAS_TRITON = importlib.util.find_spec("triton") is not None

TOL = {"float32": 1e-4, "float16": 2e-2}

# Each case: B, Hkv, G (=Hq // Hkv), R, C, D, top_k, dtype; options:
#   one-tile kernel when C <= 256 (top-K by binary search, by tl.sort with `sort`);
#   C > 256 or `blocked` (block_n=16, max_one_tile=0): the blocked kernel (top-K by one program
#   per score row, or by the in-kernel radix search with `inkernel`)
#   ints: small-integer q/k, so scores are exact and heavily tied (top-K tie handling)
#   q_strided: q is a transposed view; kv_bchd: k/v are permuted views of a [B, C, Hkv, D] buffer
#   empty_seq: last sequence has only empty slots; pad_seq: first sequence has only padded rows
#   mass: want_mass (default True); max_rows: most G*R rows per launch (more: row chunks)
CASES = {
    # --- one-tile kernel (C <= 256)
    "tile_mha_f32_r1": dict(B=2, Hkv=2, G=1, R=1, C=40, D=16, top_k=None, dtype="float32"),
    "tile_mha_f32_r5_topk": dict(B=2, Hkv=2, G=1, R=5, C=40, D=16, top_k=8, dtype="float32"),
    "tile_gqa_f32_r9_topk": dict(B=1, Hkv=2, G=3, R=9, C=64, D=32, top_k=12, dtype="float32"),
    "tile_gqa_f32_r5_nomass": dict(B=2, Hkv=1, G=3, R=5, C=33, D=16, top_k=None, dtype="float32", mass=False),
    "tile_gqa_f16_r5": dict(B=2, Hkv=2, G=3, R=5, C=40, D=16, top_k=None, dtype="float16"),
    "tile_gqa_f16_r9_topk": dict(B=1, Hkv=2, G=3, R=9, C=50, D=32, top_k=10, dtype="float16"),
    "tile_mha_f16_r1_topk": dict(B=2, Hkv=2, G=1, R=1, C=30, D=16, top_k=5, dtype="float16"),
    "tile_ties_f32": dict(B=2, Hkv=1, G=3, R=5, C=48, D=16, top_k=6, dtype="float32", ints=True),
    "tile_ties_f16": dict(B=1, Hkv=2, G=1, R=9, C=40, D=16, top_k=7, dtype="float16", ints=True),
    "tile_topk1": dict(B=2, Hkv=1, G=3, R=5, C=24, D=16, top_k=1, dtype="float32"),
    "tile_topk_ge_c": dict(B=2, Hkv=1, G=1, R=5, C=24, D=16, top_k=24, dtype="float32"),
    "tile_padded_empty": dict(
        B=3, Hkv=1, G=3, R=5, C=20, D=16, top_k=4, dtype="float32", empty_seq=True, pad_seq=True
    ),
    "tile_strided": dict(
        B=2, Hkv=2, G=1, R=5, C=36, D=16, top_k=6, dtype="float16", q_strided=True, kv_bchd=True
    ),
    "tile_sort_ties_f32": dict(
        B=2, Hkv=1, G=3, R=5, C=48, D=16, top_k=6, dtype="float32", ints=True, sort=True
    ),
    "tile_sort_gqa_f16": dict(B=1, Hkv=2, G=3, R=9, C=50, D=32, top_k=10, dtype="float16", sort=True),
    # --- more query rows than one launch takes (max_rows): row chunks (an H2O prefill)
    "tile_row_chunks_gqa_f32_topk": dict(B=2, Hkv=1, G=3, R=11, C=40, D=16, top_k=6, dtype="float32", max_rows=12),
    "blkf_row_chunks_f16": dict(B=1, Hkv=2, G=3, R=7, C=45, D=16, top_k=None, dtype="float16", blocked=True,
                                max_rows=6),
    # --- blocked kernel, default blocks (C > 256 = one tile), top-K by radix search
    "blk_mha_f32_r5": dict(B=2, Hkv=2, G=1, R=5, C=300, D=16, top_k=None, dtype="float32"),
    "blk_gqa_f32_r9_topk": dict(B=1, Hkv=1, G=3, R=9, C=300, D=16, top_k=20, dtype="float32"),
    "blk_gqa_f16_r5_topk": dict(B=1, Hkv=2, G=3, R=5, C=280, D=32, top_k=16, dtype="float16"),
    "blk_inkernel_gqa_f32_r9_topk": dict(
        B=1, Hkv=1, G=3, R=9, C=300, D=16, top_k=20, dtype="float32", inkernel=True
    ),
    # --- blocked kernel forced at small C (block_n=16): many blocks, ragged last block
    "blkf_mha_f32_r1_topk": dict(B=2, Hkv=2, G=1, R=1, C=70, D=16, top_k=9, dtype="float32", blocked=True),
    "blkf_gqa_f16_r9": dict(B=1, Hkv=2, G=3, R=9, C=45, D=32, top_k=None, dtype="float16", blocked=True),
    "blkf_gqa_f32_r5_topk1": dict(B=2, Hkv=1, G=3, R=5, C=45, D=16, top_k=1, dtype="float32", blocked=True),
    "blkf_ties_f32": dict(
        B=2, Hkv=1, G=3, R=5, C=60, D=16, top_k=7, dtype="float32", ints=True, blocked=True
    ),
    "blkf_ties_f16": dict(
        B=1, Hkv=2, G=1, R=9, C=50, D=16, top_k=11, dtype="float16", ints=True, blocked=True
    ),
    "blkf_inkernel_ties_f16": dict(
        B=2, Hkv=1, G=3, R=5, C=60, D=16, top_k=7, dtype="float16", ints=True, blocked=True, inkernel=True
    ),
    "blkf_padded_strided": dict(
        B=3,
        Hkv=1,
        G=3,
        R=5,
        C=40,
        D=16,
        top_k=6,
        dtype="float16",
        blocked=True,
        empty_seq=True,
        pad_seq=True,
        q_strided=True,
        kv_bchd=True,
        mass=False,
    ),
}

# Runs in a subprocess with TRITON_INTERPRET=1: reads {name: case} JSON on stdin, prints one JSON
# line per case with its errors against the reference.
_WORKER = r"""
import json, sys, time, traceback, zlib
import torch
from adore.kernels.reference import slot_attention
from adore.kernels.triton_slot_attention import slot_attention_triton

def make(c, seed):
    g = torch.Generator().manual_seed(seed)
    B, Hkv, G, R, C, D = c["B"], c["Hkv"], c["G"], c["R"], c["C"], c["D"]
    dt = getattr(torch, c["dtype"])
    Hq = Hkv * G
    def rnd(*shape):
        if c.get("ints"):
            return torch.randint(-2, 3, shape, generator=g).float()
        return torch.randn(*shape, generator=g)
    if c.get("q_strided"):
        q = rnd(B, R, Hq, D).to(dt).transpose(1, 2)
    else:
        q = rnd(B, Hq, R, D).to(dt)
    extra = 5  # the engine passes k[:, :, :n_used] of a bigger buffer
    if c.get("kv_bchd"):
        k = rnd(B, C + extra, Hkv, D).to(dt).permute(0, 2, 1, 3)[:, :, :C]
        v = torch.randn(B, C + extra, Hkv, D, generator=g).to(dt).permute(0, 2, 1, 3)[:, :, :C]
    else:
        k = rnd(B, Hkv, C + extra, D).to(dt)[:, :, :C]
        v = torch.randn(B, Hkv, C + extra, D, generator=g).to(dt)[:, :, :C]
    # ragged occupancy: slots hold a permutation of positions, ~25% of them empty
    sp = torch.stack([torch.randperm(C + 10, generator=g)[:C] for _ in range(B)])
    sp[torch.rand(B, C, generator=g) < 0.25] = -1
    # rows at random positions (some see few or no keys), one padded row per sequence when R > 1
    rp = torch.randint(0, C + 10, (B, R), generator=g).sort(dim=1).values
    if R > 1:
        rp[:, torch.randint(0, R, (1,), generator=g)] = -1
    if c.get("empty_seq"):
        sp[-1] = -1
    if c.get("pad_seq"):
        rp[0] = -1
    return q, k, v, sp, rp

def rel(a, b):
    den = b.abs().max().item()
    return (a.float() - b.float()).abs().max().item() / (den if den > 0 else 1.0)

cases = json.load(sys.stdin)
for name, c in cases.items():
    res = {"name": name}
    try:
        q, k, v, sp, rp = make(c, seed=zlib.crc32(name.encode()))
        want_mass = c.get("mass", True)
        kw = dict(block_n=16, max_one_tile=0) if c.get("blocked") else {}
        if c.get("sort"):
            kw["topk_method"] = "sort"
        if c.get("inkernel"):
            kw["row_search_max"] = 0
        if c.get("max_rows"):
            kw["max_rows"] = c["max_rows"]
        t = time.perf_counter()
        out, mass = slot_attention_triton(q, k, v, sp, rp, c["top_k"], None, want_mass, **kw)
        res["seconds"] = time.perf_counter() - t
        ro, rm = slot_attention(q.float(), k.float(), v.float(), sp, rp, c["top_k"], None, True)
        res["dtype_ok"] = out.dtype == q.dtype and tuple(out.shape) == tuple(q.shape)
        res["nan"] = bool(torch.isnan(out).any()) or (mass is not None and bool(torch.isnan(mass).any()))
        res["err_out"] = rel(out, ro)
        if c["top_k"] is None and q.dtype != torch.float32:
            res["err_out_native"] = rel(out, slot_attention(q, k, v, sp, rp, None, None)[0])
        # rows with no allowed key must be exactly zero
        allowed = (sp[:, None, :] >= 0) & (sp[:, None, :] <= rp[:, :, None])  # [B, R, C]
        dead = ~allowed.any(-1)  # [B, R]
        res["n_dead_rows"] = int(dead.sum())
        res["dead_rows_zero"] = bool((out.float().permute(0, 2, 1, 3)[dead] == 0).all())
        if want_mass:
            res["mass_ok_shape"] = tuple(mass.shape) == (c["B"], c["C"]) and mass.dtype == torch.float32
            res["err_mass"] = rel(mass, rm)
            res["empty_slots_zero"] = bool((mass[sp < 0] == 0).all())
        else:
            res["mass_none"] = mass is None
    except Exception:
        res["error"] = traceback.format_exc()
    print(json.dumps(res), flush=True)
"""


def _run_workers(cases: dict, n_workers: int = 2, timeout: float = 600) -> dict:
    env = dict(os.environ, TRITON_INTERPRET="1")
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    names = list(cases)
    # interleave so both workers get a mix of cheap and expensive cases
    chunks = [{n: cases[n] for n in names[i::n_workers]} for i in range(n_workers)]
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _WORKER],
            cwd=REPO,
            env=env,
            text=True,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for chunk in chunks
        if chunk
    ]
    results, errors = {}, []
    for p, chunk in zip(procs, chunks):
        try:
            out, err = p.communicate(json.dumps(chunk), timeout=timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            out, err = p.communicate()
            errors.append(f"worker timed out after {timeout}s")
        for line in out.splitlines():
            if line.startswith("{"):
                r = json.loads(line)
                results[r["name"]] = r
        if p.returncode:
            errors.append(f"worker exited {p.returncode}:\n{err[-4000:]}")
    for n in names:
        if n not in results:
            results[n] = {"name": n, "error": "no result from worker\n" + "\n".join(errors)}
    return results


@pytest.fixture(scope="module")
def kernel_results():
    if not HAS_TRITON:
        pytest.skip("triton is not installed")
    return _run_workers(CASES)


@pytest.mark.parametrize("name", list(CASES))
def test_triton_matches_reference(kernel_results, name):
    c, r = CASES[name], kernel_results[name]
    assert "error" not in r, r["error"]
    tol = TOL[c["dtype"]]
    assert r["dtype_ok"], "out must have q's shape and dtype"
    assert not r["nan"], "NaN in out or mass"
    assert r["err_out"] < tol, f"out rel err {r['err_out']:.3g} >= {tol}"
    if "err_out_native" in r:
        assert r["err_out_native"] < tol, f"out rel err vs native-dtype reference {r['err_out_native']:.3g}"
    assert r["dead_rows_zero"], "rows with no allowed key must be zeros"
    if c.get("mass", True):
        assert r["mass_ok_shape"], "mass must be [B, C] float32"
        assert r["err_mass"] < tol, f"mass rel err {r['err_mass']:.3g} >= {tol}"
        assert r["empty_slots_zero"], "empty slots must get zero mass"
    else:
        assert r["mass_none"], "mass must be None when want_mass is False"
    if c.get("pad_seq") or c.get("empty_seq"):
        assert r["n_dead_rows"] > 0


def test_cases_cover_the_matrix():
    """The case table covers what the kernel must handle (guards against an edit that drops some)."""
    cs = CASES.values()
    assert {c["R"] for c in cs} >= {1, 5, 9}
    assert {c["dtype"] for c in cs} == {"float32", "float16"}
    assert any(c["G"] == 1 for c in cs) and any(c["G"] == 3 for c in cs)
    assert any(c["top_k"] is None for c in cs) and any(c["top_k"] is not None for c in cs)
    assert any(c["C"] <= 256 and not c.get("blocked") for c in cs)  # one-tile kernel
    assert any(c["C"] > 256 for c in cs)  # blocked kernel, default blocks


# --- argument checks (no kernel launch, so no interpreter needed)


def _args(dtype=torch.float32, B=1, Hq=2, Hkv=2, R=3, C=8, D=16):
    q = torch.randn(B, Hq, R, D, dtype=dtype)
    k = torch.randn(B, Hkv, C, D, dtype=dtype)
    return q, k, k.clone(), torch.arange(C).repeat(B, 1), torch.full((B, R), C)


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda a: (a[0].half(),) + a[1:], "dtypes differ"),
        (lambda a: (a[0].double(), a[1].double(), a[2].double()) + a[3:], "dtype"),
        (lambda a: (a[0][..., :8],) + a[1:], "does not match"),
        (lambda a: a[:2] + (a[2][:, :, :4],) + a[3:], "v_cache"),
        (lambda a: (a[0][:, :1].expand(1, 3, 3, 16).contiguous(),) + a[1:], "multiple"),
        (lambda a: a[:3] + (a[3][:, :4],) + a[4:], "slot_pos"),
        (lambda a: a[:4] + (a[4].float(),), "row_pos"),
        (lambda a: (a[0][0],) + a[1:], "4-D"),
    ],
)
def test_argument_errors(mutate, match):
    from adore.kernels.triton_slot_attention import slot_attention_triton

    with pytest.raises(ValueError, match=match):
        slot_attention_triton(*mutate(_args()))


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
@pytest.mark.parametrize("top_k", [0, -1, 2.5])
def test_bad_top_k(top_k):
    from adore.kernels.triton_slot_attention import slot_attention_triton

    with pytest.raises(ValueError, match="top_k"):
        slot_attention_triton(*_args(), top_k=top_k)


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_cpu_tensors_without_interpreter():
    from adore.kernels import triton_slot_attention as tsa

    if tsa._INTERPRETED:
        pytest.skip("this process imported the kernels under TRITON_INTERPRET=1")
    with pytest.raises(ValueError, match="CUDA"):
        tsa.slot_attention_triton(*_args())


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_bad_topk_method():
    from adore.kernels.triton_slot_attention import slot_attention_triton

    with pytest.raises(ValueError, match="topk_method"):
        slot_attention_triton(*_args(), top_k=2, topk_method="heap")


# --- slot moves (pure torch)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("L, B, H, C, D, N", [(2, 3, 4, 17, 8, 5), (1, 1, 2, 9, 16, 9), (3, 2, 1, 30, 4, 12)])
def test_gather_slots_equals_slice_by_matmul(dtype, L, B, H, C, D, N):
    g = torch.Generator().manual_seed(L * 1000 + C)
    x = torch.randn(L, B, H, C, D, generator=g).to(dtype)
    index = torch.randint(0, C, (B, N), generator=g)  # repeats allowed
    got = gather_slots(x, index)
    assert got.shape == (L, B, H, N, D)
    assert torch.equal(got, slice_by_matmul(x, index))  # a 0/1 matrix product is exact
    # and both are x[l, b, h, index[b, n]]
    for b in range(B):
        assert torch.equal(got[:, b], x[:, b][:, :, index[b]])


@pytest.mark.parametrize("sliced", [False, True])  # whole tensors (the flat-row copy), a strided view (indexing)
def test_copy_tokens_moves_whole_tokens(sliced):
    """copy_tokens writes token j's K/V of every layer and head from (src_b[j], src_s[j]) to (dst_b[j],
    dst_s[j]) and touches nothing else, on contiguous tensors and on a slot-sliced view alike."""
    g = torch.Generator().manual_seed(0)
    src = torch.randn(3, 4, 2, 9, 8, generator=g)
    src = src[:, :, :, :7] if sliced else src
    dst = torch.randn(3, 5, 2, 6, 8, generator=g)
    want = dst.clone()
    sb, ss = torch.tensor([0, 3, 3, 1]), torch.tensor([6, 0, 5, 2])
    db, ds = torch.tensor([4, 0, 1, 0]), torch.tensor([5, 0, 2, 3])
    for j in range(4):
        want[:, db[j], :, ds[j]] = src[:, sb[j], :, ss[j]]
    copy_tokens(src, sb, ss, dst, db, ds)
    assert torch.equal(dst, want)


_COPY_WORKER = """
import torch
from adore.kernels.triton_copy_tokens import copy_tokens_triton
from adore.kernels.reference import copy_tokens
g = torch.Generator().manual_seed(0)
for dtype, D in ((torch.float32, 16), (torch.float16, 24)):  # 24: D padded to a power of two, masked
    src = torch.randn(3, 4, 5, 9, D, generator=g).to(dtype)[:, :, :, :7]  # a slot-sliced view, as the cache's
    a = torch.randn(3, 2, 5, 6, D, generator=g).to(dtype)
    b = a.clone()
    sb, ss = torch.tensor([0, 3, 3, 1]), torch.tensor([6, 0, 5, 2])
    db, ds = torch.tensor([1, 0, 1, 0]), torch.tensor([5, 0, 2, 3])
    copy_tokens_triton(src, sb, ss, a, db, ds)
    copy_tokens(src, sb, ss, b, db, ds)
    assert torch.equal(a, b), (dtype, (a - b).abs().max())
print("ok")
"""


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_copy_tokens_triton_equals_reference():
    """The cache <-> second-tier copy kernel moves exactly the tokens torch indexing moves, and nothing
    else (Triton's interpreter on CPU; on a GPU the same kernel runs compiled)."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    p = subprocess.run([sys.executable, "-c", _COPY_WORKER], cwd=REPO, env=env, text=True,
                       capture_output=True, timeout=300)
    assert p.returncode == 0 and "ok" in p.stdout, p.stderr[-3000:]


def test_received_attention_max_is_the_largest_head_weight():
    """reduce="max": per key, its largest softmax weight over the scoring layers and query heads, the
    softmax taken over all key groups together, as the sum's is (brute force, one query per head)."""
    from adore.kernels.reference import received_attention

    g = torch.Generator().manual_seed(0)
    L, n, Hq, Hkv, D = 3, 2, 4, 2, 8
    q = torch.randn(L, n, Hq, D, generator=g)
    keys = [torch.randn(L, n, Hkv, 5, D, generator=g), torch.randn(L, n, Hkv, 3, D, generator=g)]
    oks = [torch.tensor([[1, 1, 0, 1, 1], [1, 0, 1, 1, 0]], dtype=torch.bool), torch.ones(n, 3, dtype=torch.bool)]
    got = received_attention(q, keys, oks, 0.5, [0, 2], "max")
    want = torch.zeros(n, 8, dtype=torch.float64)
    ok = torch.cat(oks, 1)
    for b in range(n):
        for layer in (0, 2):
            for h in range(Hq):
                k = torch.cat([t[layer, b, h // (Hq // Hkv)] for t in keys])  # [8, D]
                w = torch.softmax((k @ q[layer, b, h] * 0.5).masked_fill(~ok[b], float("-inf")), 0)
                want[b] = torch.maximum(want[b], w.double())
    assert torch.allclose(got, want, atol=1e-6)
    assert torch.allclose(received_attention(q, keys, oks, 0.5, [0, 2]).sum(1), torch.tensor(2.0 * Hq,
                          dtype=torch.float64))  # the sum's rows still total layers x heads


_RECEIVED_WORKER = """
import torch
from adore.kernels.triton_received_attention import received_attention_triton
from adore.kernels.reference import received_attention
g = torch.Generator().manual_seed(0)
# (L, n, Hq, Hkv, D, cache slots, store slots, layers): MHA, GQA with G padded (3 -> 4), one group only
cases = [(3, 4, 4, 4, 16, 9, 6, [0, 2]), (2, 3, 9, 3, 24, 7, 40, [0, 1]), (2, 2, 4, 2, 8, 5, 0, [1])]
# (float16, not bfloat16: the interpreter's bfloat16 tl.dot is wrong; test_received_attention_cuda checks it)
for dtype in (torch.float32, torch.float16):
    for L, n, Hq, Hkv, D, C, S, layers in cases:
        q = torch.randn(L, n + 1, Hq, D, generator=g)[:, :n]  # the engine passes queries[:, :n]
        k = torch.randn(L, n + 2, Hkv, C + 3, D, generator=g).to(dtype)[:, :n, :, :C]  # used-slot views
        ok = torch.rand(n, C + 3, generator=g)[:, :C] > 0.3
        ok[0] = False  # a row with no cached key: its stored keys take all the weight (or nothing at all)
        keys, oks = [k], [ok]
        if S:
            keys.append(torch.randn(L, n, Hkv, S + 1, D, generator=g).to(dtype)[:, :, :, :S])
            oks.append(torch.rand(n, S + 1, generator=g)[:, :S] > 0.5)
        want = received_attention(q, keys, oks, 0.3, layers)
        for block_n in (64, 16):  # the default, and one that cuts the cache's keys mid-block
            got = received_attention_triton(q, keys, oks, 0.3, layers, block_n=block_n)
            assert got.shape == want.shape and got.dtype == torch.float32
            err = (got.double() - want).abs().max().item()
            assert err < (1e-5 if dtype == torch.float32 else 2e-2), (dtype, L, n, Hq, err)
            mask = torch.cat(oks, 1)
            assert (got[~mask] == 0).all()
            sums = got.sum(1)  # every row with a key sums to layers x heads
            assert torch.allclose(sums[mask.any(1)], torch.tensor(float(len(layers) * Hq)), rtol=1e-5)
        peak = received_attention_triton(q, keys, oks, 0.3, layers, "max")  # the one head that attends most
        err = (peak.double() - received_attention(q, keys, oks, 0.3, layers, "max")).abs().max().item()
        assert err < (1e-5 if dtype == torch.float32 else 2e-2), ("max", dtype, L, n, Hq, err)
print("ok")
"""


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_received_attention_triton_equals_reference():
    """The fused scorer kernels give every cached and stored key the softmax weight the torch reference
    gives it, summed over the scoring layers and heads (MHA and padded GQA, one or two key groups,
    strided views, rows with no key; Triton's interpreter on CPU)."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    p = subprocess.run([sys.executable, "-c", _RECEIVED_WORKER], cwd=REPO, env=env, text=True,
                       capture_output=True, timeout=300)
    assert p.returncode == 0 and "ok" in p.stdout, p.stderr[-3000:]


@pytest.mark.skipif(not torch.cuda.is_available() or not HAS_TRITON, reason="needs a CUDA GPU and Triton")
def test_received_attention_cuda():
    """Compiled on the GPU, in bfloat16 (the engine's dtype), the fused scorer kernels agree with the
    torch reference (which rounds its query to bfloat16 too)."""
    from adore.kernels.reference import received_attention
    from adore.kernels.triton_received_attention import received_attention_triton

    g = torch.Generator(device="cuda").manual_seed(0)
    L, n, Hq, Hkv, D = 4, 5, 8, 2, 64
    q = torch.randn(L, n, Hq, D, device="cuda", generator=g)
    keys = [torch.randn(L, n, Hkv, N + 3, D, device="cuda", generator=g).bfloat16()[:, :, :, :N] for N in (70, 300)]
    oks = [torch.rand(n, N, device="cuda", generator=g) > 0.3 for N in (70, 300)]
    want = received_attention(q, keys, oks, D**-0.5, [0, 3])
    got = received_attention_triton(q, keys, oks, D**-0.5, [0, 3])
    assert (got.double() - want).abs().max() < 2e-2
    assert torch.allclose(got.sum(1), torch.tensor(2.0 * Hq, device="cuda"), rtol=1e-5)
    peak = received_attention_triton(q, keys, oks, D**-0.5, [0, 3], "max")  # the prompt cut's rule
    assert (peak.double() - received_attention(q, keys, oks, D**-0.5, [0, 3], "max")).abs().max() < 2e-2
