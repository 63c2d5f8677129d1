"""Triton implementation of the engine's attention seam (see `reference.slot_attention`).

Design
------
Grid: one program per (sequence b, KV head).  The G = Hq // Hkv query heads that share that KV head
and the R query rows of the sequence become the M = G*R rows of one tile (padded to BLOCK_M >= 16,
so `tl.dot` runs on tensor cores); each K/V slot is therefore read once per (b, kv-head), whatever
G and R are.  Scores are accumulated in fp32 (fp32 inputs use IEEE fp32 dots, no TF32); fp16/bf16
inputs feed the tensor cores directly and P is cast to V's dtype for the P@V product, like the
reference.  All tensors are addressed through their strides, so a view `k[:, :, :n_used]` of a
larger [B, Hkv, Cmax, D] cache is read in place (nothing is copied).

Two paths, chosen by C (the number of slots):

* C <= `MAX_ONE_TILE` (256, the bounded-cache case): `_one_tile_kernel` computes the whole [M, C]
  score tile at once (BLOCK_N = next_pow2(C)), a plain softmax over it, P@V, and the mass as the
  column sums of the normalised P tile -- one pass over K and V.
  top-K (`_kth_largest`): each fp32 score is mapped to a signed int32 key that orders like the
  float (`bits if bits >= 0 else bits ^ 0x7FFFFFFF`), and a binary search on the key, in registers,
  keeps a bracket [lo, hi) with count(key >= lo) >= K > count(key >= hi), starting from the min and
  max allowed score; at hi == lo + 1, lo is exactly the key of the K-th largest allowed score (at
  most 32 steps of one compare + row count).  A row stops early once some candidate counts exactly
  K (it then keeps the same K keys as the K-th largest would): with distinct scores that takes
  about a third of the steps, since the bracket need only fall between the K-th and K+1-th score.
  Rows with fewer than K allowed keys keep them all (the reference's K-th largest is then -inf).
  The mask is `score >= threshold`, so ties are kept.
  `topk_method="sort"` uses `tl.sort` of the row instead (also exact; 3-4x slower on an H100).
* C > `MAX_ONE_TILE` (full attention): `_blocked_kernel` loops over the slots in BLOCK_N (64)
  blocks with an online softmax in fp32 (exp2, running max and sum per row).  When top-K or the mass
  needs more than one pass over the scores, they are written once in fp32 (-inf where not allowed)
  to a scratch buffer [B, Hkv, G*R, C] and later passes read them back (4 bytes per row and slot
  instead of 2*D bytes of K per slot, and bit-identical, so the threshold compares exactly).
  top-K, C <= `ROW_SEARCH_MAX` (16384): three launches -- `_scores_kernel` (grid (B, Hkv)) writes
  the scores, `_row_kth_kernel` (one program per score row, the whole row in registers) finds each
  row's threshold with `_kth_largest`, and `_blocked_kernel` runs the attention pass over the stored
  scores and V.  top-K, larger C: one launch; the first pass writes the scores and the row stats,
  then an exact radix-16 search on the same int32 keys narrows [lo, hi) 16-fold per pass over the
  stored scores (15 candidates counted with element-wise counters, about 8 passes).
  Mass: a last pass over the stored scores sums exp(s - max) / sum over the rows of each slot.

Mass output: each (b, kv-head) program writes the mass its G*R rows gave each slot into a
[B, Hkv, C] fp32 buffer (no atomics, deterministic); the host sums it over Hkv.

Rows with no allowed key (padded rows, row_pos = -1) produce zeros and give no mass.

Numerics vs the reference: with fp16/bf16 inputs the reference's `torch.matmul` rounds Q K^T to
the input dtype before the top-K, while the kernel keeps the fp32 scores; the kernel matches the
reference run on fp32-upcast inputs, and may pick a different key than the fp16/bf16 reference
where two scores tie only after that rounding.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["slot_attention_triton", "MAX_ONE_TILE", "BLOCK_N", "ROW_SEARCH_MAX"]

MAX_ONE_TILE = 256  # largest C handled by the single-tile kernel (whole score row in registers)
BLOCK_N = 64  # slots per block in the blocked kernel
ROW_SEARCH_MAX = 16384  # blocked kernel: largest C for the one-program-per-row top-K threshold
# Most query rows (G x R, a KV head's group) in one program: the kernels hold a [G*R, block] score
# tile, sized for decode (R+1 rows). More rows (an H2O prefill: R = the prompt) go in row chunks;
# 128 rows x a 256-slot fp32 tile already needs ~200 KB of the H100's 227 KB of shared memory.
MAX_ROWS = 64

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_INT_DTYPES = (torch.int16, torch.int32, torch.int64)


@triton.jit
def _load_rows(
    q_ptr, rp_ptr, b, kvh, G, R, D,
    sq_b, sq_h, sq_r, sq_d, srp_b, srp_r,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """Rows m = g*R + r of this program: query head kvh*G + g, row r. Returns q [M, D], row_pos [M]."""
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < G * R
    g = offs_m // R
    r = offs_m % R
    head = kvh * G + g
    q_ptrs = q_ptr + b * sq_b + head[:, None] * sq_h + r[:, None] * sq_r + offs_d[None, :] * sq_d
    q = tl.load(q_ptrs, mask=row_ok[:, None] & (offs_d[None, :] < D), other=0.0)
    rpos = tl.load(rp_ptr + b * srp_b + r * srp_r, mask=row_ok, other=-1)
    return q, rpos


@triton.jit
def _score_block(
    q, rpos, k_base, sp_base, n0, C, D, scale, sk_c, sk_d, ssp_c,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PREC: tl.constexpr,
):  # fmt: skip
    """Scores [M, BLOCK_N] (fp32, -inf where not allowed) of slots n0 .. n0+BLOCK_N, and the mask."""
    cols = n0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    c_ok = cols < C
    k = tl.load(
        k_base + cols[:, None] * sk_c + offs_d[None, :] * sk_d,
        mask=c_ok[:, None] & (offs_d[None, :] < D),
        other=0.0,
    )
    sp = tl.load(sp_base + cols * ssp_c, mask=c_ok, other=-1)
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * scale
    ok = (sp[None, :] >= 0) & (sp[None, :] <= rpos[:, None])
    s = tl.where(ok, s, float("-inf"))
    return s, ok


@triton.jit
def _load_v(v_base, n0, C, D, sv_c, sv_d, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    cols = n0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    return tl.load(
        v_base + cols[:, None] * sv_c + offs_d[None, :] * sv_d,
        mask=(cols[:, None] < C) & (offs_d[None, :] < D),
        other=0.0,
    )


@triton.jit
def _store_out(
    o_ptr, o, b, kvh, G, R, D, so_b, so_h, so_r, so_d, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr
):
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    g = offs_m // R
    r = offs_m % R
    head = kvh * G + g
    ptrs = o_ptr + b * so_b + head[:, None] * so_h + r[:, None] * so_r + offs_d[None, :] * so_d
    tl.store(ptrs, o.to(o_ptr.dtype.element_ty), mask=(offs_m[:, None] < G * R) & (offs_d[None, :] < D))


@triton.jit
def _f32_key(s):
    """fp32 -> int32 key with the same order (-0.0 sorts just below +0.0)."""
    bits = s.to(tl.int32, bitcast=True)
    return tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)


@triton.jit
def _key_f32(key):
    """Inverse of `_f32_key`."""
    bits = tl.where(key >= 0, key, key ^ 0x7FFFFFFF)
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _kth_largest(s, ok, top_k):
    """Top-K threshold of each row of s [M, N] (fp32, -inf where not ok): the K-th largest, or a
    value t with exactly K scores >= t (the same kept set), or -inf where a row has fewer than K
    allowed keys.  Exact: binary search on the int32 keys, all in registers.  The bracket [lo, hi)
    keeps count(key >= lo) >= K > count(key >= hi), starting from [min, max] of the allowed scores;
    every candidate is > key(-inf), so disallowed keys are never counted.  A row whose candidate
    counts exactly K is done (hi = lo + 1) without narrowing further."""
    key = _f32_key(s)
    need = tl.sum(ok.to(tl.int32), axis=1) >= top_k
    smin = tl.min(tl.where(ok, s, float("inf")), axis=1)
    lo = tl.where(need, _f32_key(smin), 0).to(tl.int64)
    hi = tl.where(need, _f32_key(tl.max(s, axis=1)).to(tl.int64) + 1, 1)
    while tl.max(hi - lo, axis=0) > 1:
        mid = lo + (hi - lo) // 2
        cnt = tl.sum((key >= mid.to(tl.int32)[:, None]).to(tl.int32), axis=1)
        ge = cnt >= top_k
        lo = tl.where(ge, mid, lo)
        hi = tl.where(cnt == top_k, mid + 1, tl.where(ge, hi, mid))
    return tl.where(need, _key_f32(lo.to(tl.int32)), float("-inf"))


@triton.jit
def _one_tile_kernel(
    q_ptr, k_ptr, v_ptr, sp_ptr, rp_ptr, o_ptr, mass_ptr,
    Hkv, G, R, C, D, top_k, scale,
    sq_b, sq_h, sq_r, sq_d,
    sk_b, sk_h, sk_c, sk_d,
    sv_b, sv_h, sv_c, sv_d,
    ssp_b, ssp_c, srp_b, srp_r,
    so_b, so_h, so_r, so_d,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_TOPK: tl.constexpr, WANT_MASS: tl.constexpr, DOT_PREC: tl.constexpr, TOPK_SORT: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(0).to(tl.int64)
    kvh = tl.program_id(1).to(tl.int64)
    q, rpos = _load_rows(
        q_ptr, rp_ptr, b, kvh, G, R, D, sq_b, sq_h, sq_r, sq_d, srp_b, srp_r, BLOCK_M, BLOCK_D
    )
    k_base = k_ptr + b * sk_b + kvh * sk_h
    sp_base = sp_ptr + b * ssp_b
    s, ok = _score_block(
        q, rpos, k_base, sp_base, 0, C, D, scale, sk_c, sk_d, ssp_c, BLOCK_N, BLOCK_D, DOT_PREC
    )
    if HAS_TOPK:
        if TOPK_SORT:
            # K-th largest score per row: sort the whole (masked) row, take column K-1.
            srt = tl.sort(s, dim=1, descending=True)
            sel = tl.arange(0, BLOCK_N)[None, :] == top_k - 1
            kth = tl.sum(tl.where(sel, srt, 0.0), axis=1)  # -inf if fewer than K allowed keys
        else:
            kth = _kth_largest(s, ok, top_k)
        s = tl.where(s >= kth[:, None], s, float("-inf"))
    m = tl.max(s, axis=1)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    p = tl.exp2((s - m_safe[:, None]) * 1.4426950408889634)  # 0 where s == -inf
    den = tl.sum(p, axis=1)
    p = p * (1.0 / tl.where(den > 0.0, den, 1.0))[:, None]
    v = _load_v(v_ptr + b * sv_b + kvh * sv_h, 0, C, D, sv_c, sv_d, BLOCK_N, BLOCK_D)
    o = tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
    _store_out(o_ptr, o, b, kvh, G, R, D, so_b, so_h, so_r, so_d, BLOCK_M, BLOCK_D)
    if WANT_MASS:
        cols = tl.arange(0, BLOCK_N)
        tl.store(mass_ptr + (b * Hkv + kvh) * C + cols, tl.sum(p, axis=0), mask=cols < C)


@triton.jit
def _scr_ptrs(scr_base, n0, C, G, R, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Pointers and mask of the [BLOCK_M, BLOCK_N] block at slot n0 of this program's [G*R, C] scores."""
    offs_m = tl.arange(0, BLOCK_M)
    cols = n0 + tl.arange(0, BLOCK_N)
    mask = (offs_m[:, None] < G * R) & (cols[None, :] < C)
    return scr_base + offs_m[:, None] * C + cols[None, :], mask


@triton.jit
def _scores_kernel(
    q_ptr, k_ptr, sp_ptr, rp_ptr, scr_ptr,
    Hkv, G, R, C, D, scale,
    sq_b, sq_h, sq_r, sq_d,
    sk_b, sk_h, sk_c, sk_d,
    ssp_b, ssp_c, srp_b, srp_r,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PREC: tl.constexpr,
):  # fmt: skip
    """Scores of every (b, kv-head) program -> scratch [B, Hkv, G*R, C] (-inf where not allowed)."""
    b = tl.program_id(0).to(tl.int64)
    kvh = tl.program_id(1).to(tl.int64)
    q, rpos = _load_rows(
        q_ptr, rp_ptr, b, kvh, G, R, D, sq_b, sq_h, sq_r, sq_d, srp_b, srp_r, BLOCK_M, BLOCK_D
    )
    k_base = k_ptr + b * sk_b + kvh * sk_h
    sp_base = sp_ptr + b * ssp_b
    scr_base = scr_ptr + (b * Hkv + kvh) * (G * R) * C
    for n0 in range(0, C, BLOCK_N):
        s, ok = _score_block(
            q, rpos, k_base, sp_base, n0, C, D, scale, sk_c, sk_d, ssp_c, BLOCK_N, BLOCK_D, DOT_PREC
        )
        ptrs, mask = _scr_ptrs(scr_base, n0, C, G, R, BLOCK_M, BLOCK_N)
        tl.store(ptrs, s, mask=mask)


@triton.jit
def _row_kth_kernel(scr_ptr, thr_ptr, C, top_k, CP: tl.constexpr):
    """One program per score row: the whole row [C] in registers, its K-th largest -> thr_ptr."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, CP)
    s = tl.load(scr_ptr + row * C + cols[None, :], mask=cols[None, :] < C, other=float("-inf"))
    kth = _kth_largest(s, s > float("-inf"), top_k)  # [1]
    tl.store(thr_ptr + row + tl.arange(0, 1), kth)


@triton.jit
def _blocked_kernel(
    q_ptr, k_ptr, v_ptr, sp_ptr, rp_ptr, o_ptr, mass_ptr, scr_ptr, thr_ptr,
    Hkv, G, R, C, D, top_k, scale,
    sq_b, sq_h, sq_r, sq_d,
    sk_b, sk_h, sk_c, sk_d,
    sv_b, sv_h, sv_c, sv_d,
    ssp_b, ssp_c, srp_b, srp_r,
    so_b, so_h, so_r, so_d,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_TOPK: tl.constexpr, WANT_MASS: tl.constexpr, DOT_PREC: tl.constexpr, SEARCH_N: tl.constexpr,
    THR_FROM_PTR: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(0).to(tl.int64)
    kvh = tl.program_id(1).to(tl.int64)
    q, rpos = _load_rows(
        q_ptr, rp_ptr, b, kvh, G, R, D, sq_b, sq_h, sq_r, sq_d, srp_b, srp_r, BLOCK_M, BLOCK_D
    )
    k_base = k_ptr + b * sk_b + kvh * sk_h
    v_base = v_ptr + b * sv_b + kvh * sv_h
    sp_base = sp_ptr + b * ssp_b
    # This program's fp32 scores [G*R, C] (-inf where not allowed), written once, when top-K or the
    # mass need more than one pass: later passes read them back instead of recomputing Q K^T from
    # the cache (4 bytes per row and slot instead of 2*D bytes of K per slot), bit-exactly.
    scr_base = scr_ptr + (b * Hkv + kvh) * (G * R) * C

    thr = tl.full([BLOCK_M], float("-inf"), tl.float32)
    if THR_FROM_PTR:
        # scores and thresholds were computed by `_scores_kernel` and `_row_kth_kernel`
        offs_m = tl.arange(0, BLOCK_M)
        thr_base = thr_ptr + (b * Hkv + kvh) * (G * R)
        thr = tl.load(thr_base + offs_m, mask=offs_m < G * R, other=float("-inf"))
    elif HAS_TOPK:
        # Pass 1: scores -> scratch; number of allowed keys, their min and max score, per row.
        cnt = tl.zeros([BLOCK_M], tl.int32)
        smax = tl.full([BLOCK_M], float("-inf"), tl.float32)
        smin = tl.full([BLOCK_M], float("inf"), tl.float32)
        for n0 in range(0, C, BLOCK_N):
            s, ok = _score_block(
                q, rpos, k_base, sp_base, n0, C, D, scale, sk_c, sk_d, ssp_c, BLOCK_N, BLOCK_D, DOT_PREC
            )
            ptrs, mask = _scr_ptrs(scr_base, n0, C, G, R, BLOCK_M, BLOCK_N)
            tl.store(ptrs, s, mask=mask)
            cnt += tl.sum(ok.to(tl.int32), axis=1)
            smax = tl.maximum(smax, tl.max(s, axis=1))
            smin = tl.minimum(smin, tl.min(tl.where(ok, s, float("inf")), axis=1))
        tl.debug_barrier()  # the scratch is read back by other threads of this program
        need = cnt >= top_k  # else the K-th largest is -inf: every allowed key is kept
        # Bracket [lo, hi) on int32 keys (held in int64): count(key >= lo) >= K > count(key >= hi).
        # Every candidate is >= key(smin) > key(-inf), so disallowed (-inf) scores are never counted.
        lo = tl.where(need, _f32_key(smin), 0).to(tl.int64)
        hi = tl.where(need, _f32_key(smax).to(tl.int64) + 1, 1)
        width = hi - lo
        idx = tl.arange(0, 16)
        while tl.max(width, axis=0) > 1:
            cands = lo[:, None] + (width[:, None] * idx[None, :]) // 16  # [M, 16], cands[:, 0] = lo
            cands32 = cands.to(tl.int32)
            # element-wise counters, reduced once per pass (no per-block cross-thread reductions)
            acc = tl.zeros([BLOCK_M, SEARCH_N, 16], tl.int32)
            for n0 in range(0, C, SEARCH_N):
                ptrs, mask = _scr_ptrs(scr_base, n0, C, G, R, BLOCK_M, SEARCH_N)
                key = _f32_key(tl.load(ptrs, mask=mask, other=float("-inf")))
                acc += (key[:, :, None] >= cands32[:, None, :]).to(tl.int32)
            counts = tl.sum(acc, axis=1)  # [M, 16]: count(key >= cands)
            ge = (counts >= top_k) & (idx[None, :] >= 1)
            lt = (counts < top_k) & (idx[None, :] >= 1)
            lo = tl.max(tl.where(ge, cands, lo[:, None]), axis=1)
            hi = tl.min(tl.where(lt, cands, hi[:, None]), axis=1)
            # a candidate counting exactly K keeps the same set as the K-th largest: stop that row
            exact = tl.max(((counts == top_k) & (idx[None, :] >= 1)).to(tl.int32), axis=1) > 0
            hi = tl.where(exact, lo + 1, hi)
            width = hi - lo
        thr = tl.where(need, _key_f32(lo.to(tl.int32)), float("-inf"))

    # Attention pass: online softmax in fp32.
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for n0 in range(0, C, BLOCK_N):
        if HAS_TOPK:
            ptrs, mask = _scr_ptrs(scr_base, n0, C, G, R, BLOCK_M, BLOCK_N)
            s = tl.load(ptrs, mask=mask, other=float("-inf"))
            s = tl.where(s >= thr[:, None], s, float("-inf"))
        else:
            s, ok = _score_block(
                q, rpos, k_base, sp_base, n0, C, D, scale, sk_c, sk_d, ssp_c, BLOCK_N, BLOCK_D, DOT_PREC
            )
            if WANT_MASS:
                ptrs, mask = _scr_ptrs(scr_base, n0, C, G, R, BLOCK_M, BLOCK_N)
                tl.store(ptrs, s, mask=mask)
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2((m_i - m_safe) * 1.4426950408889634)
        p = tl.exp2((s - m_safe[:, None]) * 1.4426950408889634)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = _load_v(v_base, n0, C, D, sv_c, sv_d, BLOCK_N, BLOCK_D)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
        m_i = m_new
    inv = 1.0 / tl.where(l_i > 0.0, l_i, 1.0)
    _store_out(o_ptr, acc * inv[:, None], b, kvh, G, R, D, so_b, so_h, so_r, so_d, BLOCK_M, BLOCK_D)

    if WANT_MASS:
        # Mass pass: normalised probabilities from the stored scores, summed over this program's rows.
        tl.debug_barrier()
        m_safe = tl.where(m_i == float("-inf"), 0.0, m_i)
        mass_base = mass_ptr + (b * Hkv + kvh) * C
        for n0 in range(0, C, BLOCK_N):
            ptrs, mask = _scr_ptrs(scr_base, n0, C, G, R, BLOCK_M, BLOCK_N)
            s = tl.load(ptrs, mask=mask, other=float("-inf"))
            if HAS_TOPK:
                s = tl.where(s >= thr[:, None], s, float("-inf"))
            p = tl.exp2((s - m_safe[:, None]) * 1.4426950408889634) * inv[:, None]
            cols = n0 + tl.arange(0, BLOCK_N)
            tl.store(mass_base + cols, tl.sum(p, axis=0), mask=cols < C)


# TRITON_INTERPRET=1 at import time makes @triton.jit kernels interpreted (CPU tensors allowed).
_INTERPRETED = type(_one_tile_kernel).__name__ == "InterpretedFunction"


def _check(q, k_cache, v_cache, slot_pos, row_pos, top_k):
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"slot_attention_triton: {name} must be a 4-D tensor, got {_desc(t)}")
        if t.dtype not in _FLOAT_DTYPES:
            raise ValueError(f"slot_attention_triton: {name} dtype {t.dtype} not in fp32/fp16/bf16")
    if not (q.dtype == k_cache.dtype == v_cache.dtype):
        raise ValueError(
            f"slot_attention_triton: q, k_cache, v_cache dtypes differ ({q.dtype}, {k_cache.dtype}, "
            f"{v_cache.dtype})"
        )
    B, Hq, R, D = q.shape
    if k_cache.shape != v_cache.shape:
        raise ValueError(
            f"slot_attention_triton: k_cache {tuple(k_cache.shape)} != v_cache {tuple(v_cache.shape)}"
        )
    Bk, Hkv, C, Dk = k_cache.shape
    if Bk != B or Dk != D:
        raise ValueError(
            f"slot_attention_triton: q {tuple(q.shape)} [B, Hq, R, D] does not match k_cache "
            f"{tuple(k_cache.shape)} [B, Hkv, C, D]"
        )
    if Hkv == 0 or Hq % Hkv != 0:
        raise ValueError(f"slot_attention_triton: Hq={Hq} is not a multiple of Hkv={Hkv}")
    for name, t, shape in (("slot_pos", slot_pos, (B, C)), ("row_pos", row_pos, (B, R))):
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != shape:
            raise ValueError(f"slot_attention_triton: {name} must have shape {shape}, got {_desc(t)}")
        if t.dtype not in _INT_DTYPES:
            raise ValueError(f"slot_attention_triton: {name} must be int16/int32/int64, got {t.dtype}")
    devs = {t.device for t in (q, k_cache, v_cache, slot_pos, row_pos)}
    if len(devs) != 1:
        raise ValueError(f"slot_attention_triton: tensors on different devices: {sorted(map(str, devs))}")
    if top_k is not None and (isinstance(top_k, bool) or int(top_k) != top_k or top_k < 1):
        raise ValueError(f"slot_attention_triton: top_k must be a positive int or None, got {top_k!r}")


def _desc(t):
    return f"shape {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__


def slot_attention_triton(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_pos: torch.Tensor,
    row_pos: torch.Tensor,
    top_k: int | None = None,
    scale: float | None = None,
    want_mass: bool = False,
    *,
    block_n: int | None = None,
    max_one_tile: int | None = None,
    topk_method: str = "search",
    row_search_max: int | None = None,
    max_rows: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Triton version of `reference.slot_attention` (same arguments, semantics and results).

    block_n / max_one_tile (keyword-only, for tests and tuning) override `BLOCK_N` (slots per block of
    the blocked kernel, a power of two >= 16) and `MAX_ONE_TILE` (largest C for the one-tile kernel);
    topk_method picks the one-tile kernel's top-K threshold: "search" (binary search on the score
    bits, default) or "sort" (`tl.sort` of the score row).  Both are exact.  row_search_max overrides
    `ROW_SEARCH_MAX` (largest C whose top-K threshold is found by one program per score row);
    max_rows overrides `MAX_ROWS` (most G x R query rows per launch; more run in row chunks).
    """
    _check(q, k_cache, v_cache, slot_pos, row_pos, top_k)
    G, R = q.shape[1] // k_cache.shape[1], q.shape[2]
    chunk = max(1, (MAX_ROWS if max_rows is None else max_rows) // G)
    if R > chunk:  # rows are independent: each sees the slots and its own position only
        kw = dict(block_n=block_n, max_one_tile=max_one_tile, topk_method=topk_method,
                  row_search_max=row_search_max, max_rows=max_rows)
        parts = [slot_attention_triton(q[:, :, i : i + chunk], k_cache, v_cache, slot_pos,
                                       row_pos[:, i : i + chunk], top_k, scale, want_mass, **kw)
                 for i in range(0, R, chunk)]
        out = torch.cat([o for o, _ in parts], dim=2)
        return out, (torch.stack([m for _, m in parts]).sum(0) if want_mass else None)
    if topk_method not in ("search", "sort"):
        raise ValueError(
            f"slot_attention_triton: topk_method must be 'search' or 'sort', got {topk_method!r}"
        )
    if q.device.type != "cuda" and not _INTERPRETED:
        raise ValueError(
            f"slot_attention_triton: tensors are on {q.device}; Triton needs CUDA tensors here "
            "(CPU works only with TRITON_INTERPRET=1 set before this module is imported)"
        )
    B, Hq, R, D = q.shape
    Hkv, C = k_cache.shape[1], k_cache.shape[2]
    G = Hq // Hkv
    scale = D**-0.5 if scale is None else float(scale)
    dev = q.device
    out = torch.empty((B, Hq, R, D), dtype=q.dtype, device=dev)
    if B == 0 or R == 0 or Hq == 0 or D == 0 or C == 0:
        out.zero_()
        return out, (torch.zeros((B, C), dtype=torch.float32, device=dev) if want_mass else None)

    has_topk = top_k is not None and top_k < C
    max_one_tile = MAX_ONE_TILE if max_one_tile is None else max_one_tile
    block_m = max(16, triton.next_power_of_2(G * R))
    block_d = max(16, triton.next_power_of_2(D))
    mass_part = torch.empty((B, Hkv, C), dtype=torch.float32, device=dev) if want_mass else out
    dot_prec = "ieee" if q.dtype == torch.float32 else "tf32"  # fp32: no TF32 rounding
    extra = ()
    if C <= max_one_tile:
        kernel, block = _one_tile_kernel, max(16, triton.next_power_of_2(C))
    else:
        kernel, block = _blocked_kernel, BLOCK_N if block_n is None else block_n
        if block < 16 or block & (block - 1):
            raise ValueError(f"slot_attention_triton: block_n must be a power of two >= 16, got {block}")
        # fp32 score scratch [B, Hkv, G*R, C] for the passes after the first (top-K search, mass)
        scratch = has_topk or want_mass
        scr = torch.empty((B, Hkv, G * R, C) if scratch else 1, dtype=torch.float32, device=dev)
        row_search_max = ROW_SEARCH_MAX if row_search_max is None else row_search_max
        thr_from_ptr = has_topk and C <= row_search_max
        thr = scr
        if thr_from_ptr:  # three launches: scores, per-row K-th largest, attention
            thr = torch.empty((B * Hkv * G * R,), dtype=torch.float32, device=dev)
            _scores_kernel[(B, Hkv)](
                q, k_cache, slot_pos, row_pos, scr,
                Hkv, G, R, C, D, scale,
                *q.stride(), *k_cache.stride(), *slot_pos.stride(), *row_pos.stride(),
                BLOCK_M=block_m, BLOCK_N=block, BLOCK_D=block_d, DOT_PREC=dot_prec,
                num_warps=8 if block_m * max(block, block_d) >= 128 * 128 else 4,
            )  # fmt: skip
            cp = triton.next_power_of_2(C)
            _row_kth_kernel[(B * Hkv * G * R,)](
                scr, thr, C, int(top_k), CP=cp, num_warps=4 if cp <= 4096 else 8
            )
        extra = (scr, thr)
    if kernel is _blocked_kernel:
        extra_meta = dict(SEARCH_N=max(1, min(64, 8192 // (16 * block_m))), THR_FROM_PTR=thr_from_ptr)
    else:
        extra_meta = dict(TOPK_SORT=topk_method == "sort")
    work = block_m * max(block, block_d)
    num_warps = 8 if work >= 128 * 128 or (kernel is _one_tile_kernel and work >= 64 * 128) else 4
    kernel[(B, Hkv)](
        q, k_cache, v_cache, slot_pos, row_pos, out, mass_part, *extra,
        Hkv, G, R, C, D, int(top_k) if has_topk else 0, scale,
        *q.stride(), *k_cache.stride(), *v_cache.stride(),
        *slot_pos.stride(), *row_pos.stride(), *out.stride(),
        BLOCK_M=block_m, BLOCK_N=block, BLOCK_D=block_d,
        HAS_TOPK=has_topk, WANT_MASS=want_mass,
        DOT_PREC=dot_prec,
        num_warps=num_warps, **extra_meta,
    )  # fmt: skip
    mass = mass_part.sum(dim=1) if want_mass else None
    return out, mass
