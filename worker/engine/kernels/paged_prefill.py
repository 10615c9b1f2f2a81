"""Paged prefill attention: chunks of query tokens, causal over their sequence's cached context.

Varlen over the flat batch: sequence i's queries are rows [query_start[i], query_start[i + 1])
and are the last tokens of its context (`context_lens[i]`, K/V already stored), so one kernel
serves a first prefill, a later chunk of a chunked prefill and a prompt whose prefix came from
the prefix cache. One program computes BLOCK_M query rows of one head with an online softmax
over K/V tiles read through the block table (FlashAttention-2's loop, paged). Programs whose
tile starts past their sequence's queries exit at once. An INT8 cache is read with its scales
(`k_scale`/`v_scale`, see `paged_softmax.py`).
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


# Neither the block-table width nor the index of the first prefill sequence may select a new compiled
# variant: both change from step to step (Triton specialises integers on == 1 and divisibility by 16).
@triton.jit(do_not_specialize=["stride_bt", "first_seq"])
def _paged_prefill_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, k_scale_ptr, v_scale_ptr, block_tables_ptr, query_start_ptr,
    context_lens_ptr, out_ptr, first_seq, qk_scale, stride_qt, stride_qh, stride_kb, stride_ks, stride_vs,
    stride_vh, stride_vd, stride_sb,
    stride_sh, stride_bt, stride_ot, stride_oh,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
    QUANT: tl.constexpr, FAST_CVT: tl.constexpr, UNROTATE: tl.constexpr, NORM: tl.constexpr,
    V_T: tl.constexpr,
):  # fmt: skip
    tile = tl.program_id(0)
    seq = tl.program_id(1)
    head = tl.program_id(2)
    q_start = tl.load(query_start_ptr + seq)
    q_len = tl.load(query_start_ptr + seq + 1) - q_start
    if tile * BLOCK_M >= q_len:
        return
    context_len = tl.load(context_lens_ptr + first_seq + seq)
    kv_head = head // GROUP

    r = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    d = tl.arange(0, BLOCK_D)
    q_pos = context_len - q_len + r  # position of each query row in its sequence
    q_mask = (r < q_len)[:, None] & (d < HEAD_DIM)[None, :]
    q = tl.load(
        q_ptr + (q_start + r)[:, None] * stride_qt + head * stride_qh + d[None, :], mask=q_mask, other=0.0
    )

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    table = block_tables_ptr + (first_seq + seq).to(tl.int64) * stride_bt
    # Keys past the tile's last query position are masked for every row: stop there.
    hi = tl.minimum(context_len, context_len - q_len + (tile + 1) * BLOCK_M)
    m_i, l_i, acc = attend_paged(
        q, m_i, l_i, acc, k_cache_ptr, v_cache_ptr, k_scale_ptr, v_scale_ptr, table, kv_head, 0, hi, q_pos,
        qk_scale, stride_kb, stride_ks, stride_vs, stride_vh, stride_vd, stride_sb, stride_sh, CAUSAL=True,
        QUANT=QUANT, HEAD_DIM=HEAD_DIM,
        BLOCK_SIZE=BLOCK_SIZE, BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D, DOT_PRECISION=DOT_PRECISION,
        FAST_CVT=FAST_CVT, V_T=V_T,
    )  # fmt: skip

    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    if UNROTATE:  # an INT8 cache: back from the stored basis
        out = unrotate(out, out_ptr.dtype.element_ty, HEAD_DIM, BLOCK_D, NORM, DOT_PRECISION)
    o = out_ptr + (q_start + r)[:, None] * stride_ot + head * stride_oh + d[None, :]
    tl.store(o, out.to(out_ptr.dtype.element_ty), mask=q_mask)


def paged_prefill_attention(
    query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
    query_start_loc: torch.Tensor, context_lens: torch.Tensor, max_query_len: int, scale: float,
    out: torch.Tensor | None = None, block_m: int = 64, block_n: int = 64, first_seq: int = 0,
    k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None, unrotate: bool = False,
) -> torch.Tensor:  # fmt: skip
    """query [T, H, D] of S sequences (offsets `query_start_loc` [S + 1]) over the paged cache: [T, H, D].

    `block_tables` and `context_lens` may hold other sequences first (the step's decodes): the
    prefill sequences are their rows from `first_seq` on. They are passed whole rather than sliced,
    because a slice at an odd row would change the pointer alignment the kernel was compiled for
    and compile another variant in the middle of serving. An INT8 cache needs its scales
    `k_scale`/`v_scale` [blocks, block_size, KV]; `unrotate`: see `paged_decode_attention`.
    """
    if query.stride(-1) != 1:
        query = query.contiguous()
    num_tokens, num_heads, head_dim = query.shape
    num_kv_heads = k_cache.shape[2]
    if out is None:
        out = torch.empty_like(query)
    num_seqs = context_lens.shape[0] - first_seq
    if num_seqs <= 0 or num_tokens == 0:
        return out
    k_s, v_s, stride_sb, stride_sh, quant = scale_args(k_cache, k_scale, v_scale)
    v_strides = v_layout(k_cache, v_cache)
    grid = (triton.cdiv(max_query_len, block_m), num_seqs, num_heads)
    _paged_prefill_kernel[grid](
        query, k_cache, v_cache, k_s, v_s, block_tables, query_start_loc, context_lens, out,
        first_seq, scale * LOG2E, query.stride(0), query.stride(1), k_cache.stride(0), k_cache.stride(1),
        *v_strides[1:4],
        stride_sb, stride_sh, block_tables.stride(0), out.stride(0), out.stride(1),
        GROUP=num_heads // num_kv_heads, HEAD_DIM=head_dim, BLOCK_SIZE=k_cache.shape[1],
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=max(16, triton.next_power_of_2(head_dim)),
        DOT_PRECISION=dot_precision(query.dtype), QUANT=quant, FAST_CVT=fast_convert(query, quant),
        V_T=v_transposed(quant, v_strides, block_n),
        **unrotate_args(head_dim, quant and unrotate), num_warps=4, num_stages=2,
    )  # fmt: skip
    return out
