"""The loop both attention kernels share: an online softmax over K/V read through a block table.

FlashAttention-2's inner loop, paged: for query rows `q` of one KV head, walk key positions
[lo, hi) of one sequence in tiles of BLOCK_N, gather each tile's K and V from the blocks its
block table names (no copy of the context), and fold them into the running max `m_i`, sum
`l_i` and output `acc`, in the log2 domain. Decode and prefill differ only in which keys a row
may see (CAUSAL adds key position <= the row's position), so this is written once, here.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634


def dot_precision(dtype: torch.dtype) -> str | None:
    """FP32 caches get IEEE dot products (exact like the reference); FP16/BF16 use the tensor cores anyway."""
    return "ieee" if dtype == torch.float32 else None


@triton.jit
def attend_paged(
    q, m_i, l_i, acc, k_cache_ptr, v_cache_ptr, table, kv_head, lo, hi, q_pos, qk_scale,
    stride_kb, stride_ks, CAUSAL: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """Fold keys [lo, hi) into (m_i, l_i, acc); `qk_scale` includes log2(e). Returns the new three."""
    d = tl.arange(0, BLOCK_D)
    for start in range(lo, hi, BLOCK_N):
        t = start + tl.arange(0, BLOCK_N)
        t_mask = t < hi
        block = tl.load(table + t // BLOCK_SIZE, mask=t_mask, other=0).to(tl.int64)
        offs = (block * stride_kb + (t % BLOCK_SIZE) * stride_ks + kv_head * HEAD_DIM)[:, None] + d[None, :]
        kv_mask = t_mask[:, None] & (d < HEAD_DIM)[None, :]
        k = tl.load(k_cache_ptr + offs, mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        s = tl.where(t_mask[None, :], s, float("-inf"))
        if CAUSAL:
            s = tl.where(t[None, :] <= q_pos[:, None], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_cache_ptr + offs, mask=kv_mask, other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new
    return m_i, l_i, acc
