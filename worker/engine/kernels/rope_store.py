"""Rotary embedding of a fused QKV projection, with the new K/V written into the paged cache.

One program per token: it rotates the token's query heads (written out for attention) and key
heads, and stores the rotated keys and the values at the token's cache slot (negative slot:
a padding row, nothing stored). This replaces transformers' rotate-half arithmetic (about ten
launches per layer) and the separate KV store. `cos`/`sin` are the model's own rotary tables for
the step's positions ([T, D], both halves), so any RoPE scaling the model configures applies.
Rounded as transformers rounds it: cos/sin in the model dtype, each product and the sum rounded.
An INT8 cache (QUANT) holds K and V rotated by the normalised Hadamard matrix H (`quant/kv_int8.py`):
the program multiplies the keys (after RoPE, since H mixes RoPE's two halves) and the values by H,
quantises them per KV head on the way with `kv_store.quantize_heads` (the same rounding as the torch
reference), and stores their scales; the queries it returns are rotated by H as well, so attention
over the cache computes (q H).(k H) = q.k, and the attention kernels multiply their output by H^T
in their epilogue (`paged_softmax.unrotate`). H of size D is [[H', H'], [H', -H']] with H' of size
D/2, so on the two halves the kernel works on, [x1, x2] H = [(x1 + x2) H', (x1 - x2) H']: two
`tl.dot`s per tensor against H' generated in registers (`kv_store.hadamard_product`, +-1 entries;
rows and half-width padded to 16 with masked zeros).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from worker.engine.kernels.kv_store import (
    cache_offsets,
    check_scales,
    hadamard_product,
    quantize_heads,
    rotation_launch_args,
    v_layout,
)


@triton.jit
def _rotate(x1, x2, c1, c2, s1, s2):
    """x * cos + rotate_half(x) * sin on the two halves, each product rounded to the input dtype."""
    dt = x1.dtype
    o1 = (x1 * c1).to(dt).to(tl.float32) + (-(x2.to(tl.float32)) * s1).to(dt).to(tl.float32)
    o2 = (x2 * c2).to(dt).to(tl.float32) + (x1 * s2).to(dt).to(tl.float32)
    return o1.to(dt), o2.to(dt)


@triton.jit
def _hadamard_halves(x1, x2, HALF: tl.constexpr, half, IEEE: tl.constexpr, NORM: tl.constexpr):
    """[x1, x2] H for the halves [rows >= 16, HALF] of vectors of size 2 * half -> FP32 halves."""
    a1 = hadamard_product(x1, HALF, half, IEEE)
    a2 = hadamard_product(x2, HALF, half, IEEE)
    return (a1 + a2) * NORM, (a1 - a2) * NORM


@triton.jit
def _rope_store_kernel(
    qkv_ptr, cos_ptr, sin_ptr, q_out_ptr, k_cache_ptr, v_cache_ptr, k_scale_ptr, v_scale_ptr, slot_ptr,
    stride_t, stride_cos, stride_qo, stride_slot, stride_sb, stride_ss, stride_sh, scale_block,
    cache_vb, cache_vs, cache_vh, cache_vd, cache_block,
    NUM_HEADS: tl.constexpr, NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_KV: tl.constexpr, HALF: tl.constexpr, QUANT: tl.constexpr,
    IEEE: tl.constexpr = False, NORM: tl.constexpr = 1.0,
):  # fmt: skip
    token = tl.program_id(0)
    half = HEAD_DIM // 2
    d = tl.arange(0, HALF)
    d_mask = d < half
    row = qkv_ptr + token * stride_t
    c1 = tl.load(cos_ptr + token * stride_cos + d, mask=d_mask, other=0.0).to(tl.float32)
    c2 = tl.load(cos_ptr + token * stride_cos + half + d, mask=d_mask, other=0.0).to(tl.float32)
    s1 = tl.load(sin_ptr + token * stride_cos + d, mask=d_mask, other=0.0).to(tl.float32)
    s2 = tl.load(sin_ptr + token * stride_cos + half + d, mask=d_mask, other=0.0).to(tl.float32)

    h = tl.arange(0, BLOCK_H)[:, None]
    q_mask = (h < NUM_HEADS) & d_mask[None, :]
    q1 = tl.load(row + h * HEAD_DIM + d[None, :], mask=q_mask, other=0.0)
    q2 = tl.load(row + h * HEAD_DIM + half + d[None, :], mask=q_mask, other=0.0)
    o1, o2 = _rotate(q1, q2, c1[None, :], c2[None, :], s1[None, :], s2[None, :])
    if QUANT:  # the queries of a rotated cache: q H, rounded to the model dtype as the torch path rounds
        h1, h2 = _hadamard_halves(o1, o2, HALF, half, IEEE, NORM)
        o1, o2 = h1.to(q1.dtype), h2.to(q1.dtype)
    q_out = q_out_ptr + token * stride_qo + h * HEAD_DIM + d[None, :]
    tl.store(q_out, o1, mask=q_mask)
    tl.store(q_out + half, o2, mask=q_mask)

    slot = tl.load(slot_ptr + token).to(tl.int64)
    g = tl.arange(0, BLOCK_KV)[:, None]
    kv_mask = (g < tl.where(slot >= 0, NUM_KV_HEADS, 0)) & d_mask[None, :]
    k_row = row + NUM_HEADS * HEAD_DIM + g * HEAD_DIM + d[None, :]
    k1 = tl.load(k_row, mask=kv_mask, other=0.0)
    k2 = tl.load(k_row + half, mask=kv_mask, other=0.0)
    r1, r2 = _rotate(k1, k2, c1[None, :], c2[None, :], s1[None, :], s2[None, :])
    dest = slot * stride_slot + g * HEAD_DIM + d[None, :]
    v_dest = cache_offsets(slot, g, d[None, :], cache_vb, cache_vs, cache_vh, cache_vd, cache_block)
    v_half = half * cache_vd
    v_row = k_row + NUM_KV_HEADS * HEAD_DIM
    v1 = tl.load(v_row, mask=kv_mask, other=0.0)
    v2 = tl.load(v_row + half, mask=kv_mask, other=0.0)
    if QUANT:
        # K after RoPE and V, times H (FP32); masked lanes and rows are 0 and stay 0.
        k1, k2 = _hadamard_halves(r1, r2, HALF, half, IEEE, NORM)
        v1, v2 = _hadamard_halves(v1, v2, HALF, half, IEEE, NORM)
        # One scale per head over both halves.
        k_amax = tl.maximum(tl.max(tl.abs(k1), 1), tl.max(tl.abs(k2), 1))
        v_amax = tl.maximum(tl.max(tl.abs(v1), 1), tl.max(tl.abs(v2), 1))
        k1_q, k_s = quantize_heads(k1, k_amax)
        k2_q, _ = quantize_heads(k2, k_amax)
        v1_q, v_s = quantize_heads(v1, v_amax)
        v2_q, _ = quantize_heads(v2, v_amax)
        tl.store(k_cache_ptr + dest, k1_q, mask=kv_mask)
        tl.store(k_cache_ptr + dest + half, k2_q, mask=kv_mask)
        tl.store(v_cache_ptr + v_dest, v1_q, mask=kv_mask)
        tl.store(v_cache_ptr + v_dest + v_half, v2_q, mask=kv_mask)
        heads = tl.arange(0, BLOCK_KV)
        head_mask = heads < tl.where(slot >= 0, NUM_KV_HEADS, 0)
        scale_dest = cache_offsets(slot, heads, 0, stride_sb, stride_ss, stride_sh, 0, scale_block)
        tl.store(k_scale_ptr + scale_dest, k_s.to(k_scale_ptr.dtype.element_ty), mask=head_mask)
        tl.store(v_scale_ptr + scale_dest, v_s.to(v_scale_ptr.dtype.element_ty), mask=head_mask)
    else:
        tl.store(k_cache_ptr + dest, r1.to(k_cache_ptr.dtype.element_ty), mask=kv_mask)
        tl.store(k_cache_ptr + dest + half, r2.to(k_cache_ptr.dtype.element_ty), mask=kv_mask)
        tl.store(v_cache_ptr + v_dest, v1.to(v_cache_ptr.dtype.element_ty), mask=kv_mask)
        tl.store(v_cache_ptr + v_dest + v_half, v2.to(v_cache_ptr.dtype.element_ty), mask=kv_mask)


def rope_and_store(
    qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
    slot_mapping: torch.Tensor, num_heads: int, num_kv_heads: int, head_dim: int,
    k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None,
) -> torch.Tensor:  # fmt: skip
    """qkv [T, (H + 2 KV) * D] -> queries [T, H, D] after RoPE; keys after RoPE and values go to the cache.

    An INT8 cache (scales `k_scale`/`v_scale` [blocks, block_size, KV]) stores K and V times H,
    quantised, and the queries come back times H too (the module doc)."""
    num_tokens = qkv.shape[0]
    if qkv.stride(-1) != 1:
        qkv = qkv.contiguous()
    cos = cos.to(qkv.dtype).reshape(num_tokens, head_dim)
    sin = sin.to(qkv.dtype).reshape(num_tokens, head_dim)
    k_s, v_s, scale_layout, quant = check_scales(k_cache, k_scale, v_scale)
    q_out = torch.empty(num_tokens, num_heads, head_dim, dtype=qkv.dtype, device=qkv.device)
    block_h, block_kv = triton.next_power_of_2(num_heads), triton.next_power_of_2(num_kv_heads)
    half = triton.next_power_of_2(head_dim // 2)
    rotation: dict[str, object] = {}
    if quant:  # tl.dot's smallest tile is 16 x 16
        block_h, block_kv, half = max(block_h, 16), max(block_kv, 16), max(half, 16)
        rotation = rotation_launch_args(qkv.dtype, head_dim)
    if num_tokens:
        _rope_store_kernel[(num_tokens,)](
            qkv, cos.contiguous(), sin.contiguous(), q_out, k_cache, v_cache, k_s, v_s, slot_mapping,
            qkv.stride(0), head_dim, num_heads * head_dim, num_kv_heads * head_dim, *scale_layout,
            *v_layout(k_cache, v_cache),
            NUM_HEADS=num_heads, NUM_KV_HEADS=num_kv_heads, HEAD_DIM=head_dim,
            BLOCK_H=block_h, BLOCK_KV=block_kv, HALF=half, QUANT=quant, **rotation,
        )  # fmt: skip
    return q_out
