"""Write one step's new K/V into the paged cache at their flat slots, K and V in one launch.

A slot is `block_id * block_size + offset`; a negative slot marks a padding row (CUDA-graph
buckets pad the batch) and is skipped. One program stores one token's K and V for all KV heads.

For an INT8 cache (QUANT) the program first rotates each head's K and V by the normalised Hadamard
matrix H (`quant/kv_int8.py`: the cache holds x H), then quantises what it stores: one scale per
KV head of the token, `quantize_heads` below, which computes exactly `quant/kv_int8.quantize_kv`
(the scale rounded to FP16 first, the values divided by that stored scale, ties rounded away from
zero), and writes the scales to the same slot of the scale tensor.

The rotation is one `tl.dot` per tensor against Sylvester's +-1 matrix, generated in registers
(`hadamard_signs`: entry (i, j) is (-1)^popcount(i & j)), so no matrix is passed or allocated and the
kernel stays as CUDA-graph safe as before. The +-1 entries are exact in FP16/BF16, the products are
summed in FP32 and scaled by 1/sqrt(head_dim) after; FP32 inputs (the CPU tests) use IEEE FP32
products rather than TF32. `tl.dot` needs at least 16 rows and columns: the head rows and head_dim
are padded with masked zeros (a zero row rotates to zero and stores nothing). The result is the
torch reference's `x.float() @ H` summed in another order: a value may differ in its last bit.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from worker.engine.quant import kv_int8

# Globals a kernel reads must be constexpr.
QMAX = tl.constexpr(float(kv_int8.KV_QMAX))
SCALE_MIN = tl.constexpr(kv_int8.KV_SCALE_MIN)
SCALE_MAX = tl.constexpr(kv_int8.KV_SCALE_MAX)


@triton.jit
def quantize_heads(x, amax):
    """x [heads, D] (float; padding lanes 0) with its per-head max |x| [heads] -> (int8 [heads, D], scale)."""
    scale = tl.maximum(tl.minimum(amax / QMAX, SCALE_MAX).to(tl.float16).to(tl.float32), SCALE_MIN)
    y = x.to(tl.float32) / scale[:, None]
    y = tl.where(y >= 0, tl.floor(y + 0.5), tl.ceil(y - 0.5))
    y = tl.minimum(tl.maximum(y, -QMAX), QMAX)
    return y.to(tl.int8), scale


@triton.jit
def hadamard_signs(BLOCK: tl.constexpr, n, dtype: tl.constexpr):
    """Sylvester's unnormalised n x n Hadamard matrix, (-1)^popcount(i & j), as a [BLOCK, BLOCK] tile
    of `dtype` whose rows and columns past n are 0 (n a power of two, at most BLOCK)."""
    i = tl.arange(0, BLOCK)[:, None]
    j = tl.arange(0, BLOCK)[None, :]
    bits = i & j
    # The parity of popcount(bits), folded by xor: four folds cover 16 bits (n <= 2^16).
    bits = bits ^ (bits >> 8)
    bits = bits ^ (bits >> 4)
    bits = bits ^ (bits >> 2)
    bits = bits ^ (bits >> 1)
    sign = 1.0 - 2.0 * (bits & 1).to(tl.float32)
    return tl.where((i < n) & (j < n), sign, 0.0).to(dtype)


@triton.jit
def hadamard_product(x, BLOCK: tl.constexpr, n, IEEE: tl.constexpr):
    """x [rows >= 16, BLOCK] (padding lanes 0) times the unnormalised n x n H -> FP32 [rows, BLOCK]."""
    h = hadamard_signs(BLOCK, n, x.dtype)
    return tl.dot(x, h, input_precision="ieee") if IEEE else tl.dot(x, h)


def rotation_launch_args(dtype: torch.dtype, head_dim: int) -> dict[str, object]:
    """The constexprs of the Hadamard rotation: IEEE products for FP32 inputs, H's 1/sqrt(head_dim)."""
    if head_dim & (head_dim - 1):
        raise ValueError(f"an INT8 KV cache needs a power-of-two head_dim; got {head_dim}")
    return {"IEEE": dtype == torch.float32, "NORM": 1.0 / math.sqrt(head_dim)}


@triton.jit
def _store_kv_kernel(
    key_ptr, value_ptr, k_cache_ptr, v_cache_ptr, k_scale_ptr, v_scale_ptr, slot_ptr,
    stride_kt, stride_kh, stride_vt, stride_vh, stride_slot, stride_sb, stride_ss, stride_sh, scale_block,
    cache_vb, cache_vs, cache_vh, cache_vd, cache_block, NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, QUANT: tl.constexpr,
    IEEE: tl.constexpr = False, NORM: tl.constexpr = 1.0,
):  # fmt: skip
    token = tl.program_id(0)
    slot = tl.load(slot_ptr + token).to(tl.int64)
    h = tl.arange(0, BLOCK_H)[:, None]
    d = tl.arange(0, BLOCK_D)[None, :]
    # A padding row stores nothing: its head count becomes 0 (a mask, not an early return).
    mask = (h < tl.where(slot >= 0, NUM_KV_HEADS, 0)) & (d < HEAD_DIM)
    dest = slot * stride_slot + h * HEAD_DIM + d
    v_dest = cache_offsets(slot, h, d, cache_vb, cache_vs, cache_vh, cache_vd, cache_block)
    if QUANT:
        # Masked lanes load 0, so they never raise a head's max.
        key = tl.load(key_ptr + token * stride_kt + h * stride_kh + d, mask=mask, other=0.0)
        value = tl.load(value_ptr + token * stride_vt + h * stride_vh + d, mask=mask, other=0.0)
        # x -> x H (BLOCK_H >= 16 rows and BLOCK_D >= 16 lanes, padded with zeros: see the module doc).
        key = hadamard_product(key, BLOCK_D, HEAD_DIM, IEEE) * NORM
        value = hadamard_product(value, BLOCK_D, HEAD_DIM, IEEE) * NORM
        k_q, k_s = quantize_heads(key, tl.max(tl.abs(key), 1))
        v_q, v_s = quantize_heads(value, tl.max(tl.abs(value), 1))
        tl.store(k_cache_ptr + dest, k_q, mask=mask)
        tl.store(v_cache_ptr + v_dest, v_q, mask=mask)
        heads = tl.arange(0, BLOCK_H)
        head_mask = heads < tl.where(slot >= 0, NUM_KV_HEADS, 0)
        scale_dest = cache_offsets(slot, heads, 0, stride_sb, stride_ss, stride_sh, 0, scale_block)
        tl.store(k_scale_ptr + scale_dest, k_s.to(k_scale_ptr.dtype.element_ty), mask=head_mask)
        tl.store(v_scale_ptr + scale_dest, v_s.to(v_scale_ptr.dtype.element_ty), mask=head_mask)
    else:
        key = tl.load(key_ptr + token * stride_kt + h * stride_kh + d, mask=mask)
        value = tl.load(value_ptr + token * stride_vt + h * stride_vh + d, mask=mask)
        tl.store(k_cache_ptr + dest, key.to(k_cache_ptr.dtype.element_ty), mask=mask)
        tl.store(v_cache_ptr + v_dest, value.to(v_cache_ptr.dtype.element_ty), mask=mask)


def check_scales(
    k_cache: torch.Tensor, k_scale: torch.Tensor | None, v_scale: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int, int, int], bool]:
    """(k_scale, v_scale, (stride over blocks, over slots, over heads, block size), QUANT) for a store
    kernel. The scales [blocks, block_size, KV] may have any strides (K and V the same); the cache
    stands in for absent scale pointers."""
    if k_scale is None or v_scale is None:
        if k_cache.dtype == torch.int8:
            raise ValueError("an INT8 KV cache needs its scales")
        return k_cache, k_cache, (0, 0, 0, 1), False
    if k_scale.stride() != v_scale.stride():
        raise ValueError("K and V scales must share one layout")
    stride_b, stride_s, stride_h = k_scale.stride()
    return k_scale, v_scale, (stride_b, stride_s, stride_h, k_scale.shape[1]), True


@triton.jit
def cache_offsets(slot, heads, dims, stride_b, stride_s, stride_h, stride_d, block_size):
    """Where element `dims` of KV heads `heads` of flat slot `slot` (block * block_size + offset) lives
    in a cache of these strides; the scales are one with no head_dim (`dims` 0, `stride_d` 0)."""
    block, offset = slot // block_size, slot % block_size
    return block * stride_b + offset * stride_s + heads * stride_h + dims * stride_d


def v_layout(k_cache: torch.Tensor, v_cache: torch.Tensor) -> tuple[int, int, int, int, int]:
    """V's strides over blocks, slots, KV heads and head_dim, and the block size, for the kernels.

    K is contiguous; V may be laid out otherwise (an INT8 cache stores each block's V transposed,
    `KVCache`), but holds its blocks where K's are, with the same shape."""
    same_blocks = v_cache.shape == k_cache.shape and v_cache.stride(0) == k_cache.stride(0)
    if not (same_blocks and k_cache.is_contiguous()):
        raise ValueError(f"K {k_cache.stride()} and V {v_cache.stride()} caches do not share a block layout")
    stride_b, stride_s, stride_h, stride_d = v_cache.stride()
    return stride_b, stride_s, stride_h, stride_d, v_cache.shape[1]


def store_kv(
    key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
    slot_mapping: torch.Tensor, k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None,
) -> None:  # fmt: skip
    """key/value [T, KV, D] (any strides) -> k/v_cache [blocks, block_size, KV, D] at slots [T].

    An INT8 cache takes its scales `k_scale`/`v_scale` [blocks, block_size, KV] too, and gets K and V
    rotated by H and quantised (`KVCache.write` is the reference).
    """
    num_tokens, num_kv_heads, head_dim = key.shape
    if num_tokens == 0:
        return
    k_s, v_s, scale_layout, quant = check_scales(k_cache, k_scale, v_scale)
    key = key if key.stride(2) == 1 else key.contiguous()
    value = value if value.stride(2) == 1 else value.contiguous()
    block_h, block_d = triton.next_power_of_2(num_kv_heads), triton.next_power_of_2(head_dim)
    rotation: dict[str, object] = {}
    if quant:  # tl.dot's smallest tile is 16 x 16
        block_h, block_d = max(block_h, 16), max(block_d, 16)
        rotation = rotation_launch_args(key.dtype, head_dim)
    _store_kv_kernel[(num_tokens,)](
        key, value, k_cache, v_cache, k_s, v_s, slot_mapping,
        key.stride(0), key.stride(1), value.stride(0), value.stride(1), num_kv_heads * head_dim,
        *scale_layout, *v_layout(k_cache, v_cache),
        NUM_KV_HEADS=num_kv_heads, HEAD_DIM=head_dim, BLOCK_H=block_h, BLOCK_D=block_d, QUANT=quant,
        **rotation,
    )  # fmt: skip
