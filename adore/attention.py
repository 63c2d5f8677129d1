"""The decoder forward over slots: the model's own weights, our attention.

We run the layers of a transformers Llama-family model ourselves (like gpt-fast) instead of patching
its attention: the step has R+1 query rows per sequence at scattered positions attending over a slot
cache, which no stock attention interface expresses. Only the model's submodules are called
(q/k/v/o projections, norms, MLP, rotary embedding), so DeepSpeed AutoTP, which swaps those Linear
layers for sharded ones, works unchanged: head counts are read from the (possibly sharded) weights.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from .cache import SlotCache
from .kernels import slot_attention


def decoder_parts(model):
    """(embed, layers, final norm, lm_head, rotary) of a *ForCausalLM model."""
    inner = model.model
    return inner.embed_tokens, inner.layers, inner.norm, model.lm_head, inner.rotary_emb


def _head_dim(cfg) -> int:
    return getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads


def _qkv(attn, x, cos, sin, head_dim):
    """x [B, R, H] -> q [B, Hq, R, D], k, v [B, Hkv, R, D] with RoPE applied."""
    B, R, _ = x.shape
    q = attn.q_proj(x).view(B, R, -1, head_dim)
    k = attn.k_proj(x).view(B, R, -1, head_dim)
    v = attn.v_proj(x).view(B, R, -1, head_dim).transpose(1, 2)
    if getattr(attn, "q_norm", None) is not None:  # Qwen3
        q, k = attn.q_norm(q), attn.k_norm(k)
    q, k = q.transpose(1, 2), k.transpose(1, 2)
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    return q, k, v


class _Packer:
    """Runs the linear layers on the live query rows only.

    A step's rows are padded to the batch's largest rebuild count ([n, R], -1 positions = padding);
    with promote-mode rebuilds most of them are padding, and on a compute-bound device (a CPU, a GPU at
    large batch) every padded row costs a full pass through every projection and MLP. Packing keeps the
    T live rows as one [1, T, ...] sequence for those, and unpacks to [n, R, ...] only for the slot
    attention and the K/V writes (which need the per-sequence layout)."""

    def __init__(self, live: torch.Tensor) -> None:
        self.n, self.R = live.shape
        self.idx = live.reshape(-1).nonzero()[:, 0]  # [T] (one device sync)

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        """[n, R, ...] -> [1, T, ...]"""
        return t.reshape(self.n * self.R, *t.shape[2:]).index_select(0, self.idx)[None]

    def unpack(self, t: torch.Tensor) -> torch.Tensor:
        """[1, T, ...] -> [n, R, ...], zeros at padded rows"""
        out = t.new_zeros(self.n * self.R, *t.shape[2:])
        return out.index_copy_(0, self.idx, t[0]).view(self.n, self.R, *t.shape[2:])

    def heads_unpack(self, t: torch.Tensor) -> torch.Tensor:
        """[1, H, T, D] -> [n, H, R, D]"""
        return self.unpack(t.transpose(1, 2)).transpose(1, 2)


@torch.no_grad()
def forward_slots(model, cache: SlotCache, ids: torch.Tensor, row_pos: torch.Tensor,
                  slots: torch.Tensor, top_k: int | None = None, want_mass: bool = False,
                  used: int | None = None, pack: bool = False):
    """One engine step for the first n rows of the cache.

    ids      [n, R] token ids of the query rows (rebuilt tokens and the current one)
    row_pos  [n, R] their absolute positions, -1 for padded rows
    slots    [n, R] the free slot each row's K/V goes to (the trash slot for padded rows);
             cache.pos must already hold row_pos at those slots
    used     slots [0, used) are read; None: computed from the cache (a device sync). A CUDA graph
             passes a fixed value so that the step has static shapes and no sync.
    pack     run projections and MLPs on the live rows only (dynamic shapes: not inside a graph)
    Returns hidden states after the final norm [n, R, H] and the attention mass per slot
    [n, used] summed over layers (or None).
    """
    embed, layers, norm, _, rotary = decoder_parts(model)
    n = ids.shape[0]
    head_dim = _head_dim(model.config)
    used = cache.used_slots(n) if used is None else used
    slot_pos = cache.pos[:n, :used]
    packer = _Packer(row_pos >= 0) if pack and ids.shape[1] > 1 else None
    if packer is not None:  # x: [1, T, H] over the live rows; else [n, R, H]
        x = embed(packer.pack(ids[..., None])[..., 0])
        cos, sin = rotary(x, packer.pack(row_pos[..., None])[..., 0])
    else:
        x = embed(ids)
        cos, sin = rotary(x, row_pos.clamp(min=0))
    mass = None
    for i, layer in enumerate(layers):
        attn = layer.self_attn
        q, k, v = _qkv(attn, layer.input_layernorm(x), cos, sin, head_dim)
        if packer is not None:
            q, k, v = packer.heads_unpack(q), packer.heads_unpack(k), packer.heads_unpack(v)
        cache.write_kv(i, slots, k, v)
        o, m = slot_attention(q, cache.k[i, :n, :, :used], cache.v[i, :n, :, :used], slot_pos, row_pos,
                              top_k=top_k, scale=getattr(attn, "scaling", None), want_mass=want_mass)
        if m is not None:
            mass = m if mass is None else mass + m
        o = o.transpose(1, 2).reshape(n, ids.shape[1], -1)
        x = x + attn.o_proj(packer.pack(o) if packer is not None else o)
        x = x + layer.mlp(layer.post_attention_layernorm(x))
    x = norm(x)
    return (packer.unpack(x) if packer is not None else x), mass


@torch.no_grad()
def forward_prompt(model, ids: torch.Tensor, want_mass: bool = False, top_k: int | None = None):
    """Causal prefill of one prompt ids [1, P] at positions 0..P-1: dense, or each row keeping its
    top_k keys per head (a model fine-tuned under top-K attention).

    Returns hidden [1, P, H], per-layer K and V lists ([1, Hkv, P, D] each), and the attention mass
    each position received summed over layers, heads and queries ([1, P]) if want_mass."""
    embed, layers, norm, _, rotary = decoder_parts(model)
    P = ids.shape[1]
    head_dim = _head_dim(model.config)
    pos = torch.arange(P, device=ids.device)[None]
    x = embed(ids)
    cos, sin = rotary(x, pos)
    ks, vs, mass = [], [], None
    for layer in layers:
        attn = layer.self_attn
        q, k, v = _qkv(attn, layer.input_layernorm(x), cos, sin, head_dim)
        ks.append(k)
        vs.append(v)
        if want_mass or top_k is not None and top_k < P:
            o, m = slot_attention(q, k, v, pos, pos, top_k=top_k, scale=getattr(attn, "scaling", None),
                                  want_mass=want_mass)
            if want_mass:
                mass = m if mass is None else mass + m
        else:
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=getattr(attn, "scaling", None),
                                               enable_gqa=q.shape[1] != k.shape[1])
        x = x + attn.o_proj(o.transpose(1, 2).reshape(1, P, -1))
        x = x + layer.mlp(layer.post_attention_layernorm(x))
    return norm(x), ks, vs, mass
