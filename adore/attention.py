"""The decoder forward: the model's own weights, our attention.

We run the layers of a transformers Llama-family model ourselves (like gpt-fast) instead of patching
its attention: the engine's step has R+1 query rows per sequence at scattered positions attending
over a slot cache, which no stock attention interface expresses. `run_layers` is the one layer loop
(embedded input -> rotary -> every layer -> hidden before the final norm); each caller supplies the
attention step of a layer, `attend(i, q, k, v) -> out`:

    forward_slots     the engine's decode step: write K/V into the slot cache, slot attention
    forward_prompt    the engine's prefill: dense causal attention (or top-K, or with the mass)
    labels.collect_qk      keeps the queries and keys of some layers (controller labels)
    streameval.masked_logprobs  attention restricted to a [T, T] membership mask

Only the model's submodules are called (q/k/v/o projections, norms, MLP, rotary embedding), so
DeepSpeed AutoTP, which swaps those Linear layers for sharded ones, works unchanged: head counts are
read from the (possibly sharded) weights.
"""

from __future__ import annotations

from collections.abc import Callable
from itertools import islice

import torch
import torch.nn.functional as F
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from .cache import SlotCache
from .kernels import slot_attention

# attend(layer index, q [B, Hq, R, D], k [B, Hkv, R, D], v [B, Hkv, R, D]) -> out [B, Hq, R, D]
AttentionStep = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def decoder_parts(model):
    """(embed, layers, final norm, lm_head, rotary) of a *ForCausalLM model."""
    inner = model.model
    return inner.embed_tokens, inner.layers, inner.norm, model.lm_head, inner.rotary_emb


def head_dim(config) -> int:
    """Width of one attention head of a transformers config."""
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def local_kv_heads(model) -> int:
    """KV heads held by this process: under AutoTP the heads are sharded across ranks, so they are
    counted from the (possibly sharded) k_proj weight, not read from the config."""
    return model.model.layers[0].self_attn.k_proj.weight.shape[0] // head_dim(model.config)


def attention_scale(model) -> float:
    """The softmax scale of the model's attention (its layers' `scaling`, else head_dim ** -0.5)."""
    return getattr(model.model.layers[0].self_attn, "scaling", None) or head_dim(model.config) ** -0.5


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Dense causal attention of q [B, Hq, T, D] over k, v [B, Hkv, T, D] at the same positions."""
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=q.shape[1] != k.shape[1])


def _qkv(attn, x, cos, sin, hd):
    """x [B, R, H] -> q [B, Hq, R, D], k, v [B, Hkv, R, D] with RoPE applied."""
    B, R, _ = x.shape
    q = attn.q_proj(x).view(B, R, -1, hd)
    k = attn.k_proj(x).view(B, R, -1, hd)
    v = attn.v_proj(x).view(B, R, -1, hd).transpose(1, 2)
    if getattr(attn, "q_norm", None) is not None:  # Qwen3
        q, k = attn.q_norm(q), attn.k_norm(k)
    q, k = q.transpose(1, 2), k.transpose(1, 2)
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    return q, k, v


def run_layers(model, x: torch.Tensor, pos: torch.Tensor, attend: AttentionStep,
               n_layers: int | None = None) -> torch.Tensor:
    """The decoder layers over embedded rows x [B, R, H] at positions pos [B, R] (>= 0), each layer's
    attention computed by attend(i, q, k, v) -> [B, Hq, R, D]. Runs the first n_layers layers (all
    by default) and returns the hidden states before the final norm [B, R, H]."""
    _, layers, _, _, rotary = decoder_parts(model)
    hd = head_dim(model.config)
    cos, sin = rotary(x, pos)
    B, R, _ = x.shape
    for i, layer in enumerate(islice(layers, n_layers)):
        attn = layer.self_attn
        q, k, v = _qkv(attn, layer.input_layernorm(x), cos, sin, hd)
        o = attend(i, q, k, v)
        x = x + attn.o_proj(o.transpose(1, 2).reshape(B, R, -1))
        x = x + layer.mlp(layer.post_attention_layernorm(x))
    return x


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

    def heads_pack(self, t: torch.Tensor) -> torch.Tensor:
        """[n, H, R, D] -> [1, H, T, D]"""
        return self.pack(t.transpose(1, 2)).transpose(1, 2)

    def heads_unpack(self, t: torch.Tensor) -> torch.Tensor:
        """[1, H, T, D] -> [n, H, R, D]"""
        return self.unpack(t.transpose(1, 2)).transpose(1, 2)


def _add(total: torch.Tensor | None, m: torch.Tensor | None) -> torch.Tensor | None:
    return m if total is None else total if m is None else total + m


@torch.no_grad()
def forward_slots(model, cache: SlotCache, ids: torch.Tensor, row_pos: torch.Tensor,
                  slots: torch.Tensor, top_k: int | None = None, want_mass: bool = False,
                  used: int | None = None, pack: bool = False, queries: torch.Tensor | None = None):
    """One engine step for the first n rows of the cache.

    ids      [n, R] token ids of the query rows (rebuilt tokens and the current one)
    row_pos  [n, R] their absolute positions, -1 for padded rows
    slots    [n, R] the free slot each row's K/V goes to (the trash slot for padded rows);
             cache.pos must already hold row_pos at those slots
    used     slots [0, used) are read; None: computed from the cache (a device sync). A CUDA graph
             passes a fixed value so that the step has static shapes and no sync.
    pack     run projections and MLPs on the live rows only (dynamic shapes: not inside a graph)
    queries  [L, n, Hq, D] or None: filled with each layer's query of the last row (the current
             token), for a policy that scores tokens by the current token's attention
    Returns hidden states after the final norm [n, R, H] and the attention mass per slot
    [n, used] summed over layers (or None).
    """
    embed, _, norm, _, _ = decoder_parts(model)
    n = ids.shape[0]
    used = cache.used_slots(n) if used is None else used
    slot_pos = cache.pos[:n, :used]
    scale = attention_scale(model)
    packer = _Packer(row_pos >= 0) if pack and ids.shape[1] > 1 else None
    mass = None

    def attend(i, q, k, v):  # the slot cache's layout is per sequence: [n, H, R, D]
        nonlocal mass
        if packer is not None:
            q, k, v = packer.heads_unpack(q), packer.heads_unpack(k), packer.heads_unpack(v)
        if queries is not None:
            queries[i] = q[:, :, -1]
        cache.write_kv(i, slots, k, v)
        o, m = slot_attention(q, cache.k[i, :n, :, :used], cache.v[i, :n, :, :used], slot_pos, row_pos,
                              top_k=top_k, scale=scale, want_mass=want_mass)
        mass = _add(mass, m)
        return packer.heads_pack(o) if packer is not None else o

    if packer is None:  # rows [n, R]
        x = norm(run_layers(model, embed(ids), row_pos.clamp(min=0), attend))
    else:  # rows [1, T]: the live rows only
        x = packer.unpack(norm(run_layers(model, embed(packer.pack(ids)), packer.pack(row_pos), attend)))
    return x, mass


@torch.no_grad()
def forward_prompt(model, ids: torch.Tensor, want_mass: bool = False, top_k: int | None = None,
                   queries: torch.Tensor | None = None):
    """Causal prefill of one prompt ids [1, P] at positions 0..P-1: dense, or each row keeping its
    top_k keys per head (a model fine-tuned under top-K attention). queries [L, 1, Hq, D] or None:
    filled with each layer's query of the last position.

    Returns hidden [1, P, H], per-layer K and V lists ([1, Hkv, P, D] each), and the attention mass
    each position received summed over layers, heads and queries ([1, P]) if want_mass."""
    embed, _, norm, _, _ = decoder_parts(model)
    P = ids.shape[1]
    pos = torch.arange(P, device=ids.device)[None]
    scale = attention_scale(model)
    ks, vs, mass = [], [], None

    def attend(i, q, k, v):
        nonlocal mass
        ks.append(k)
        vs.append(v)
        if queries is not None:
            queries[i] = q[:, :, -1]
        if want_mass or top_k is not None and top_k < P:
            o, m = slot_attention(q, k, v, pos, pos, top_k=top_k, scale=scale, want_mass=want_mass)
            mass = _add(mass, m)
            return o
        return causal_attention(q, k, v, scale)

    return norm(run_layers(model, embed(ids), pos, attend)), ks, vs, mass
