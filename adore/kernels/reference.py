"""Torch reference for the engine's attention seam.

Every step of the engine runs, per layer, one call of `slot_attention`: R query rows per sequence (the
current token plus any rebuilt ones) attend over that sequence's fixed-capacity KV slots. The new
rows' K/V are written into free slots *before* the call, so "causal by position" covers both the
cached tokens (older positions) and the new rows (a row sees new rows at or before its position).

The Triton kernel in `triton_slot_attention.py` computes the same function; tests compare the two.
"""

from __future__ import annotations

import torch


def keep_top_k(scores: torch.Tensor, top_k: int | None) -> torch.Tensor:
    """The top-K attention rule, used wherever attention keeps a top-K: each row of scores [..., N]
    keeps the entries >= its top_k-th largest (ties kept; disallowed entries are already -inf) and
    the others become -inf. top_k None, or >= N, keeps every entry. The Triton kernel computes the
    same threshold its own way (tests/test_kernels.py compares it with `slot_attention` below)."""
    if top_k is None or top_k >= scores.shape[-1]:
        return scores
    kth = scores.topk(top_k, dim=-1).values[..., -1:].detach()  # a threshold: no gradient through it
    return scores.masked_fill(scores < kth, float("-inf"))


def masked_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    allowed: torch.Tensor,
    top_k: int | None = None,
    scale: float | None = None,
    want_mass: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Attention of query rows over keys where allowed[b, r, j] says which key row r may see, with
    optional per-head top-K: the one explicit-scores attention (`slot_attention` derives `allowed`
    from positions; the engine's packed prefill from positions and prompt ids).

    q:       [B, Hq, R, D]   query rows (RoPE applied)
    k, v:    [B, Hkv, C, D]  Hq % Hkv == 0
    allowed: [B, R, C] bool
    top_k:   if set, each (row, head) keeps only keys whose score is >= its K-th largest allowed
             score (ties are kept; `keep_top_k`); None keeps every allowed key
    A row with no allowed key (a padded row) gets zeros.

    Returns out [B, Hq, R, D] in q's dtype, and if want_mass the attention probability each key
    received, summed over heads and rows: [B, C] float32, else None. Memory: the fp32 scores
    [B, Hq, R, C] and a few temporaries of that size.
    """
    B, Hq, R, D = q.shape
    Hkv, C = k.shape[1], k.shape[2]
    G = Hq // Hkv
    scale = D**-0.5 if scale is None else scale
    # GQA: the G query heads that share a KV head become extra rows of one matmul.
    qg = q.reshape(B, Hkv, G * R, D)
    s = torch.matmul(qg, k.transpose(-1, -2)).float() * scale  # [B, Hkv, G*R, C]
    s = s.view(B, Hkv, G, R, C)
    s = keep_top_k(s.masked_fill(~allowed[:, None, None], float("-inf")), top_k)
    p = torch.softmax(s, dim=-1).nan_to_num_(0.0)  # all-masked rows -> 0
    out = torch.matmul(p.view(B, Hkv, G * R, C).to(v.dtype), v)
    mass = p.sum(dim=(1, 2, 3)) if want_mass else None
    return out.view(B, Hq, R, D).to(q.dtype), mass


def slot_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_pos: torch.Tensor,
    row_pos: torch.Tensor,
    top_k: int | None = None,
    scale: float | None = None,
    want_mass: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Attention of query rows over KV slots, causal by absolute position, optional per-head top-K.

    q:        [B, Hq, R, D]   query rows (RoPE applied)
    k_cache:  [B, Hkv, C, D]  keys per slot (RoPE applied at each token's own position); Hq % Hkv == 0
    v_cache:  [B, Hkv, C, D]
    slot_pos: [B, C] int      absolute position of the token in each slot, -1 for an empty slot
    row_pos:  [B, R] int      absolute position of each query row, -1 for a padded row
    top_k:    if set, each (row, head) keeps only keys whose score is >= its K-th largest allowed
              score (ties are kept; `keep_top_k`); None keeps every allowed key
    Key j is allowed for row r iff slot_pos[b, j] >= 0 and slot_pos[b, j] <= row_pos[b, r].
    A row with no allowed key (a padded row) gets zeros.

    Returns out [B, Hq, R, D] in q's dtype, and if want_mass the attention probability each slot
    received, summed over heads and rows: [B, C] float32 (zeros for empty slots), else None.
    """
    allowed = (slot_pos[:, None, :] >= 0) & (slot_pos[:, None, :] <= row_pos[:, :, None])  # [B, R, C]
    return masked_attention(q, k_cache, v_cache, allowed, top_k, scale, want_mass)


def gather_slots(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Slot move by gather: x [L, B, H, C, D], index [B, N] (one index per sequence for all layers)
    -> [L, B, H, N, D] with out[l, b, h, n] = x[l, b, h, index[b, n]]."""
    L, B, H, C, D = x.shape
    idx = index[None, :, None, :, None].expand(L, B, H, index.shape[1], D)
    return torch.gather(x, 3, idx)


def slice_by_matmul(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """The paper's slot move: a product with a 0/1 slicing matrix S [B, N, C] (S[b, n, index[b, n]] = 1)
    instead of a gather. Same result as gather_slots."""
    L, B, H, C, D = x.shape
    S = torch.nn.functional.one_hot(index, C).to(x.dtype)  # [B, N, C]
    return torch.matmul(S[None, :, None], x)  # [L, B, H, N, D]


def copy_tokens(src: torch.Tensor, src_b: torch.Tensor, src_s: torch.Tensor,
                dst: torch.Tensor, dst_b: torch.Tensor, dst_s: torch.Tensor) -> None:
    """Copy whole tokens between slot tensors: src, dst [L, B, Hkv, S, D]; src_b, src_s, dst_b, dst_s [J]
    (sequence and slot of each token on either side). dst[:, dst_b[j], :, dst_s[j]] = src[:, src_b[j], :, src_s[j]].

    Where both sides can be viewed as [L, B * Hkv * S, D] (the cache and its tier always can), a token's
    head h is row (b * Hkv + h) * S + s of that view, and the copy is one index_select and one
    index_copy_ of contiguous D-wide rows: on a CPU 4x faster than the advanced indexing below (whose
    two index dimensions around a slice make torch gather through a permuted temporary)."""
    L, _, H, S_src, D = src.shape
    try:
        src_rows, dst_rows = src.view(L, -1, D), dst.view(L, -1, D)
    except RuntimeError:  # a strided view (a prompt's K/V inside a packed buffer): the general form
        dst[:, dst_b, :, dst_s] = src[:, src_b, :, src_s].to(dst.dtype)
        return
    h = torch.arange(H, device=src.device)
    si = ((src_b[:, None] * H + h) * S_src + src_s[:, None]).reshape(-1)  # [J * Hkv]
    di = ((dst_b[:, None] * H + h) * dst.shape[3] + dst_s[:, None]).reshape(-1)
    dst_rows.index_copy_(1, di, src_rows.index_select(1, si).to(dst.dtype))


def received_attention(queries: torch.Tensor, keys: list[torch.Tensor], ok: list[torch.Tensor],
                       scale: float, layers: list[int], reduce: str = "sum") -> torch.Tensor:
    """The attention one query per sequence gives sets of keys, summed over layers and query heads
    (the ADORE scorer's signal; `adore.policies.adore.received_attention` averages it).

    Parameters
    ----------
    queries : [L, n, Hq, D] the current token's query at every layer
    keys : groups of keys [L, n, Hkv, N_g, D] (the cache's slots, the second tier's), softmaxed together
    ok : per group [n, N_g] bool, which keys exist
    scale : the model's softmax scale
    layers : the layers to sum over
    reduce : "sum" over the layers and query heads, or their "max" (the one head that attends most)

    Returns
    -------
    [n, sum N_g] float64: per key, the sum (or max) over `layers` and the Hq query heads of its softmax
    weight (0 where not ok), groups side by side in order.
    """
    L, n, Hq, D = queries.shape
    G = Hq // keys[0].shape[2]
    # the keys are read in their own dtype (a float copy of every stored key would cost more than the
    # product); only the logits [n, Hkv, G, N] are taken to float32 for the softmax
    q = queries.reshape(L, n, -1, G, D).to(keys[0].dtype)  # [L, n, Hkv, G, D]
    # a product per layer and group (k[i] is a view: the keys are never copied), then the softmax and
    # the sum over all layers at once (a few ops over [layers, n, Hkv, G, N], not a dozen per layer)
    logits = torch.stack([torch.cat([torch.matmul(q[i], k[i].transpose(-1, -2)) for k in keys], -1)
                          for i in layers]).float()  # [layers, n, Hkv, G, sum N_g]
    hidden = ~torch.cat(ok, -1)[:, None, None]  # [n, 1, 1, sum N_g]
    p = torch.softmax(logits.mul_(scale).masked_fill_(hidden, float("-inf")), -1).nan_to_num_(0.0)
    return (p.amax((0, 2, 3)) if reduce == "max" else p.sum((0, 2, 3))).double()
