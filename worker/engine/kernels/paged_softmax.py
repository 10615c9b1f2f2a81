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

What makes the INT8 loop faster than the FP16 one (it reads half the bytes; docs/benchmarks.md):
every load of a tile is copied asynchronously by Triton's software pipeline, the scales two per
32-bit word (`load_scale_pairs`) and V as whole transposed blocks (`v_tile_transposed`); on CUDA the
tiles are converted by byte permutes (`int8_convert.py`); and the output goes back from the cache's
rotated basis in the kernels' epilogue (`unrotate`). `tests/engine/hopper_compile.py decode` checks
the asynchronous copies in the sm_90 compile without a GPU.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from worker.engine.kernels.int8_convert import int8_to_f16
from worker.engine.kernels.kv_store import hadamard_signs

LOG2E = 1.4426950408889634


def dot_precision(dtype: torch.dtype) -> str | None:
    """FP32 queries get IEEE dot products (exact like the reference); FP16/BF16 use the tensor cores anyway.

    Pass the queries' dtype: the K/V tiles are converted to it (an INT8 or a narrower float cache).
    """
    return "ieee" if dtype == torch.float32 else None


def fast_convert(query: torch.Tensor, quant: bool, override: bool | None = None) -> bool:
    """Whether INT8 K/V tiles take the byte-permute conversion (`int8_convert.py`): FP16 queries on CUDA.

    `override` (the attention benchmark's) forces it off, or on where it can run."""
    possible = quant and query.is_cuda and query.dtype == torch.float16
    return possible if override is None else possible and override


def v_transposed(quant: bool, v_strides: tuple[int, int, int, int, int], block_n: int) -> bool:
    """Whether the loop reads V as whole transposed blocks (`v_tile_transposed`): an INT8 cache stored
    that way (unit stride over the slots) and tiles of whole blocks."""
    _, stride_s, _, _, block_size = v_strides
    return quant and stride_s == 1 and block_n % block_size == 0


def scale_args(
    k_cache: torch.Tensor, k_scale: torch.Tensor | None, v_scale: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, int, int, bool]:
    """(k_scale, v_scale, stride over blocks, stride over KV heads, QUANT) for a kernel launch.

    The scales [blocks, block_size, KV] must be laid out head-major, as `KVCache` allocates them (one
    head's scales of a block contiguous, `load_scale_pairs`): FP16 or BF16, unit stride over the
    slots, even strides and block size, a 4-byte-aligned start. Without scales (a float cache) the
    cache tensor stands in for the pointers, which the kernel compiled with QUANT=False never reads.
    """
    if k_scale is None or v_scale is None:
        if k_cache.dtype == torch.int8:
            raise ValueError("an INT8 KV cache needs its scales")
        return k_cache, k_cache, 0, 0, False
    if k_scale.stride() != v_scale.stride():
        raise ValueError("K and V scales must share one layout")
    stride_b, stride_s, stride_h = k_scale.stride()
    aligned = all(x.data_ptr() % 4 == 0 for x in (k_scale, v_scale))
    if k_scale.element_size() != 2 or stride_s != 1 or stride_b % 2 or stride_h % 2 or k_scale.shape[1] % 2:
        raise ValueError(f"KV scales must be 16-bit and head-major with even strides, got {k_scale.stride()}")
    if not aligned:
        raise ValueError("KV scales must start 4-byte aligned")
    return k_scale, v_scale, stride_b, stride_h, True


@triton.jit
def load_scale_pairs(
    scale_ptr, table, kv_head, start, hi, stride_sb, stride_sh, BLOCK_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr,
):  # fmt: skip
    """The scales of key positions [start, start + BLOCK_N) of one KV head, as FP32 [BLOCK_N].

    Read as 32-bit words, each two neighbouring positions' 16-bit scales (head-major layout: a
    head's scales of one block are contiguous, the block size is even). Triton's software pipeline
    copies a load asynchronously with the K/V tiles only if a thread's part of it is at least
    4 bytes (cp.async's smallest copy); one 16-bit scale per thread stays a synchronous load in the
    loop, a full memory round trip per tile, which held the INT8 kernel at 23-40% of the HBM
    bandwidth. Positions past `hi` read 0 (their scores are masked to -inf anyway).
    """
    t = start + 2 * tl.arange(0, BLOCK_N // 2)  # the first position of each pair
    valid = t < hi
    block = tl.load(table + t // BLOCK_SIZE, mask=valid, other=0).to(tl.int64)
    offs = (block * stride_sb + kv_head * stride_sh + t % BLOCK_SIZE) // 2
    words = tl.load(scale_ptr.to(tl.pointer_type(tl.int32)) + offs, mask=valid, other=0)
    dtype: tl.constexpr = scale_ptr.dtype.element_ty
    first = (words & 0xFFFF).to(tl.int16).to(dtype, bitcast=True)
    second = ((words >> 16) & 0xFFFF).to(tl.int16).to(dtype, bitcast=True)
    return tl.join(first, second).reshape(BLOCK_N).to(tl.float32)  # (pair, 2) -> position order


def unrotate_args(head_dim: int, quant: bool) -> dict[str, object]:
    """The constexprs of `unrotate` for a kernel launch: on for an INT8 cache (stored as x H)."""
    return {"UNROTATE": quant, "NORM": head_dim**-0.5 if quant else 1.0}


@triton.jit
def unrotate(o, dtype: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, NORM: tl.constexpr,
             DOT_PRECISION: tl.constexpr):  # fmt: skip
    """Attention output o [rows >= 16, BLOCK_D] over an INT8 cache back to the model's basis: o H^T.

    The cache holds V H, so the loop's output is (P V) H; Sylvester's normalised H is symmetric and
    orthogonal, so H^T = H: one more tl.dot in the epilogue, against the +-1 matrix generated in
    registers (`kv_store.hadamard_signs`), instead of three launches (cast, FP32 matmul, cast) after
    the kernel. `o` is rounded to `dtype` first, as the torch path rounds the attention output before
    `KVCache.unrotate_output`; the +-1 products are exact and summed in FP32.
    """
    h = hadamard_signs(BLOCK_D, HEAD_DIM, dtype)
    return tl.dot(o.to(dtype), h, input_precision=DOT_PRECISION) * NORM


@triton.jit
def v_tile_transposed(
    v_cache_ptr, table, kv_head, start, hi, stride_kb, stride_vh, stride_vd, HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """The V tile [BLOCK_N, BLOCK_D] of positions [start, start + BLOCK_N), from a cache whose blocks
    hold V transposed ([KV, head_dim, block_size] in memory, the INT8 layout of `KVCache`).

    Read whole blocks, [blocks, BLOCK_D, BLOCK_SIZE] with the block_size positions of one (block, d)
    contiguous, so the copy is vectorised and asynchronous; then permuted to position order. The
    product p V reduces over positions: with V stored position-major (the float layout) an INT8 tile
    reached the tensor cores only byte by byte (FP16 has a transposing shared-memory load, INT8 has
    none), which held the INT8 kernel back. Blocks past `hi` read block 0 (finite INT8 values under
    probabilities of 0).
    """
    nb = tl.arange(0, BLOCK_N // BLOCK_SIZE)
    sl = tl.arange(0, BLOCK_SIZE)
    d = tl.arange(0, BLOCK_D)
    in_range = start + nb * BLOCK_SIZE < hi
    blocks = tl.load(table + start // BLOCK_SIZE + nb, mask=in_range, other=0).to(tl.int64)
    offs = (blocks * stride_kb + kv_head * stride_vh)[:, None, None] + (d * stride_vd)[None, :, None]
    v = tl.load(v_cache_ptr + offs + sl[None, None, :], mask=(d < HEAD_DIM)[None, :, None], other=0)
    return tl.permute(v, (0, 2, 1)).reshape(BLOCK_N, BLOCK_D)


@triton.jit
def attend_paged(
    q, m_i, l_i, acc, k_cache_ptr, v_cache_ptr, k_scale_ptr, v_scale_ptr, table, kv_head, lo, hi, q_pos,
    qk_scale, stride_kb, stride_ks, stride_vs, stride_vh, stride_vd, stride_sb, stride_sh,
    CAUSAL: tl.constexpr, QUANT: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr, FAST_CVT: tl.constexpr,
    V_T: tl.constexpr,
):  # fmt: skip
    """Fold keys [lo, hi) into (m_i, l_i, acc); `qk_scale` includes log2(e). Returns the new three.

    K is contiguous; V has strides `stride_v*` over slots, heads and head_dim (its blocks where K's
    are). FAST_CVT (INT8 cache, FP16 queries, CUDA): the tiles are converted by byte permutes. V_T
    (INT8 cache, `lo` and BLOCK_N multiples of BLOCK_SIZE): V is stored transposed per block (unit
    stride over the slots, `v_tile_transposed`)."""
    d = tl.arange(0, BLOCK_D)
    for start in range(lo, hi, BLOCK_N):
        t = start + tl.arange(0, BLOCK_N)
        t_mask = t < hi
        block = tl.load(table + t // BLOCK_SIZE, mask=t_mask, other=0).to(tl.int64)
        slot = t % BLOCK_SIZE
        offs = (block * stride_kb + slot * stride_ks + kv_head * HEAD_DIM)[:, None] + d[None, :]
        kv_mask = t_mask[:, None] & (d < HEAD_DIM)[None, :]
        k = tl.load(k_cache_ptr + offs, mask=kv_mask, other=0.0)
        if FAST_CVT:
            k = int8_to_f16(k, FAST_CVT)
        s = tl.dot(q, tl.trans(k.to(q.dtype)), input_precision=DOT_PRECISION)
        if QUANT:
            k_s = load_scale_pairs(
                k_scale_ptr, table, kv_head, start, hi, stride_sb, stride_sh, BLOCK_SIZE, BLOCK_N
            )
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
        if V_T:
            v = v_tile_transposed(v_cache_ptr, table, kv_head, start, hi, stride_kb, stride_vh, stride_vd,
                                  HEAD_DIM, BLOCK_SIZE, BLOCK_N, BLOCK_D)  # fmt: skip
        else:
            v_offs = block * stride_kb + slot * stride_vs + kv_head * stride_vh
            v_offs = v_offs[:, None] + d[None, :] * stride_vd
            # INT8 values are finite, so slots past `hi` (their probabilities 0) need no mask.
            v = tl.load(v_cache_ptr + v_offs, mask=(d < HEAD_DIM)[None, :] if QUANT else kv_mask, other=0.0)
        if FAST_CVT:
            v = int8_to_f16(v, FAST_CVT)
        if QUANT:
            v_s = load_scale_pairs(
                v_scale_ptr, table, kv_head, start, hi, stride_sb, stride_sh, BLOCK_SIZE, BLOCK_N
            )
            pv = p * v_s[None, :]
        else:
            pv = p
        acc = acc * alpha[:, None] + tl.dot(pv.to(q.dtype), v.to(q.dtype), input_precision=DOT_PRECISION)
        m_i = m_new
    return m_i, l_i, acc
