"""The KV cache memory: one tensor holding every layer's K and V blocks, sized from a byte budget.

Layout [num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim]: a block id indexes the
same tokens in every layer, so one block table serves the whole model, and a flat slot id
(block_id * block_size + offset) addresses one token's K or V of one layer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

CPU_DEFAULT_KV_CACHE_BYTES = 256 * 1024 * 1024
# Share of the free GPU memory (measured after the model is loaded) that the cache may take;
# the rest is headroom for activations and the logits of the largest step.
GPU_DEFAULT_MEMORY_FRACTION = 0.85


@dataclass(frozen=True)
class KVCacheSpec:
    """Shape of one token's K/V across the model, read from a transformers config."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype

    @classmethod
    def from_model_config(cls, config: Any, dtype: torch.dtype) -> KVCacheSpec:
        num_heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // num_heads
        num_kv_heads = getattr(config, "num_key_value_heads", None) or num_heads
        return cls(config.num_hidden_layers, num_kv_heads, head_dim, dtype)

    def bytes_per_block(self, block_size: int) -> int:
        elem = torch.empty((), dtype=self.dtype).element_size()
        return self.num_layers * 2 * block_size * self.num_kv_heads * self.head_dim * elem


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

    @property
    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size()

    def layer(self, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of one layer, each [num_blocks, block_size, num_kv_heads, head_dim]."""
        return self.data[layer_idx, 0], self.data[layer_idx, 1]

    def write(
        self, layer_idx: int, slot_mapping: torch.Tensor, key: torch.Tensor, value: torch.Tensor
    ) -> None:
        """Store new tokens' K/V ([num_tokens, num_kv_heads, head_dim]) at their flat slots."""
        k_cache, v_cache = self.layer(layer_idx)
        flat = (-1, self.spec.num_kv_heads, self.spec.head_dim)
        k_cache.view(flat).index_copy_(0, slot_mapping, key.to(k_cache.dtype))
        v_cache.view(flat).index_copy_(0, slot_mapping, value.to(v_cache.dtype))
