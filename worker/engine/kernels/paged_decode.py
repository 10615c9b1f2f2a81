"""Paged decode attention: one query token per sequence, K/V read in place through the block table.

One program serves one (sequence, KV head, context split): the GROUP query heads that share the
KV head are the rows of one tile, so each K/V element is loaded once per step, not once per query
head (GQA-aware, as vLLM's and LightLLM's decode kernels). A long context can be split over
NUM_SPLITS programs (flash-decoding) whose partial results a second kernel merges by their
log-sum-exp; the split size is derived inside the kernel from each sequence's length, so the grid
depends only on the batch size and a CUDA graph captured for one bucket serves every context
length. A sequence of length 0 (a padding row of a bucket) writes zeros. An INT8 cache is read
with its scales (`k_scale`/`v_scale`, see `paged_softmax.py`); the grid and the CUDA-graph
buffers are the same.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from worker.engine.kernels.kv_store import v_layout
from worker.engine.kernels.paged_softmax import (
    LOG2E,
    attend_paged,
    dot_precision,
    fast_convert,
    scale_args,
    unrotate,
    unrotate_args,
    v_transposed,
)


@triton.jit(do_not_specialize=["stride_bt"])  # the block-table width changes every eager step
def _paged_decode_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, k_scale_ptr, v_scale_ptr, block_tables_ptr, context_lens_ptr, out_ptr,
    part_out_ptr, part_lse_ptr, qk_scale, stride_qt, stride_qh, stride_kb, stride_ks, stride_vs, stride_vh,
    stride_vd, stride_sb, stride_sh,
    stride_bt, stride_ot, stride_oh,
    NUM_SPLITS: tl.constexpr, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
    QUANT: tl.constexpr, FAST_CVT: tl.constexpr, UNROTATE: tl.constexpr, NORM: tl.constexpr,
    V_T: tl.constexpr,
):  # fmt: skip
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    context_len = tl.load(context_lens_ptr + seq)
    tiles_per_split = tl.cdiv(tl.cdiv(context_len, BLOCK_N), NUM_SPLITS)
    lo = split * tiles_per_split * BLOCK_N
    hi = tl.minimum(lo + tiles_per_split * BLOCK_N, context_len)

    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, BLOCK_D)
    heads = kv_head * GROUP + g
    row_mask = (g < GROUP)[:, None] & (d < HEAD_DIM)[None, :]
    q = tl.load(q_ptr + seq * stride_qt + heads[:, None] * stride_qh + d[None, :], mask=row_mask, other=0.0)

    m_i = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)
    table = block_tables_ptr + seq * stride_bt
    m_i, l_i, acc = attend_paged(
        q, m_i, l_i, acc, k_cache_ptr, v_cache_ptr, k_scale_ptr, v_scale_ptr, table, kv_head, lo, hi, hi,
        qk_scale, stride_kb, stride_ks, stride_vs, stride_vh, stride_vd, stride_sb, stride_sh, CAUSAL=False,
        QUANT=QUANT, HEAD_DIM=HEAD_DIM,
        BLOCK_SIZE=BLOCK_SIZE, BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D, DOT_PRECISION=DOT_PRECISION,
        FAST_CVT=FAST_CVT, V_T=V_T,
    )  # fmt: skip

    safe_l = tl.where(l_i > 0, l_i, 1.0)
    out = acc / safe_l[:, None]
    if UNROTATE:  # an INT8 cache: back from the stored basis (a split's part too: the merge is linear)
        out = unrotate(out, out_ptr.dtype.element_ty, HEAD_DIM, BLOCK_D, NORM, DOT_PRECISION)
    if NUM_SPLITS == 1:
        o = out_ptr + seq * stride_ot + heads[:, None] * stride_oh + d[None, :]
        tl.store(o, out.to(out_ptr.dtype.element_ty), mask=row_mask)
    else:
        # Partials laid out [seq, head, split, D] and [seq, head, split], float32.
        num_heads = tl.num_programs(1) * GROUP
        row = (seq * num_heads + heads) * NUM_SPLITS + split
        tl.store(part_out_ptr + row[:, None] * HEAD_DIM + d[None, :], out, mask=row_mask)
        lse = tl.where(l_i > 0, m_i + tl.log2(safe_l), float("-inf"))
        tl.store(part_lse_ptr + row, lse, mask=g < GROUP)


@triton.jit
def _merge_splits_kernel(
    part_out_ptr, part_lse_ptr, out_ptr, stride_ot, stride_oh,
    NUM_SPLITS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    seq = tl.program_id(0)
    head = tl.program_id(1)
    s = tl.arange(0, BLOCK_S)
    d = tl.arange(0, BLOCK_D)
    row = (seq * tl.num_programs(1) + head) * NUM_SPLITS
    lse = tl.load(part_lse_ptr + row + s, mask=s < NUM_SPLITS, other=float("-inf"))
    m = tl.max(lse, 0)
    m = tl.where(m > float("-inf"), m, 0.0)  # every split empty (a padding row): weights all 0
    weight = tl.where(lse > float("-inf"), tl.exp2(lse - m), 0.0)
    mask = (s < NUM_SPLITS)[:, None] & (d < HEAD_DIM)[None, :]
    part = tl.load(part_out_ptr + (row + s)[:, None] * HEAD_DIM + d[None, :], mask=mask, other=0.0)
    total = tl.sum(weight, 0)
    merged = tl.sum(part * weight[:, None], 0) / tl.where(total > 0, total, 1.0)
    tl.store(
        out_ptr + seq * stride_ot + head * stride_oh + d,
        merged.to(out_ptr.dtype.element_ty),
        mask=d < HEAD_DIM,
    )


# (BLOCK_N, warps, stages) by cache format: the fastest over the four decode shapes (B = 64 and 256,
# 1k and 8k context) in a sweep on an H200 (a removed study; docs/benchmarks.md, "INT8 KV cache").
LAUNCH_FLOAT = (64, 4, 2)
LAUNCH_INT8 = (128, 2, 3)


def paged_decode_attention(
    query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
    context_lens: torch.Tensor, scale: float, num_splits: int = 1, out: torch.Tensor | None = None,
    block_n: int | None = None, k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None,
    num_warps: int | None = None, num_stages: int | None = None, permute_convert: bool | None = None,
    unrotate: bool = False,
) -> torch.Tensor:  # fmt: skip
    """query [S, H, D] (unit stride in D) over k/v_cache [blocks, block_size, KV, D] -> [S, H, D].

    An INT8 cache needs its scales `k_scale`/`v_scale` [blocks, block_size, KV] (head-major,
    `paged_softmax.scale_args`). `block_n` (keys per tile), `num_warps`, `num_stages`: by default
    `LAUNCH_FLOAT` or `LAUNCH_INT8`. `permute_convert`: see `paged_softmax.fast_convert` (None: where it
    can run; the attention benchmark times both). `unrotate` (INT8 only): return the output in the
    model's basis, times H^T (`paged_softmax.unrotate`), rather than in the cache's.
    """
    if query.stride(-1) != 1:
        query = query.contiguous()
    num_seqs, num_heads, head_dim = query.shape
    _, block_size, num_kv_heads, cache_dim = k_cache.shape
    if cache_dim != head_dim or num_heads % num_kv_heads:
        raise ValueError(f"query {tuple(query.shape)} does not fit cache {tuple(k_cache.shape)}")
    if out is None:
        out = torch.empty(num_seqs, num_heads, head_dim, dtype=query.dtype, device=query.device)
    if num_seqs == 0:
        return out
    group = num_heads // num_kv_heads
    k_s, v_s, stride_sb, stride_sh, quant = scale_args(k_cache, k_scale, v_scale)
    default = LAUNCH_INT8 if quant else LAUNCH_FLOAT
    block_n, num_warps, num_stages = block_n or default[0], num_warps or default[1], num_stages or default[2]
    v_strides = v_layout(k_cache, v_cache)
    block_d = triton.next_power_of_2(head_dim)
    if num_splits > 1:
        part_out = torch.empty(
            num_seqs, num_heads, num_splits, head_dim, dtype=torch.float32, device=query.device
        )
        part_lse = torch.empty(num_seqs, num_heads, num_splits, dtype=torch.float32, device=query.device)
    else:
        part_out = part_lse = out  # unused
    _paged_decode_kernel[(num_seqs, num_kv_heads, num_splits)](
        query, k_cache, v_cache, k_s, v_s, block_tables, context_lens, out, part_out, part_lse,
        scale * LOG2E, query.stride(0), query.stride(1), k_cache.stride(0), k_cache.stride(1),
        *v_strides[1:4],
        stride_sb, stride_sh, block_tables.stride(0), out.stride(0), out.stride(1),
        NUM_SPLITS=num_splits, GROUP=group, HEAD_DIM=head_dim, BLOCK_SIZE=block_size,
        BLOCK_G=max(16, triton.next_power_of_2(group)), BLOCK_D=max(16, block_d), BLOCK_N=block_n,
        DOT_PRECISION=dot_precision(query.dtype), QUANT=quant,
        FAST_CVT=fast_convert(query, quant, permute_convert), V_T=v_transposed(quant, v_strides, block_n),
        **unrotate_args(head_dim, quant and unrotate),
        num_warps=num_warps, num_stages=num_stages,
    )  # fmt: skip
    if num_splits > 1:
        _merge_splits_kernel[(num_seqs, num_heads)](
            part_out, part_lse, out, out.stride(0), out.stride(1),
            NUM_SPLITS=num_splits, HEAD_DIM=head_dim, BLOCK_S=triton.next_power_of_2(num_splits),
            BLOCK_D=block_d,
        )  # fmt: skip
    return out
