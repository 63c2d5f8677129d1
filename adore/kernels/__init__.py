"""Kernels behind the engine's seam: torch reference everywhere, Triton where it runs.

`slot_attention` dispatches: the Triton kernel on CUDA tensors when Triton is importable (and
ADORE_KERNELS != "torch"), else the torch reference. On CPU Triton only runs in its interpreter
(TRITON_INTERPRET=1), hundreds of times slower, so the CPU path is always torch.
`masked_attention` (any key mask: the engine's packed prefill, where a row sees its own prompt only)
is the torch reference everywhere. `copy_tokens` (cache <-> second tier) and `received_attention` (the
ADORE scorer's signal) dispatch like slot_attention.
"""

from __future__ import annotations

import os

import torch

from .reference import copy_tokens as copy_tokens_torch
from .reference import gather_slots, keep_top_k, masked_attention, slice_by_matmul
from .reference import received_attention as received_attention_torch
from .reference import slot_attention as slot_attention_torch

__all__ = ["slot_attention", "slot_attention_torch", "masked_attention", "keep_top_k", "gather_slots",
           "slice_by_matmul", "backend", "copy_tokens", "copy_tokens_torch", "received_attention",
           "received_attention_torch"]


def backend(device: torch.device) -> str:
    """Which implementation `slot_attention` uses for tensors on `device`."""
    if os.environ.get("ADORE_KERNELS", "auto") == "torch" or device.type != "cuda":
        return "torch"
    try:
        from . import triton_slot_attention  # noqa: F401
    except Exception:  # Triton missing or broken: the reference is always correct
        return "torch"
    return "triton"


def slot_attention(q, k_cache, v_cache, slot_pos, row_pos, top_k=None, scale=None, want_mass=False):
    """See `reference.slot_attention` for shapes and semantics."""
    if backend(q.device) == "triton":
        from .triton_slot_attention import slot_attention_triton

        return slot_attention_triton(q, k_cache, v_cache, slot_pos, row_pos, top_k, scale, want_mass)
    return slot_attention_torch(q, k_cache, v_cache, slot_pos, row_pos, top_k, scale, want_mass)


def copy_tokens(src, src_b, src_s, dst, dst_b, dst_s) -> None:
    """See `reference.copy_tokens`: whole tokens (all layers, all KV heads) from src to dst."""
    if backend(src.device) == "triton":
        from .triton_copy_tokens import copy_tokens_triton

        return copy_tokens_triton(src, src_b, src_s, dst, dst_b, dst_s)
    return copy_tokens_torch(src, src_b, src_s, dst, dst_b, dst_s)


def received_attention(queries, keys, ok, scale, layers, reduce: str = "sum") -> torch.Tensor:
    """See `reference.received_attention`: [n, sum N_g], per key the softmax weight it gets summed (or its
    max) over the scoring layers and query heads (float64 from torch, float32 from Triton)."""
    if backend(queries.device) == "triton" and len(keys) <= 2:
        from .triton_received_attention import received_attention_triton

        return received_attention_triton(queries, keys, ok, scale, layers, reduce)
    return received_attention_torch(queries, keys, ok, scale, layers, reduce)
