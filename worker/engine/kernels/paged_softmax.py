"""The loop both attention kernels share: an online softmax over K/V read through a block table.

FlashAttention-2's inner loop, paged: for query rows `q` of one KV head, walk key positions
[lo, hi) of one sequence in tiles of BLOCK_N, gather each tile's K and V from the blocks its
block table names (no copy of the context), and fold them into the running max `m_i`, sum
`l_i` and output `acc`, in the log2 domain. Decode and prefill differ only in which keys a row
may see (CAUSAL adds key position <= the row's position), so this is written once, here.

An INT8 cache (QUANT, `LLM_KV_DTYPE=int8`) is dequantised here, in registers: the INT8 tile is
converted to the queries' dtype (-127..127 is exact in FP16 and BF16), and each key's scale
multiplies its column of the scores, each value's scale its column of the probabilities, before
the product. That is `q . (k_q * s_k)` and `sum_t p_t * s_v[t] * v_q[t]` with the scales applied
to the [rows, BLOCK_N] tiles instead of the [BLOCK_N, D] ones, and no dequantised copy of K or V
ever exists in memory. With QUANT off the scale pointers are never read and the compiled loop is
the float one, unchanged.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634


def dot_precision(dtype: torch.dtype) -> str | None:
    """FP32 queries get IEEE dot products (exact like the reference); FP16/BF16 use the tensor cores anyway.

    Pass the queries' dtype: the K/V tiles are converted to it (an INT8 or a narrower float cache).
    """
    return "ieee" if dtype == torch.float32 else None


def scale_args(
    k_cache: torch.Tensor, k_scale: torch.Tensor | None, v_scale: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, int, int, bool]:
    """(k_scale, v_scale, stride over blocks, stride over slots, QUANT) for a kernel launch.

    Without scales (a float cache) the cache tensor stands in for the pointers, which the kernel
    compiled with QUANT=False never reads.
    """
    if k_scale is None or v_scale is None:
        if k_cache.dtype == torch.int8:
            raise ValueError("an INT8 KV cache needs its scales")
        return k_cache, k_cache, 0, 0, False
    if k_scale.stride() != v_scale.stride() or k_scale.stride(2) != 1:
        raise ValueError("K and V scales must share one layout, contiguous over the KV heads")
    return k_scale, v_scale, k_scale.stride(0), k_scale.stride(1), True


@triton.jit
def attend_paged(
    q, m_i, l_i, acc, k_cache_ptr, v_cache_ptr, k_scale_ptr, v_scale_ptr, table, kv_head, lo, hi, q_pos,
    qk_scale, stride_kb, stride_ks, stride_sb, stride_ss, CAUSAL: tl.constexpr, QUANT: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr, LOADS_FIRST: tl.constexpr = False,
):  # fmt: skip
    """Fold keys [lo, hi) into (m_i, l_i, acc); `qk_scale` includes log2(e). Returns the new three.

    LOADS_FIRST issues a tile's V (and the INT8 scales) with its K, before the first tl.dot, so the
    tile waits for memory once instead of once per load (each tl.dot's shared-memory barrier keeps
    a later load from being hoisted above it). Off in the engine until measured faster; the
    attention benchmark times both (`loadtest/attention_kernel_bench.py`).
    """
    d = tl.arange(0, BLOCK_D)
    for start in range(lo, hi, BLOCK_N):
        t = start + tl.arange(0, BLOCK_N)
        t_mask = t < hi
        block = tl.load(table + t // BLOCK_SIZE, mask=t_mask, other=0).to(tl.int64)
        offs = (block * stride_kb + (t % BLOCK_SIZE) * stride_ks + kv_head * HEAD_DIM)[:, None] + d[None, :]
        kv_mask = t_mask[:, None] & (d < HEAD_DIM)[None, :]
        scale_offs = block * stride_sb + (t % BLOCK_SIZE) * stride_ss + kv_head
        k = tl.load(k_cache_ptr + offs, mask=kv_mask, other=0.0)
        if LOADS_FIRST:
            v = tl.load(v_cache_ptr + offs, mask=kv_mask, other=0.0)
            if QUANT:
                k_s = tl.load(k_scale_ptr + scale_offs, mask=t_mask, other=0.0).to(tl.float32)
                v_s = tl.load(v_scale_ptr + scale_offs, mask=t_mask, other=0.0).to(tl.float32)
        s = tl.dot(q, tl.trans(k.to(q.dtype)), input_precision=DOT_PRECISION)
        if QUANT:
            if not LOADS_FIRST:
                k_s = tl.load(k_scale_ptr + scale_offs, mask=t_mask, other=0.0).to(tl.float32)
            s = s * (k_s * qk_scale)[None, :]
        else:
            s = s * qk_scale
        s = tl.where(t_mask[None, :], s, float("-inf"))
        if CAUSAL:
            s = tl.where(t[None, :] <= q_pos[:, None], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if not LOADS_FIRST:
            v = tl.load(v_cache_ptr + offs, mask=kv_mask, other=0.0)
        if QUANT:
            if not LOADS_FIRST:
                v_s = tl.load(v_scale_ptr + scale_offs, mask=t_mask, other=0.0).to(tl.float32)
            pv = p * v_s[None, :]
        else:
            pv = p
        acc = acc * alpha[:, None] + tl.dot(pv.to(q.dtype), v.to(q.dtype), input_precision=DOT_PRECISION)
        m_i = m_new
    return m_i, l_i, acc
