"""The Triton fast path for Llama-family decoder layers, swapped into a loaded transformers model.

transformers' Llama layer launches about thirty kernels (norms in six element-wise steps, three
projections for Q, K and V, rotate-half arithmetic, SiLU and the product apart); a decode step
of a 1B model is then bound by launches and small element-wise passes, not by its weights. The
swap keeps the model's weights and its module tree and replaces, per layer:

- each RMSNorm by one Triton kernel (`kernels/rms_norm.py`);
- the attention by one fused QKV projection, one kernel that applies the model's rotary
  embedding and stores K/V into the paged cache (`kernels/rope_store.py`), the paged attention
  kernels, and the output projection;
- the MLP by one fused gate/up projection, one SiLU-and-product kernel and the down projection.

The fused weights are new tensors; the original projections are re-pointed at views of them, so
no weight is held twice and `restore` puts the original modules back unchanged (the benchmark
runs transformers' own `generate()` on the same model afterwards). Only classes known to compute
exactly this are swapped (`SUPPORTED`); any other model keeps its modules and reaches the paged
kernels through the attention interface. A model quantised by `quant.quantize_model` (at load,
before the engine swaps) fuses its INT8 projections the same way; the fused `Int8Linear` modules run
the INT8 matmul kernel (`kernels/int8_matmul.py`) on decode steps like the unfused ones.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from worker.engine.attention import add_window_scores, current_metadata, triton_paged_attention
from worker.engine.quant.int8_linear import Int8Linear

SUPPORTED_ATTENTION = {"LlamaAttention", "MistralAttention", "Qwen2Attention"}
SUPPORTED_MLP = {"LlamaMLP", "MistralMLP", "Qwen2MLP"}
SUPPORTED_NORM = {"LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm"}


def _fuse_linears(linears: list[nn.Module]) -> nn.Module:
    """One Linear computing the concatenated outputs; the originals become views of its weight.

    INT8 projections (`quant.Int8Linear`, from `LLM_WEIGHTS=int8`) fuse into one `Int8Linear`: their
    scales are per output channel, so concatenating weights and scales is exact.
    """
    if all(isinstance(lin, Int8Linear) for lin in linears):
        return Int8Linear.concat(linears)  # type: ignore[arg-type]
    if not all(type(lin) is nn.Linear for lin in linears):
        raise TypeError(f"cannot fuse {sorted({type(lin).__name__ for lin in linears})}")
    return _fuse_float_linears(linears)  # type: ignore[arg-type]


def _fuse_float_linears(linears: list[nn.Linear]) -> nn.Linear:
    weight = torch.cat([lin.weight.data for lin in linears])
    has_bias = [lin.bias is not None for lin in linears]
    fused = nn.Linear(
        weight.shape[1], weight.shape[0], bias=any(has_bias), device=weight.device, dtype=weight.dtype
    )
    fused.weight = nn.Parameter(weight, requires_grad=False)
    if any(has_bias):
        biases = [
            lin.bias.data if lin.bias is not None else weight.new_zeros(lin.out_features) for lin in linears
        ]
        fused.bias = nn.Parameter(torch.cat(biases), requires_grad=False)
    row = 0
    for lin in linears:
        n = lin.out_features
        lin.weight = nn.Parameter(fused.weight.data[row : row + n], requires_grad=False)
        if lin.bias is not None and fused.bias is not None:
            lin.bias = nn.Parameter(fused.bias.data[row : row + n], requires_grad=False)
        row += n
    return fused


class FusedRMSNorm(nn.Module):
    def __init__(self, original: nn.Module):
        super().__init__()
        self.original = original
        self.eps = float(original.variance_epsilon)  # type: ignore[arg-type]

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        from worker.engine.kernels.rms_norm import rms_norm

        return rms_norm(hidden_states, self.original.weight, self.eps)  # type: ignore[arg-type]


class FusedMLP(nn.Module):
    def __init__(self, original: nn.Module):
        super().__init__()
        self.original = original
        self.gate_up = _fuse_linears([original.gate_proj, original.up_proj])  # type: ignore[list-item]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from worker.engine.kernels.silu_mul import silu_mul

        return self.original.down_proj(silu_mul(self.gate_up(x)))  # type: ignore[operator,no-any-return]


class PagedSelfAttention(nn.Module):
    """The attention block of one layer on the paged cache: fused QKV, RoPE + store, paged kernels, o_proj."""

    def __init__(self, original: nn.Module, num_heads: int, num_kv_heads: int, head_dim: int):
        super().__init__()
        self.original = original
        self.layer_idx: int = original.layer_idx  # type: ignore[assignment]
        self.scaling = float(getattr(original, "scaling", head_dim**-0.5))
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.qkv = _fuse_linears([original.q_proj, original.k_proj, original.v_proj])  # type: ignore[list-item]

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        **kwargs: Any,
    ) -> tuple[torch.Tensor, None]:
        from worker.engine.kernels.rope_store import rope_and_store

        metadata = current_metadata()
        tokens = hidden_states.shape[1]
        kv_cache = metadata.kv_cache
        k_cache, v_cache = kv_cache.layer(self.layer_idx)
        k_scale, v_scale = kv_cache.layer_scales(self.layer_idx)
        cos, sin = position_embeddings
        # With an INT8 cache the kernel stores K H and V H and returns the queries as q H (kv_cache.py).
        query = rope_and_store(
            self.qkv(hidden_states[0]), cos, sin, k_cache, v_cache, metadata.slot_mapping,
            self.num_heads, self.num_kv_heads, self.head_dim, k_scale, v_scale,
        )  # fmt: skip
        # (P V H) H^T for an INT8 cache, in the attention kernels' epilogue.
        unrotate = kv_cache.rotation is not None
        out = triton_paged_attention(
            query, k_cache, v_cache, metadata, self.scaling, k_scale, v_scale, unrotate=unrotate
        )
        if metadata.score_requests:  # SnapKV, eager prefill steps only: queries in the stored keys' basis
            add_window_scores(query, k_cache, k_scale, metadata, self.scaling)
        return self.original.o_proj(out.view(1, tokens, -1)), None  # type: ignore[operator]


@dataclass
class FusedModel:
    """The swaps made in a model, undone by `restore`."""

    swaps: list[tuple[nn.Module, str, nn.Module]] = field(default_factory=list)  # (parent, name, original)

    def restore(self) -> None:
        for parent, name, original in reversed(self.swaps):
            setattr(parent, name, original)
        self.swaps.clear()


def fuse_model(model: nn.Module) -> FusedModel:
    """Swap the supported norms, attention blocks and MLPs of `model` for their fused versions."""
    config: Any = model.config
    num_heads = config.num_attention_heads
    num_kv_heads = getattr(config, "num_key_value_heads", None) or num_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // num_heads
    fused = FusedModel()
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            kind = type(child).__name__
            replacement: nn.Module | None = None
            if kind in SUPPORTED_NORM:
                replacement = FusedRMSNorm(child)
            elif kind in SUPPORTED_MLP and getattr(config, "hidden_act", None) == "silu":
                replacement = FusedMLP(child)
            elif kind in SUPPORTED_ATTENTION:
                replacement = PagedSelfAttention(child, num_heads, num_kv_heads, head_dim)
            if replacement is not None:
                setattr(parent, name, replacement)
                fused.swaps.append((parent, name, child))
    return fused
