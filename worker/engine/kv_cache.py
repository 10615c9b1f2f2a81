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

import structlog
import torch

from worker.engine.quant.kv_int8 import KV_SCALE_DTYPE, check_head_dim, kv_rotation, quantize_kv, rotate

log = structlog.get_logger(__name__)

KV_DTYPE_CHOICES: tuple[str, ...] = ("auto", "fp16", "bf16", "fp32", "int8")
_KV_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32, "int8": torch.int8}

CPU_DEFAULT_KV_CACHE_BYTES = 256 * 1024 * 1024
# Without a byte budget (`LLM_KV_CACHE_BYTES=auto`), on CUDA the pool takes the memory free once the
# weights are loaded, less the steps' workspace (`step_workspace_bytes`) and this share of the device's
# memory, for what no estimate covers: allocator fragmentation, the CUDA context's growth, Triton's
# autotuning buffers (4.2 GiB of an H200's 139.8 GiB).
GPU_KV_MARGIN_FRACTION = 0.03
# The workspace assumed when the engine gives no estimate: `step_workspace_bytes` of a Llama-3-70B with
# INT8 weights in FP16 at 8192 tokens and 256 sequences a step with CUDA graphs (3.8 GiB), rounded up.
DEFAULT_STEP_WORKSPACE_BYTES = 4 << 30


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


def step_workspace_bytes(
    config: Any, dtype: torch.dtype, *, max_batch_tokens: int, max_num_seqs: int, graph_rows: int,
    int8_weights: bool,
) -> int:  # fmt: skip
    """Device memory the steps need beside the weights and the KV pool, estimated from the model's shape
    and the policy (the pool is allocated before the CUDA graphs are captured, so it cannot be measured):

    - an eager prefill step of `max_batch_tokens` rows, one layer's activations at a time in `dtype`: the
      residual and its norm, q, k, v, the attention output, the fused gate/up and its product,
      rows x (5 x hidden + 2 x KV width + 3 x intermediate) (the attention kernels keep no scores);
    - the logits of `max_num_seqs` rows in FP32, three times over (the logits, a processed copy, the
      sampler's temporaries);
    - the CUDA graphs' pool, where every captured bucket keeps its logits: `graph_rows` (the buckets'
      rows summed; 0 without graphs) x vocabulary in `dtype`;
    - INT8 weights: the largest fused weight (gate/up) cast to `dtype` for a prefill's cuBLAS product.
    """
    hidden, intermediate = config.hidden_size, config.intermediate_size
    spec = KVCacheSpec.from_model_config(config, dtype)
    kv_width = spec.num_kv_heads * spec.head_dim
    prefill = max_batch_tokens * (5 * hidden + 2 * kv_width + 3 * intermediate) * dtype.itemsize
    logits = 3 * max_num_seqs * config.vocab_size * 4
    graphs = graph_rows * config.vocab_size * dtype.itemsize
    cast = 2 * intermediate * hidden * dtype.itemsize if int8_weights else 0
    return prefill + logits + graphs + cast


def auto_kv_cache_bytes(free_bytes: int, total_bytes: int, workspace_bytes: int) -> int:
    """The pool's bytes without a budget: what is free, less the workspace and the margin (may be < 0)."""
    return free_bytes - workspace_bytes - int(total_bytes * GPU_KV_MARGIN_FRACTION)


def num_blocks_for_budget(
    spec: KVCacheSpec,
    block_size: int,
    device: torch.device,
    kv_cache_bytes: int | None = None,
    workspace_bytes: int | None = None,
) -> int:
    """Blocks that fit `kv_cache_bytes`. Without a budget (`LLM_KV_CACHE_BYTES=auto`): on CUDA, measured
    now (the weights loaded), what is free less `workspace_bytes` (`step_workspace_bytes`; unknown:
    `DEFAULT_STEP_WORKSPACE_BYTES`) and the margin (`auto_kv_cache_bytes`), logged as `kv_pool_sized`; on
    the CPU, `CPU_DEFAULT_KV_CACHE_BYTES`. The pool never grows after, so admission's block accounting
    refuses what it cannot hold before the device runs out of memory."""
    if kv_cache_bytes is None:
        if device.type == "cuda":
            free_bytes, total_bytes = torch.cuda.mem_get_info(device)
            workspace = DEFAULT_STEP_WORKSPACE_BYTES if workspace_bytes is None else workspace_bytes
            kv_cache_bytes = auto_kv_cache_bytes(free_bytes, total_bytes, workspace)
            log.info(
                "kv_pool_sized", free_bytes=free_bytes, total_bytes=total_bytes, workspace_bytes=workspace,
                margin_bytes=int(total_bytes * GPU_KV_MARGIN_FRACTION), kv_cache_bytes=kv_cache_bytes,
            )  # fmt: skip
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
