"""Write one step's new K/V into the paged cache at their flat slots, K and V in one launch.

A slot is `block_id * block_size + offset`; a negative slot marks a padding row (CUDA-graph
buckets pad the batch) and is skipped. One program stores one token's K and V for all KV heads.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _store_kv_kernel(
    key_ptr, value_ptr, k_cache_ptr, v_cache_ptr, slot_ptr,
    stride_kt, stride_kh, stride_vt, stride_vh, stride_slot,
    NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    token = tl.program_id(0)
    slot = tl.load(slot_ptr + token).to(tl.int64)
    h = tl.arange(0, BLOCK_H)[:, None]
    d = tl.arange(0, BLOCK_D)[None, :]
    # A padding row stores nothing: its head count becomes 0 (a mask, not an early return).
    mask = (h < tl.where(slot >= 0, NUM_KV_HEADS, 0)) & (d < HEAD_DIM)
    key = tl.load(key_ptr + token * stride_kt + h * stride_kh + d, mask=mask)
    value = tl.load(value_ptr + token * stride_vt + h * stride_vh + d, mask=mask)
    dest = slot * stride_slot + h * HEAD_DIM + d
    tl.store(k_cache_ptr + dest, key.to(k_cache_ptr.dtype.element_ty), mask=mask)
    tl.store(v_cache_ptr + dest, value.to(v_cache_ptr.dtype.element_ty), mask=mask)


def store_kv(
    key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:  # fmt: skip
    """key/value [T, KV, D] (any strides) -> k/v_cache [blocks, block_size, KV, D] at slots [T]."""
    num_tokens, num_kv_heads, head_dim = key.shape
    if num_tokens == 0:
        return
    if not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        raise ValueError("the paged cache must be contiguous")
    key = key if key.stride(2) == 1 else key.contiguous()
    value = value if value.stride(2) == 1 else value.contiguous()
    _store_kv_kernel[(num_tokens,)](
        key, value, k_cache, v_cache, slot_mapping,
        key.stride(0), key.stride(1), value.stride(0), value.stride(1), num_kv_heads * head_dim,
        NUM_KV_HEADS=num_kv_heads, HEAD_DIM=head_dim,
        BLOCK_H=triton.next_power_of_2(num_kv_heads), BLOCK_D=triton.next_power_of_2(head_dim),
    )  # fmt: skip
