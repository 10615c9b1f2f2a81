"""The KV cache memory: one tensor holding every layer's K and V blocks, sized from a byte budget.

Layout [num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim]: a block id indexes the
same tokens in every layer, so one block table serves the whole model, and a flat slot id
(block_id * block_size + offset) addresses one token's K or V of one layer.

The cache dtype is `LLM_KV_DTYPE`: the activation dtype by default, or FP16/BF16/FP32, or INT8
(`quant/kv_int8.py`). An INT8 cache holds one FP16 scale per token per KV head in a second
tensor `scales`, paged like the blocks: a block's scales live at its block id, so whatever shares
or reuses a block (prefix caching, preemption) shares its scales with it. In memory they are
head-major, [num_layers, 2, num_blocks, num_kv_heads, block_size], so one head's scales of a block
are contiguous and the attention kernels read them two per 32-bit word
(`kernels/paged_softmax.load_scale_pairs`); `layer_scales` returns them in the blocks' index order,
[num_blocks, block_size, num_kv_heads], as a strided view, so a (block, offset) pair or a flat slot
id addresses them as it addresses K and V.

An INT8 cache also holds each block's V transposed, [num_kv_heads, head_dim, block_size] in memory
(K stays [block_size, num_kv_heads, head_dim]): the attention's product p V reduces over positions,
and only with a block's positions contiguous does an INT8 V tile reach the tensor cores by
vectorised copies rather than byte by byte (`kernels/paged_softmax.v_tile_transposed`). `layer`
returns V as a strided view in the blocks' index order, like the scales. A block's bytes are the
same count either way, so block ids, sharing and the budget are unchanged.

An INT8 cache holds each head's K and V rotated by the normalised Hadamard matrix H before they
were quantised (`quant/kv_int8.py`; `KVCache.rotation` is H, allocated once with the pool): every
backend's store rotates (`write` here, the Triton store kernels on the GPU path), and the attention
rotates the queries by H and multiplies its output by H^T. It needs a power-of-two head_dim, which
`KVCacheSpec` checks for an INT8 cache.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from worker.engine.quant.kv_int8 import KV_SCALE_DTYPE, check_head_dim, kv_rotation, quantize_kv, rotate

KV_DTYPE_CHOICES: tuple[str, ...] = ("auto", "fp16", "bf16", "fp32", "int8")
_KV_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32, "int8": torch.int8}

CPU_DEFAULT_KV_CACHE_BYTES = 256 * 1024 * 1024
# Share of the free GPU memory (measured after the model is loaded) that the cache may take;
# the rest is headroom for activations and the logits of the largest step.
GPU_DEFAULT_MEMORY_FRACTION = 0.85


def resolve_kv_dtype(kv_dtype: str, activation_dtype: torch.dtype) -> torch.dtype:
    """`LLM_KV_DTYPE` as a torch dtype; `auto` keeps the activation dtype (the cache before INT8 KV)."""
    if kv_dtype == "auto":
        return activation_dtype
    if kv_dtype not in _KV_DTYPES:
        raise ValueError(f"LLM_KV_DTYPE must be one of {', '.join(KV_DTYPE_CHOICES)}; got {kv_dtype!r}")
    return _KV_DTYPES[kv_dtype]


@dataclass(frozen=True)
class KVCacheSpec:
    """Shape of one token's K/V across the model, read from a transformers config."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype

    def __post_init__(self) -> None:
        if self.quantized:
            check_head_dim(self.head_dim)  # the Hadamard rotation of an INT8 cache

    @classmethod
    def from_model_config(cls, config: Any, dtype: torch.dtype) -> KVCacheSpec:
        num_heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // num_heads
        num_kv_heads = getattr(config, "num_key_value_heads", None) or num_heads
        return cls(config.num_hidden_layers, num_kv_heads, head_dim, dtype)

    @property
    def quantized(self) -> bool:
        """INT8 values with a scale per token per KV head (see the module doc)."""
        return self.dtype == torch.int8

    def bytes_per_block(self, block_size: int) -> int:
        """K and V of `block_size` tokens in every layer, scales included: what a block costs the budget."""
        vectors = self.num_layers * 2 * block_size * self.num_kv_heads
        per_vector = self.head_dim * self.dtype.itemsize
        if self.quantized:
            per_vector += KV_SCALE_DTYPE.itemsize
        return vectors * per_vector


def num_blocks_for_budget(
    spec: KVCacheSpec,
    block_size: int,
    device: torch.device,
    kv_cache_bytes: int | None = None,
    gpu_memory_fraction: float = GPU_DEFAULT_MEMORY_FRACTION,
) -> int:
    """Blocks that fit `kv_cache_bytes`, or on CUDA without a budget a fraction of the free memory."""
    if kv_cache_bytes is None:
        if device.type == "cuda":
            free_bytes, _ = torch.cuda.mem_get_info(device)
            kv_cache_bytes = int(free_bytes * gpu_memory_fraction)
        else:
            kv_cache_bytes = CPU_DEFAULT_KV_CACHE_BYTES
    num_blocks = kv_cache_bytes // spec.bytes_per_block(block_size)
    if num_blocks < 1:
        raise ValueError(f"kv_cache_bytes={kv_cache_bytes} holds less than one block of {block_size} tokens")
    return int(num_blocks)


class KVCache:
    """Per-layer K and V block tensors, plus the flat-slot write used by the attention function."""

    def __init__(self, spec: KVCacheSpec, num_blocks: int, block_size: int, device: torch.device):
        self.spec = spec
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.device = device
        self.data = torch.zeros(
            spec.num_layers, 2, num_blocks, block_size, spec.num_kv_heads, spec.head_dim,
            dtype=spec.dtype, device=device,
        )  # fmt: skip
        # Ones, not zeros: a slot never written dequantises to 0 either way, and no scale is ever 0.
        self.scales: torch.Tensor | None = None
        # INT8 only: the FP32 [head_dim, head_dim] Hadamard matrix H applied to K/V before quantising
        # (x -> x H), allocated here once so that CUDA graphs capture the same tensor; None: stored as is.
        self.rotation: torch.Tensor | None = None
        if spec.quantized:
            self.rotation = kv_rotation(spec.head_dim, device)
            shape = (spec.num_layers, 2, num_blocks, spec.num_kv_heads, block_size)  # head-major
            self.scales = torch.ones(shape, dtype=KV_SCALE_DTYPE, device=device)

    @property
    def nbytes(self) -> int:
        """Bytes the pool holds: the K/V blocks and, for INT8, their scales."""
        scales = 0 if self.scales is None else self.scales.numel() * self.scales.element_size()
        return self.data.numel() * self.data.element_size() + scales

    def layer(self, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of one layer, each [num_blocks, block_size, num_kv_heads, head_dim].

        An INT8 cache's V is a strided view: each block holds it transposed (the module doc)."""
        k, v = self.data[layer_idx, 0], self.data[layer_idx, 1]
        if self.spec.quantized:
            shape = (self.num_blocks, self.spec.num_kv_heads, self.spec.head_dim, self.block_size)
            v = v.view(shape).permute(0, 3, 1, 2)
        return k, v

    def layer_scales(self, layer_idx: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Scales of one layer's K and V, each [num_blocks, block_size, num_kv_heads] (a view of the
        head-major tensor); None unless INT8."""
        if self.scales is None:
            return None, None
        return self.scales[layer_idx, 0].transpose(1, 2), self.scales[layer_idx, 1].transpose(1, 2)

    def rotate_queries(self, query: torch.Tensor) -> torch.Tensor:
        """Queries [..., head_dim] as the stored keys need them: q H for an INT8 cache, else `query`."""
        return query if self.rotation is None else rotate(query, self.rotation)

    def unrotate_output(self, out: torch.Tensor) -> torch.Tensor:
        """Attention output over the stored (rotated) V back in the model's basis: out H^T for INT8."""
        return out if self.rotation is None else rotate(out, self.rotation.T)

    def release(self) -> None:
        """Drop the tensors (the engine's `close`), so their memory can be reused at once."""
        del self.data
        self.scales = None

    def write(
        self, layer_idx: int, slot_mapping: torch.Tensor, key: torch.Tensor, value: torch.Tensor
    ) -> None:
        """Store new tokens' K/V ([num_tokens, num_kv_heads, head_dim]) at their flat slots.

        An INT8 cache stores them rotated by H and quantised (the module doc); the torch reference of
        the Triton store kernels."""
        k_cache, v_cache = self.layer(layer_idx)
        k_scale, v_scale = self.layer_scales(layer_idx)
        if k_scale is None or v_scale is None:
            flat = (-1, self.spec.num_kv_heads, self.spec.head_dim)
            k_cache.view(flat).index_copy_(0, slot_mapping, key.to(k_cache.dtype))
            v_cache.view(flat).index_copy_(0, slot_mapping, value.to(v_cache.dtype))
            return
        # V and the scales are strided views: indexed by (block, offset), not flattened.
        blocks, offsets = slot_mapping // self.block_size, slot_mapping % self.block_size
        for cache, scales, new in ((k_cache, k_scale, key), (v_cache, v_scale, value)):
            q, scale = quantize_kv(new.float() if self.rotation is None else new.float() @ self.rotation)
            cache[blocks, offsets] = q
            scales[blocks, offsets] = scale
