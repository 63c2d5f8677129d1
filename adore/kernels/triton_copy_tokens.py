"""Triton kernel: copy whole tokens (every layer and KV head) between two slot tensors.

The cache and its second tier are [L, B, Hkv, S, D]: one token of one sequence is L * Hkv vectors of
D contiguous elements, strided apart. Releasing a token copies it cache -> tier and re-admitting one
copies it back. torch's advanced indexing (`dst[:, b, :, s] = src[:, b2, :, s2]`) gathers into a
temporary and scatters element by element, about ten times under the copy bandwidth on an H200;
here one program copies one token's vectors in blocks of BLOCK_LH rows of D, straight from src to
dst (read once, written once, 128-bit accesses along D).

Grid: (J tokens, ceil(L * Hkv / BLOCK_LH)). Offsets are int64 (a tier of 300 sequences x 512 tokens
of a 7B model holds over 2^31 elements).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _copy_tokens_kernel(src, dst, src_b, src_s, dst_b, dst_s, LH, H,
                        s_l, s_b, s_h, s_s, d_l, d_b, d_h, d_s,
                        D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_LH: tl.constexpr):
    j = tl.program_id(0)
    lh = tl.program_id(1) * BLOCK_LH + tl.arange(0, BLOCK_LH)
    layer = (lh // H).to(tl.int64)
    h = (lh % H).to(tl.int64)
    d = tl.arange(0, BLOCK_D)
    mask = (lh < LH)[:, None] & (d < D)[None, :]
    so = layer * s_l + tl.load(src_b + j).to(tl.int64) * s_b + h * s_h + tl.load(src_s + j).to(tl.int64) * s_s
    do = layer * d_l + tl.load(dst_b + j).to(tl.int64) * d_b + h * d_h + tl.load(dst_s + j).to(tl.int64) * d_s
    x = tl.load(src + so[:, None] + d[None, :], mask=mask)
    tl.store(dst + do[:, None] + d[None, :], x, mask=mask)


def copy_tokens_triton(src: torch.Tensor, src_b: torch.Tensor, src_s: torch.Tensor,
                       dst: torch.Tensor, dst_b: torch.Tensor, dst_s: torch.Tensor) -> None:
    """dst[:, dst_b[j], :, dst_s[j]] = src[:, src_b[j], :, src_s[j]] for every j (see copy_tokens)."""
    J = src_b.numel()
    if J == 0:
        return
    L, _, H, _, D = src.shape
    assert src.stride(-1) == 1 and dst.stride(-1) == 1 and dst.dtype == src.dtype
    block_lh = 16
    grid = (J, triton.cdiv(L * H, block_lh))
    _copy_tokens_kernel[grid](src, dst, src_b.contiguous(), src_s.contiguous(), dst_b.contiguous(),
                              dst_s.contiguous(), L * H, H, *src.stride()[:4], *dst.stride()[:4],
                              D=D, BLOCK_D=triton.next_power_of_2(D), BLOCK_LH=block_lh)
