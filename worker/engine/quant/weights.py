"""The `LLM_WEIGHTS` choice: which float dtype a model loads in, and whether its linears become INT8.

- `auto`: today's behaviour, `LLM_DTYPE` decides (float16 on GPU, float32 on CPU by default);
- `fp16` / `bf16`: float16 / bfloat16 weights (and activations); `LLM_DTYPE` must be auto or agree;
- `int8`: weight-only INT8 linears (`Int8Linear`) and an INT8 embedding table with a scale per
  vocabulary row, which a tied lm_head reads as its INT8 weight (`int8_embedding.py`); activations,
  norms and scales in `LLM_DTYPE`;
- `w8a8`: the same, with INT8 linears that also quantise each token's activations and multiply on
  `torch._int_mm` (faster on CPU; see `int8_linear.py`); lm_head stays weight-only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from worker.engine.quant.int8_linear import ActivationMode, Int8Linear

WeightsChoice = Literal["auto", "fp16", "bf16", "int8", "w8a8"]
WEIGHTS_CHOICES: tuple[str, ...] = ("auto", "fp16", "bf16", "int8", "w8a8")
_FLOAT = {"fp16": "float16", "bf16": "bfloat16"}


@dataclass(frozen=True)
class WeightsPlan:
    """How to load: the float dtype for `load_model`, and the INT8 activation mode (None: no INT8)."""

    dtype: str
    int8_activations: ActivationMode | None


def plan_weights(weights: str, dtype: str = "auto") -> WeightsPlan:
    """Resolve `LLM_WEIGHTS` against `LLM_DTYPE`; a clear ValueError for bad or conflicting values."""
    if weights not in WEIGHTS_CHOICES:
        raise ValueError(f"LLM_WEIGHTS must be one of {', '.join(WEIGHTS_CHOICES)}; got {weights!r}")
    if weights in _FLOAT:
        wanted = _FLOAT[weights]
        if dtype not in ("auto", wanted):
            raise ValueError(f"LLM_WEIGHTS={weights} conflicts with LLM_DTYPE={dtype}; set one of them")
        return WeightsPlan(wanted, None)
    if weights == "int8":
        return WeightsPlan(dtype, "float")
    if weights == "w8a8":
        return WeightsPlan(dtype, "int8")
    return WeightsPlan(dtype, None)


def weights_label(model: nn.Module) -> str:
    """What the linears of a loaded model hold: `int8`, `w8a8` (INT8 with INT8 activations), or the
    float dtype's short name (`fp32`, `fp16`, `bf16`)."""
    for module in model.modules():
        if isinstance(module, Int8Linear):
            return "w8a8" if module.activations == "int8" else "int8"
    return dtype_name(next(model.parameters()).dtype)


def weight_bytes(model: nn.Module) -> int:
    """Bytes the model's weights hold: all parameters and buffers (`Int8Linear` and `Int8Embedding`
    keep theirs as buffers), each storage once, so a tied lm_head (the same table as the embedding)
    and fused projections (views of the fused tensor) count once."""
    tensors = [*model.parameters(), *model.buffers()]
    unique = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return sum(unique.values())


def dtype_name(dtype: torch.dtype) -> str:
    """Short name of a dtype for logs: fp32, fp16, bf16, int8, fp8_e4m3 (else torch's own name)."""
    names = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.int8: "int8"}
    return names.get(dtype) or str(dtype).removeprefix("torch.").replace("float8", "fp8")
