"""The decoder forward: the model's own weights, our attention.

We run the layers of a transformers Llama-family model ourselves (like gpt-fast) instead of patching
its attention: the engine's step has R+1 query rows per sequence at scattered positions attending
over a slot cache, which no stock attention interface expresses. `run_layers` is the one layer loop
(embedded input -> rotary -> every layer -> hidden before the final norm); each caller supplies the
attention step of a layer, `attend(i, q, k, v) -> out`:

    forward_slots     the engine's decode step: write K/V into the slot cache, slot attention
    forward_prompts   the engine's prefill: block-diagonal causal attention over packed prompts
                      (dense, or top-K, or with the mass); forward_prompt is one whole prompt of it
    labels.collect_qk      keeps the queries and keys of some layers (controller labels)
    streameval.masked_logprobs  attention restricted to a [T, T] membership mask

The prefill packs the prompts a step admits end to end into one [1, T] sequence, each token at its
own position (restarting at 0 for each prompt), so the linear layers run once on all T rows. Its
attention is block-diagonal and causal: a token sees only its own prompt's tokens at or before it.
A prompt may come in chunks over several forwards (the engine's `max_prefill_tokens` per step): its
`PromptKV` keeps the K/V of every position run so far (all layers, nothing cut) and the attention
mass they received, and a later chunk's rows attend to those keys plus their own. The attention runs
in blocks of consecutive query rows, each over just the keys of the prompts it touches, so its scores
(or, for the fused dense attention, its mask) stay within `PREFILL_SCORES` per block however long the
prompts are.

Only the model's submodules are called (q/k/v/o projections, norms, MLP, rotary embedding), so
DeepSpeed AutoTP, which swaps those Linear layers for sharded ones, works unchanged: head counts are
read from the (possibly sharded) weights.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.bias import causal_lower_right
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from .cache import SlotCache
from .kernels import masked_attention, slot_attention

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
    for i, layer in enumerate(itertools.islice(layers, n_layers)):
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


@dataclass
class PromptKV:
    """A prompt on its way through the prefill, in one forward or in chunks over several (the
    engine's staging between steps): its ids, and what the positions run so far left behind.

    ids   [P] its tokens
    k, v  [L, Hkv, P, D] per layer, the keys (RoPE applied) and values of positions [0, done); None
          before the first forward (a prompt run whole in one forward gets views of that forward's K/V;
          one chunked over several gets room for all P positions at its first chunk)
    mass  [P] float32 the attention each position has received so far, summed over layers, heads
          and the query rows run so far; None: not collected
    q_last  [L, 1, Hq, D] each layer's query of the last position, once it has run and if
          want_queries (for a policy that scores the prompt by its last token's attention)
    done  positions run so far
    """

    ids: torch.Tensor
    k: torch.Tensor | None = None
    v: torch.Tensor | None = None
    mass: torch.Tensor | None = None
    q_last: torch.Tensor | None = None
    done: int = 0
    want_queries: bool = False

    @classmethod
    def new(cls, ids: torch.Tensor, want_mass: bool = False, want_queries: bool = False) -> PromptKV:
        """ids [P] (on the model's device), nothing run yet."""
        mass = torch.zeros(ids.shape[0], device=ids.device) if want_mass else None
        return cls(ids, mass=mass, want_queries=want_queries)


# The packed prefill's attention runs in blocks of query rows, each holding at most this many fp32
# scores [query heads, rows, keys] (128 MiB) where the scores are explicit (attention mass, top-K), or
# this many cells of the mask [rows, keys] where a fused kernel attends: its memory bound, however long
# the prompts are.
PREFILL_SCORES = 1 << 25

# The fused kernels the dense packed prefill may use. Not cuDNN's: on an H200 it spends ~0.9 ms of host
# time per call building a plan for each new (rows, keys, mask) shape, and a prefill's shapes are new
# every step (bench/gpu_latency.py --profile: 0.55 s of a mixed step's host time in 3 steps).
_PREFILL_SDPA = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]

# A fresh chunk (a prompt's first) of fewer rows than this is attended in a padded batch with the other
# short fresh chunks of the forward ([k, H, longest, D], causal: no mask, no other prompt's keys; a burst
# of 512 prompts of 32 tokens costs 512 x 32 x 32 scores a head instead of a masked 16,384 x 16,384
# block). In the dense prefill every other chunk gets query blocks of its own, which attend causally
# (lower-right aligned: the rows are the last positions of the keys) and the flash kernel runs without
# a mask; with explicit scores (mass, top-K) they share masked blocks. On an H200 a masked 4,096 x 4,096
# block of two prompts took 70 ms a layer set against ~5 for the two causal ones (bench/gpu_latency.py
# --profile).
PREFILL_ALONE = 256


@dataclass
class _Block:
    """Query rows [a, b) of a packed prefill and the keys they see: for each prompt they belong to,
    (chunk index, start, n): that prompt's keys [0, n), placed at [start, start + n) of the block's
    keys. Row r may see keys lo[r]..hi[r]: its own prompt's, up to its own position."""

    a: int
    b: int
    keys: list[tuple[int, int, int]]
    lo: torch.Tensor  # [b - a]
    hi: torch.Tensor  # [b - a]


def _query_blocks(spans: list[tuple[int, int]], max_cells: int, alone: int | None = None,
                  skip: frozenset[int] = frozenset()) -> list[tuple[int, int]]:
    """Cut the packed rows of chunks spans [(done, n)] (positions done..done+n-1 each) into blocks of
    consecutive rows [a, b) with rows x keys <= max_cells (one row a block at least); a block's keys
    are, for each prompt it touches, that prompt's positions up to the block's last row of it.
    Greedy, each block's end solved for: rows [a, x) ending inside a chunk that starts at row `off`
    see closed + done + (x - off) keys, closed being those of the block's earlier prompts. A chunk of
    at least `alone` rows shares no block with another prompt's; the chunks numbered in `skip` are in
    no block (they are attended elsewhere)."""
    out, a, closed, off = [], 0, 0, 0
    for i, (done, n) in enumerate(spans):
        end, r = off + n, off
        if i in skip:
            if off > a:
                out.append((a, off))
            a, closed, off = end, 0, end
            continue
        own = alone is not None and n >= alone
        if own and off > a:  # a long chunk starts a block of its own...
            out.append((a, off))
            a, closed = off, 0
        while r < end:
            c = closed + done - off  # rows [a, x) see c + x keys: the largest x with (x - a)(x + c) <= cells
            x = min(end, (a - c + math.isqrt((a + c) ** 2 + 4 * max_cells)) // 2)
            if x <= r and r > a:  # not even row r fits: the block ends before it
                out.append((a, r))
                a, closed = r, 0
                continue
            r = max(x, r + 1)
            if r < end:  # this chunk goes on in a new block
                out.append((a, r))
                a, closed = r, 0
        closed += done + n
        off = end
        if own:  # ...and ends it
            out.append((a, off))
            a, closed = off, 0
    return out + [(a, off)] if off > a else out


def _blocks(chunks: list[tuple[PromptKV, int]], pos: torch.Tensor, max_cells: int,
            alone: int | None = None, skip: frozenset[int] = frozenset()) -> list[_Block]:
    """The blocks of `_query_blocks` with their keys and each row's visible key range."""
    out, j0, offs = [], 0, list(itertools.accumulate((n for _, n in chunks), initial=0))
    for a, b in _query_blocks([(kv.done, n) for kv, n in chunks], max_cells, alone, skip):
        while offs[j0 + 1] <= a:
            j0 += 1
        keys, rows, k0 = [], [], 0
        for j in range(j0, len(chunks)):
            if offs[j] >= b:
                break
            last = min(b, offs[j + 1])  # the block's rows of chunk j end here; its keys up to that row
            n = chunks[j][0].done + last - offs[j]
            keys.append((j, k0, n))
            rows.append(last - max(a, offs[j]))
            k0 += n
        lo = torch.repeat_interleave(torch.tensor([k for _, k, _ in keys]), torch.tensor(rows)).to(pos.device)
        out.append(_Block(a, b, keys, lo, lo + pos[a:b]))
    return out


@dataclass
class _Padded:
    """Short fresh chunks attended as one padded batch [k, H, longest, D]. Each chunk's rows start at
    its prompt's position 0 and the padding (copies of its last row) comes after them, so causal
    attention gives every real row exactly its own prompt's keys at or before it, with no mask.

    rows   [k, longest] the packed row of each padded row
    real   [J] where the real rows are in the flattened [k * longest] batch; at [J] their packed rows
    allowed  [k, longest, longest] causal, real rows only (explicit scores: no mass to the padding)
    """

    rows: torch.Tensor
    real: torch.Tensor
    at: torch.Tensor
    allowed: torch.Tensor | None


def _padded_batches(chunks: list[tuple[PromptKV, int]], offs: list[int], dev, max_cells: int,
                    alone: int, explicit: bool) -> tuple[list[_Padded], frozenset[int]]:
    """The fresh chunks of fewer than `alone` rows, by length, in padded batches of at most max_cells
    cells (rows x keys, summed over the batch); and the set of their chunk numbers."""
    short = sorted((n, j) for j, (kv, n) in enumerate(chunks) if kv.done == 0 and n < alone)
    out, i = [], 0
    while i < len(short):
        k = 1
        while i + k < len(short) and (k + 1) * short[i + k][0] ** 2 <= max_cells:
            k += 1
        part, longest = short[i : i + k], short[i + k - 1][0]
        ar = torch.arange(longest)
        rows = torch.stack([offs[j] + ar.clamp(max=n - 1) for n, j in part])  # [k, longest], on the host
        ok = torch.stack([ar < n for n, _ in part])
        allowed = None
        if explicit:
            allowed = (ar[None, :, None] >= ar[None, None, :]) & ok[:, :, None]
            allowed = allowed.to(dev)
        out.append(_Padded(rows.to(dev), ok.flatten().nonzero()[:, 0].to(dev), rows[ok].to(dev), allowed))
        i += k
    return out, frozenset(j for _, j in short)


@torch.no_grad()
def forward_prompts(model, chunks: list[tuple[PromptKV, int]], top_k: int | None = None,
                    max_scores: int = PREFILL_SCORES, alone: int = PREFILL_ALONE) -> torch.Tensor:
    """Packed causal prefill: the next n positions of several prompts in ONE forward.

    chunks  (prompt, n) each: the prompt's positions done..done+n-1 run as n rows of one packed
            [1, T] sequence (T = the sum of n), each row at its own position and attending only to
            its own prompt's keys at or before it: its earlier chunks' (kept in the PromptKV) and
            this chunk's (block-diagonal causal attention). Dense, or each row keeping its top_k
            keys per head among those (a model fine-tuned under top-K attention).
    Each PromptKV receives this chunk's K/V in every layer and, if it collects mass, the attention
    its positions received from these rows; then done += n (mass and done only once the forward has
    succeeded, so a failed one can be run again). Returns the hidden states after the final norm
    [1, T, H]: a prompt's last row gives its next token once its last chunk is in.

    Fresh chunks (a prompt's first) of fewer than `alone` rows attend in padded batches, causally, each
    over its own rows (`_Padded`). The other chunks attend in blocks of consecutive query rows
    (`_query_blocks`), each over the keys of the prompts it touches: at most max_scores scores
    [Hq, rows, keys] per block or padded batch (mask cells [rows, keys] where no explicit scores are
    needed), so memory stays bounded whatever the prompts' lengths, and the work is rows x the keys of
    their own prompts (plus those of the block's other prompts), not T x T. Without explicit scores
    each of those chunks has blocks of its own (lower-right causal, no mask).
    """
    embed, _, norm, _, _ = decoder_parts(model)
    dev = chunks[0][0].ids.device
    ids = torch.cat([kv.ids[kv.done : kv.done + n] for kv, n in chunks])[None]  # [1, T]
    pos = torch.cat([torch.arange(kv.done, kv.done + n) for kv, n in chunks]).to(dev)  # built on the host
    offs = list(itertools.accumulate((n for _, n in chunks), initial=0))
    q_heads = model.model.layers[0].self_attn.q_proj.weight.shape[0] // head_dim(model.config)  # local (AutoTP)
    want_mass = any(kv.mass is not None for kv, _ in chunks)
    explicit = want_mass or top_k is not None  # fp32 scores per head; else a fused kernel and a mask
    cells = max(1, max_scores // q_heads if explicit else max_scores)
    padded, skip = _padded_batches(chunks, offs, dev, cells, alone, explicit)
    blocks = _blocks(chunks, pos, cells, None if explicit else 1, skip)
    # this forward's mass: per prompt in blocks, over its keys [0, done + n); the padded chunks' in one
    # packed vector [T] (their keys are their own rows); added to the PromptKVs at the end
    mass = [torch.zeros(kv.done + n, device=dev) if kv.mass is not None and j not in skip else None
            for j, (kv, n) in enumerate(chunks)]
    packed_mass = torch.zeros(offs[-1], device=dev) if want_mass and padded else None
    scale = attention_scale(model)

    # this forward's K/V of every layer, all rows packed [L, Hkv, T, D], and each finishing prompt's
    # last query [L, F, Hq, D]: one write a layer, then one copy a chunk (not 3 x L small copies a chunk)
    L = model.config.num_hidden_layers
    last = [j for j, (kv, n) in enumerate(chunks) if kv.want_queries and kv.done + n == len(kv.ids)]
    last_rows = torch.tensor([offs[j] + chunks[j][1] - 1 for j in last], device=dev)
    new_k = new_v = q_last = None
    w, kv_heads = next(model.parameters()), local_kv_heads(model)
    for kv, n in chunks:  # room for a prompt that comes in chunks, before anything changes (may fail)
        if kv.k is None and n < len(kv.ids):
            shape = (L, kv_heads, len(kv.ids), head_dim(model.config))
            kv.k, kv.v = w.new_empty(shape), w.new_empty(shape)

    def keys(j: int, n: int, i: int, new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
        """Prompt j's keys (or values) [0, n) in layer i: its earlier chunks' (old) and this forward's."""
        done, r = chunks[j][0].done, offs[j]
        return new[:, r : r + n] if done == 0 else torch.cat([old[i, :, :done], new[:, r : r + n - done]], 1)

    def attend(i, q, k, v):
        nonlocal new_k, new_v, q_last
        if new_k is None:
            new_k, new_v = k.new_empty(L, *k.shape[1:]), v.new_empty(L, *v.shape[1:])
            q_last = q.new_empty(L, len(last), q.shape[1], q.shape[3])
        new_k[i], new_v[i] = k[0], v[0]
        if last:
            q_last[i] = q[0, :, last_rows].transpose(0, 1)
        out = torch.empty_like(q)
        gqa = q.shape[1] != k.shape[1]
        for pb in padded:  # [1, H, T, D] -> [k, H, longest, D] and back
            qb, kb, vb = (t[0][:, pb.rows].transpose(0, 1) for t in (q, k, v))
            if explicit:
                o, m = masked_attention(qb, kb, vb, pb.allowed, top_k, scale, want_mass)
                if m is not None:
                    packed_mass.index_add_(0, pb.at, m.flatten()[pb.real])
            else:
                with sdpa_kernel(_PREFILL_SDPA):
                    o = F.scaled_dot_product_attention(qb, kb, vb, is_causal=True, scale=scale, enable_gqa=gqa)
            flat = o.transpose(0, 1).reshape(o.shape[1], -1, o.shape[3])  # [H, k * longest, D]
            out[0][:, pb.at] = flat[:, pb.real]
        for blk in blocks:
            if all(chunks[j][0].done == 0 for j, _, _ in blk.keys):  # all keys are this forward's: a view
                a, b = offs[blk.keys[0][0]], offs[blk.keys[-1][0]] + blk.keys[-1][2]
                kb, vb = k[:, :, a:b], v[:, :, a:b]
            else:
                kb = _cat([keys(j, n, i, k[0], chunks[j][0].k) for j, _, n in blk.keys])[None]
                vb = _cat([keys(j, n, i, v[0], chunks[j][0].v) for j, _, n in blk.keys])[None]
            ar = torch.arange(kb.shape[2], device=dev)
            allowed = (ar >= blk.lo[:, None]) & (ar <= blk.hi[:, None])  # [rows, keys]
            qb = q[:, :, blk.a : blk.b]
            if want_mass or top_k is not None and top_k < kb.shape[2]:
                o, m = masked_attention(qb, kb, vb, allowed[None], top_k, scale, want_mass)
                for j, k0, n in blk.keys:
                    if mass[j] is not None:
                        mass[j][:n] += m[0, k0 : k0 + n]
            else:
                # one prompt's rows are the last of its keys: lower-right causal, no mask to read
                mask = causal_lower_right(qb.shape[2], kb.shape[2]) if len(blk.keys) == 1 else allowed
                with sdpa_kernel(_PREFILL_SDPA):
                    o = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=mask, scale=scale, enable_gqa=gqa)
            out[:, :, blk.a : blk.b] = o
        return out

    x = norm(run_layers(model, embed(ids), pos[None], attend))
    for (kv, n), r, m in zip(chunks, offs, mass):
        if kv.done == 0 and n == len(kv.ids):  # the whole prompt in this forward: views, no copy
            kv.k, kv.v = new_k[:, :, r : r + n], new_v[:, :, r : r + n]
        else:
            kv.k[:, :, kv.done : kv.done + n] = new_k[:, :, r : r + n]
            kv.v[:, :, kv.done : kv.done + n] = new_v[:, :, r : r + n]
        if m is not None:
            kv.mass[: m.shape[0]] += m
        elif kv.mass is not None:  # a padded chunk
            kv.mass[:n] += packed_mass[r : r + n]
        kv.done += n
    for f, j in enumerate(last):
        chunks[j][0].q_last = q_last[:, f : f + 1]
    return x


def _cat(parts: list[torch.Tensor]) -> torch.Tensor:
    """Concatenate [H, n, D] parts along the keys; one part is returned as it is (a view, no copy)."""
    return parts[0] if len(parts) == 1 else torch.cat(parts, 1)


@torch.no_grad()
def forward_prompt(model, ids: torch.Tensor, want_mass: bool = False, top_k: int | None = None):
    """Causal prefill of one whole prompt ids [1, P] at positions 0..P-1 (`forward_prompts` with one
    chunk): dense, or each row keeping its top_k keys per head.

    Returns hidden [1, P, H], per-layer K and V lists ([1, Hkv, P, D] each), and the attention mass
    each position received summed over layers, heads and queries ([1, P]) if want_mass."""
    kv = PromptKV.new(ids[0], want_mass)
    hidden = forward_prompts(model, [(kv, ids.shape[1])], top_k=top_k)
    return hidden, list(kv.k[:, None]), list(kv.v[:, None]), None if kv.mass is None else kv.mass[None]
