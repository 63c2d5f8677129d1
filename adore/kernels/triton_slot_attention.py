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

Two kernels, chosen by C (the number of slots):

* C <= `MAX_ONE_TILE` (256, the bounded-cache case): `_one_tile_kernel` loads the whole [M, C]
  score tile at once.  top-K: the tile (disallowed keys at -inf) is sorted per row with `tl.sort`
  (bitonic, descending) and the K-th column is the threshold -- exact, ties are kept because the
  mask is `score >= threshold`.  Softmax is a plain (not online) softmax over the tile, and the
  mass is the column sum of the normalised P tile.
* C > `MAX_ONE_TILE` (full attention): `_blocked_kernel` loops over the slots in BLOCK_N blocks.
  When top-K or the mass needs more than one pass, the first pass that computes Q K^T also writes
  the fp32 scores (-inf where not allowed) to a scratch buffer [B, Hkv, G*R, C]; later passes read
  them back (4 bytes per row and slot instead of 2*D bytes of K per slot, and bit-identical, so the
  top-K threshold compares exactly with the scores it is applied to).
  top-K: exact radix-16 search on the fp32 score *bits*.  Each fp32 score is mapped to a signed
  int32 key that orders like the float (`bits if bits >= 0 else bits ^ 0x7FFFFFFF`).  The first
  pass counts the allowed keys and finds their min and max per row; then each search pass counts,
  for 15 candidate keys evenly spaced in the row's current bracket [lo, hi), how many keys are >=
  the candidate, and shrinks the bracket 16-fold, keeping count(key >= lo) >= K > count(key >= hi).
  It stops when hi == lo + 1 for every row (about 8 passes for the 2^32 key range, fewer when the
  scores span a narrow range), and lo is then exactly the key of the K-th largest allowed score,
  converted back to its float.  Rows with fewer than K allowed keys keep them all (the K-th
  largest of the reference is then -inf).  The mask is `score >= threshold`, so ties are kept.
  Attention: one online-softmax pass in fp32 (exp2, running max and sum per row), reading V and
  either K (no top-K) or the stored scores.  Mass: a last pass over the stored scores sums
  exp(s - max) / sum over the rows of each slot.

Mass: each program writes the mass its G*R rows gave each slot into a [B, Hkv, C] fp32 buffer
(no atomics, deterministic); the host sums it over Hkv.

Rows with no allowed key (padded rows, row_pos = -1) produce zeros and give no mass.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["slot_attention_triton", "MAX_ONE_TILE", "BLOCK_N"]

MAX_ONE_TILE = 256  # largest C handled by the single-tile kernel (whole score row in registers)
BLOCK_N = 64  # slots per block in the blocked kernel

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_INT_DTYPES = (torch.int16, torch.int32, torch.int64)
_LOG2E = 1.4426950408889634


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
            # K-th largest score per row: binary search on the int32 keys of the tile in registers.
            # Bracket [lo, hi) with count(key >= lo) >= K > count(key >= hi), from [min, max] of
            # the allowed scores; every candidate is > key(-inf), so disallowed keys never count.
            key = _f32_key(s)
            cnt = tl.sum(ok.to(tl.int32), axis=1)
            need = cnt >= top_k  # else the K-th largest is -inf: every allowed key is kept
            smin = tl.min(tl.where(ok, s, float("inf")), axis=1)
            lo = tl.where(need, _f32_key(smin), 0).to(tl.int64)
            hi = tl.where(need, _f32_key(tl.max(s, axis=1)).to(tl.int64) + 1, 1)
            while tl.max(hi - lo, axis=0) > 1:
                mid = lo + (hi - lo) // 2
                ge = tl.sum((key >= mid.to(tl.int32)[:, None]).to(tl.int32), axis=1) >= top_k
                lo = tl.where(ge, mid, lo)
                hi = tl.where(ge, hi, mid)
            kth = tl.where(need, _key_f32(lo.to(tl.int32)), float("-inf"))
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
def _blocked_kernel(
    q_ptr, k_ptr, v_ptr, sp_ptr, rp_ptr, o_ptr, mass_ptr, scr_ptr,
    Hkv, G, R, C, D, top_k, scale,
    sq_b, sq_h, sq_r, sq_d,
    sk_b, sk_h, sk_c, sk_d,
    sv_b, sv_h, sv_c, sv_d,
    ssp_b, ssp_c, srp_b, srp_r,
    so_b, so_h, so_r, so_d,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_TOPK: tl.constexpr, WANT_MASS: tl.constexpr, DOT_PREC: tl.constexpr, SEARCH_N: tl.constexpr,
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
    if HAS_TOPK:
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
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Triton version of `reference.slot_attention` (same arguments, semantics and results).

    block_n / max_one_tile (keyword-only, for tests and tuning) override `BLOCK_N` (slots per block of
    the blocked kernel, a power of two >= 16) and `MAX_ONE_TILE` (largest C for the one-tile kernel);
    topk_method picks the one-tile kernel's top-K threshold: "search" (binary search on the score
    bits, default) or "sort" (`tl.sort` of the score row).  Both are exact.
    """
    _check(q, k_cache, v_cache, slot_pos, row_pos, top_k)
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
    extra = ()
    if C <= max_one_tile:
        kernel, block = _one_tile_kernel, max(16, triton.next_power_of_2(C))
    else:
        kernel, block = _blocked_kernel, BLOCK_N if block_n is None else block_n
        if block < 16 or block & (block - 1):
            raise ValueError(f"slot_attention_triton: block_n must be a power of two >= 16, got {block}")
        # fp32 score scratch [B, Hkv, G*R, C] for the passes after the first (top-K search, mass)
        scratch = has_topk or want_mass
        extra = (torch.empty((B, Hkv, G * R, C) if scratch else 1, dtype=torch.float32, device=dev),)
    if kernel is _blocked_kernel:
        extra_meta = dict(SEARCH_N=max(1, min(64, 8192 // (16 * block_m))))
    else:
        if topk_method not in ("search", "sort"):
            raise ValueError(
                f"slot_attention_triton: topk_method must be 'search' or 'sort', got {topk_method!r}"
            )
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
        DOT_PREC="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=num_warps, **extra_meta,
    )  # fmt: skip
    mass = mass_part.sum(dim=1) if want_mass else None
    return out, mass
