"""Triton kernels: the attention the current token's queries give every cached and stored key.

ADORE's attention scorer needs, each decode step, every key's softmax weight under the current
token's query at each scoring layer and head, with the cache's slots and the second tier's stored
tokens softmaxed together, summed over layers and heads. In torch that is, per layer, two matmuls,
a concatenation, a mask and a softmax over float32 logits: on an H200 about three times the time of
reading the keys once. Here:

1. `_logits_kernel`, one program per (sequence, KV head, scoring layer): reads that head's keys of
   both groups once in their dtype (blocks of 64, the product of the G query heads with them on
   tensor cores), writes the scaled, masked float32 logits of its G query heads
   [Ls, n, Hq, N] and each head's log-sum-exp [Ls, n, Hq] (an online max/sum over key blocks).
2. `_mass_kernel`, one program per (sequence, block of keys): sums exp(logit - lse) over the
   scoring layers and query heads -> [n, N] float32.

The logits are 4 bytes per (key, query head) against the 2 * D bytes of the key itself, so the
second pass costs a few percent of the first. Offsets are int64 (a tier of 512 tokens x 300
sequences of a 7B model holds over 2^31 elements).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _logits_block(q, k_ptr, ok_ptr, j0, N, k_s, out_ptr, m, s, d, hmask, dmask,
                  BLOCK_N: tl.constexpr, IEEE: tl.constexpr):
    """One block of keys: [BLOCK_N, D] from k_ptr (row j at k_ptr + j * k_s), logits of the query
    heads q [G_PAD, D] written at out_ptr [G_PAD] + j; returns the updated running max m and sum s."""
    j = j0 + tl.arange(0, BLOCK_N)
    jm = j < N
    ok = tl.load(ok_ptr + j, mask=jm, other=0) != 0
    # an empty slot's key is not loaded: the engine passes whole allocations (no sync to find their
    # occupied prefix), so a store that is not full yet costs only the keys it holds
    kk = tl.load(k_ptr + j[:, None].to(tl.int64) * k_s + d[None, :], mask=ok[:, None] & dmask[None, :],
                 other=0.0)
    # q [G_PAD >= 16, D] in the keys' dtype: a tensor-core product (three times faster on an H200 than
    # a sum of products in registers, which stalls on the loads: bench/results/scorer_sweep_h200.json)
    if IEEE:  # float32 keys: a true float32 product, not TF32
        x = tl.dot(q, tl.trans(kk), input_precision="ieee")  # [G_PAD, BLOCK_N]
    else:
        x = tl.dot(q, tl.trans(kk))
    x = tl.where(ok[None, :], x, float("-inf"))
    tl.store(out_ptr[:, None] + j[None, :], x, mask=hmask[:, None] & jm[None, :])
    m_new = tl.maximum(m, tl.max(x, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # all masked so far: exp(-inf - 0) = 0
    s = s * tl.exp(m - m_safe) + tl.sum(tl.exp(x - m_safe[:, None]), 1)
    return m_new, s


@triton.jit
def _logits_kernel(q_ptr, k1, k2, ok1, ok2, layers, logits, lse, n, N1, N2, Hq, G, scale,
                   q_l, q_n, q_h, a_l, a_n, a_h, a_s, b_l, b_n, b_h, b_s, ok1_n, ok2_n,
                   D: tl.constexpr, BLOCK_D: tl.constexpr, G_PAD: tl.constexpr, BLOCK_N: tl.constexpr,
                   IEEE: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    hk = tl.program_id(1).to(tl.int64)
    li = tl.program_id(2).to(tl.int64)
    layer = tl.load(layers + li).to(tl.int64)
    g = tl.arange(0, G_PAD)
    d = tl.arange(0, BLOCK_D)
    hmask, dmask = g < G, d < D
    heads = hk * G + g  # [G_PAD] the query heads that read KV head hk
    q = tl.load(q_ptr + layer * q_l + row * q_n + heads[:, None] * q_h + d[None, :],
                mask=hmask[:, None] & dmask[None, :], other=0.0).to(tl.float32) * scale
    q = q.to(k1.dtype.element_ty)  # as the torch reference rounds it
    Nt = N1 + N2
    out = logits + ((li * n + row) * Hq + heads) * Nt  # [G_PAD] pointers to each head's logits row
    m = tl.full([G_PAD], float("-inf"), tl.float32)
    s = tl.zeros([G_PAD], tl.float32)
    base1 = k1 + layer * a_l + row * a_n + hk * a_h
    for j0 in range(0, N1, BLOCK_N):
        m, s = _logits_block(q, base1, ok1 + row * ok1_n, j0, N1, a_s, out, m, s, d, hmask, dmask, BLOCK_N, IEEE)
    base2 = k2 + layer * b_l + row * b_n + hk * b_h
    for j0 in range(0, N2, BLOCK_N):
        m, s = _logits_block(q, base2, ok2 + row * ok2_n, j0, N2, b_s, out + N1, m, s, d, hmask, dmask,
                             BLOCK_N, IEEE)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    tl.store(lse + (li * n + row) * Hq + heads, tl.where(s > 0, m_safe + tl.log(s), float("-inf")), mask=hmask)


@triton.jit
def _mass_kernel(logits, lse, out, n, Nt, Hq, Ls, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr,
                 MAX: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    j = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    jm = j < Nt
    acc = tl.zeros([BLOCK_N], tl.float32)
    for li in range(0, Ls):
        for h0 in range(0, Hq, BLOCK_H):
            h = h0 + tl.arange(0, BLOCK_H)
            hm = h < Hq
            rows = (li * n + row) * Hq + h  # [BLOCK_H]
            ls = tl.load(lse + rows, mask=hm, other=float("-inf"))
            x = tl.load(logits + rows[:, None] * Nt + j[None, :], mask=hm[:, None] & jm[None, :],
                        other=float("-inf"))
            # a head with no key at all has lse -inf and only -inf logits: weight 0, not NaN
            w = tl.exp(x - tl.where(ls == float("-inf"), 0.0, ls)[:, None])  # [BLOCK_H, BLOCK_N]
            if MAX:  # the weight of the one head (of any scoring layer) that attends most
                acc = tl.maximum(acc, tl.max(w, 0))
            else:
                acc += tl.sum(w, 0)
    tl.store(out + row * Nt + j, acc, mask=jm)


_LAYERS: dict = {}


def _layer_index(layers: list[int], device) -> torch.Tensor:
    """The scoring layers as a device tensor, made once per (layers, device): not a host-to-device
    copy every step."""
    key = (tuple(layers), str(device))
    if key not in _LAYERS:
        _LAYERS[key] = torch.tensor(layers, dtype=torch.int32, device=device)
    return _LAYERS[key]


def received_attention_triton(queries: torch.Tensor, keys: list[torch.Tensor], ok: list[torch.Tensor],
                              scale: float, layers: list[int], reduce: str = "sum", *, block_n: int = 64,
                              num_warps: int = 4, num_stages: int = 2) -> torch.Tensor:
    """See `reference.received_attention` (one or two key groups); returns [n, sum N_g] float32.
    The keyword arguments are the kernel's launch settings (bench/scorer_bench.py --sweep)."""
    if len(keys) not in (1, 2):
        raise ValueError(f"received_attention_triton takes one or two key groups, not {len(keys)}")
    L, n, Hq, D = queries.shape
    k1, k2 = keys[0], keys[-1]
    ok1, ok2 = (m.view(torch.uint8) for m in (ok[0], ok[-1]))
    N1, N2 = k1.shape[3], (k2.shape[3] if len(keys) == 2 else 0)
    Hkv = k1.shape[2]
    G, Ls, Nt = Hq // Hkv, len(layers), N1 + N2
    if n == 0 or Nt == 0 or Ls == 0:
        return torch.zeros(n, Nt, dtype=torch.float32, device=queries.device)
    for t in (queries, k1, k2):
        if t.stride(-1) != 1:
            raise ValueError("received_attention_triton needs the head dimension contiguous")
    out = torch.empty(n, Nt, dtype=torch.float32, device=queries.device)  # _mass_kernel writes all of it
    logits = torch.empty(Ls, n, Hq, Nt, dtype=torch.float32, device=queries.device)
    lse = torch.empty(Ls, n, Hq, dtype=torch.float32, device=queries.device)
    g_pad = max(16, triton.next_power_of_2(G))  # a tensor-core product needs >= 16 rows: the G heads, padded
    _logits_kernel[(n, Hkv, Ls)](
        queries, k1, k2, ok1, ok2, _layer_index(layers, queries.device), logits, lse, n, N1, N2, Hq, G,
        float(scale), *queries.stride()[:3], *k1.stride()[:4], *k2.stride()[:4], ok1.stride(0), ok2.stride(0),
        D=D, BLOCK_D=max(16, triton.next_power_of_2(D)), G_PAD=g_pad, BLOCK_N=block_n,
        IEEE=k1.dtype == torch.float32, num_warps=num_warps, num_stages=num_stages)
    block_h = min(triton.next_power_of_2(Hq), 16)
    _mass_kernel[(n, triton.cdiv(Nt, 128))](logits, lse, out, n, Nt, Hq, Ls, BLOCK_H=block_h, BLOCK_N=128,
                                            MAX=reduce == "max")
    return out
