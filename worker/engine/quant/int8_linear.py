"""`Int8Linear`: a swap-in for `nn.Linear` holding an INT8 weight and one scale per output channel.

Quantisation is symmetric per output row (gpt-fast's `WeightOnlyInt8QuantHandler`):
`scale[o] = max_i |W[o, i]| / 127`, `W_q = round(W / scale)`, so `W ~= W_q * scale[:, None]` and
`x @ W.T ~= (x @ W_q.T) * scale`: the scale multiplies the output, never a copy of the weight.

Two forwards, chosen per module by `activations`:

- `"float"` (weight-only): the INT8 weight is cast to the activation dtype and multiplied; the
  output is scaled per channel. Memory holds one byte per weight; the cast is a temporary of the
  weight's size in the activation dtype, so this is slower than a float `F.linear` on CPU
  (measured in docs/benchmarks.md). It is the exact path: its only error is the weight rounding.
  On CUDA, steps of at most `TRITON_MAX_ROWS` rows (decode) run the Triton kernel of
  `kernels/int8_matmul.py` instead: it reads the INT8 tiles and converts them in registers (no
  float copy of the weight), accumulates in FP32 and scales the output, so a decode step reads
  half the weight bytes of FP16. Larger steps (prefill) keep the cast and cuBLAS. A weight whose
  float copy would be large (a large-vocabulary lm_head, `int8_embedding.py`) is cast and multiplied
  in slices of output channels: on CUDA the temporary stays bounded, on CPU each slice stays in cache
  (see `CAST_CHUNK_BYTES`).
- `"int8"` (W8A8): each token's activations are quantised too (one scale per row of `x`,
  dynamic), the product runs on `torch._int_mm` (INT8 x INT8 -> INT32) and is rescaled by both
  scales. On CPUs with VNNI this is several times faster than an FP32 `F.linear`. CUDA's
  `_int_mm` needs more than 16 rows and dimensions that are multiples of 8; smaller steps (the
  decode steps of small batches) take the weight-only path (the Triton kernel).

The bias, if any, stays in the activation dtype.
"""

from __future__ import annotations

import importlib.util
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

ActivationMode = Literal["float", "int8"]
QMAX = 127
# On CUDA, steps of at most this many rows (decode steps) take the Triton kernel of
# `kernels/int8_matmul.py` on the weight-only path; larger ones (prefill) dequantise for cuBLAS.
# At 256 rows the cast path made a Llama-3.2-1B decode step 1.85x the FP16 step (12.04 vs 6.52 ms,
# H200): it writes and reads a float copy of every weight each step.
TRITON_MAX_ROWS = 256
# The cast path (CPU, and CUDA prefill) converts the INT8 weight to the activation dtype before the
# matmul. On CUDA a weight whose float copy would exceed CAST_CHUNK_BYTES (an lm_head over a large
# vocabulary: 525 MB in FP16 for Llama-3.2-1B) is multiplied in slices of output channels, so the
# temporary stays at most that size. On CPU a weight whose float copy exceeds CPU_CAST_MIN_BYTES is
# cast in slices of CPU_CAST_CHUNK_BYTES, which stay in cache between the cast and the matmul:
# SmolLM2's lm_head (49,152 x 576, 113 MB in FP32) at one row took 31 ms in slices against 160 ms whole
# (an FP32 F.linear: 24 ms), at 64 rows 115 ms against 246 ms (FP32: 105 ms).
CAST_CHUNK_BYTES = 64 << 20
CPU_CAST_MIN_BYTES = 16 << 20
CPU_CAST_CHUNK_BYTES = 2 << 20
QUANT_CHUNK_ELEMENTS = 1 << 22  # rows quantised at a time by `quantize_weight` (FP32 temporaries)
_TRITON: bool | None = None


def quantize_weight(weight: torch.Tensor, scale_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel INT8: (int8 weight [out, in], scale [out] in `scale_dtype`).

    Rows are independent, so a large weight (an embedding table) is quantised `QUANT_CHUNK_ELEMENTS`
    at a time: the FP32 temporaries stay small beside the float weight and its INT8 result. A weight on
    the meta device (a model built without storage, `streaming_load.py`) gives shapes only."""
    if weight.device.type == "meta":
        return (
            torch.empty(weight.shape, dtype=torch.int8, device="meta"),
            torch.empty(weight.shape[0], dtype=scale_dtype, device="meta"),
        )
    rows = max(1, QUANT_CHUNK_ELEMENTS // max(1, weight.shape[1]))
    q = torch.empty(weight.shape, dtype=torch.int8, device=weight.device)
    scale = torch.empty(weight.shape[0], dtype=scale_dtype, device=weight.device)
    for start in range(0, weight.shape[0], rows):
        w = weight[start : start + rows].detach().float()
        s = (w.abs().amax(dim=1) / QMAX).to(scale_dtype)
        # An all-zero row (or one too small for a float16 scale) quantises to zeros with scale 1.
        s = torch.where(s == 0, torch.ones_like(s), s)
        # Round against the stored (possibly float16) scale, so dequantising reproduces this rounding.
        q[start : start + rows] = torch.round(w / s.float()[:, None]).clamp(-QMAX, QMAX).to(torch.int8)
        scale[start : start + rows] = s
    return q, scale


def _triton_available() -> bool:
    global _TRITON
    if _TRITON is None:
        _TRITON = importlib.util.find_spec("triton") is not None
    return _TRITON


def _int_mm_usable(x: torch.Tensor, weight: torch.Tensor) -> bool:
    if x.device.type == "cpu":
        return True
    # CUDA's cuBLASLt INT8 GEMM: rows > 16, inner and output dimensions multiples of 8.
    return x.shape[0] > 16 and x.shape[1] % 8 == 0 and weight.shape[0] % 8 == 0


class Int8Linear(nn.Module):
    """`y = (x @ W_q.T) * scale + bias` with `W_q` INT8 [out, in] and `scale` [out] (see module doc)."""

    weight: torch.Tensor
    scale: torch.Tensor

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = False,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        activations: ActivationMode = "float",
    ):
        super().__init__()
        if activations not in ("float", "int8"):
            raise ValueError(f"activations must be 'float' or 'int8', not {activations!r}")
        self.in_features, self.out_features = in_features, out_features
        self.activations: ActivationMode = activations
        # Buffers, not parameters: nothing trains them, and `next(model.parameters())` keeps
        # naming the model's float dtype (the embedding comes first).
        self.register_buffer(
            "weight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device)
        )
        self.register_buffer("scale", torch.ones(out_features, dtype=dtype, device=device))
        self.bias: nn.Parameter | None = (
            nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device), requires_grad=False)
            if bias
            else None
        )

    @classmethod
    def from_linear(cls, linear: nn.Linear, activations: ActivationMode = "float") -> Int8Linear:
        """Quantise a float `nn.Linear`; the scale and bias keep its dtype."""
        weight = linear.weight
        module = cls(
            linear.in_features, linear.out_features, linear.bias is not None,
            dtype=weight.dtype, device=weight.device, activations=activations,
        )  # fmt: skip
        module.weight, module.scale = quantize_weight(weight, weight.dtype)
        if linear.bias is not None:
            module.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        return module

    @classmethod
    def concat(cls, linears: list[Int8Linear]) -> Int8Linear:
        """One module computing the concatenated outputs (fused QKV, gate/up); exact, since the
        scales are per output channel. The originals are re-pointed at views of its tensors."""
        first = linears[0]
        if any(
            lin.in_features != first.in_features or lin.activations != first.activations for lin in linears
        ):
            raise ValueError("fused Int8Linear modules must share in_features and activation mode")
        has_bias = any(lin.bias is not None for lin in linears)
        fused = cls(
            first.in_features, sum(lin.out_features for lin in linears), has_bias,
            dtype=first.scale.dtype, device=first.weight.device, activations=first.activations,
        )  # fmt: skip
        fused.weight = torch.cat([lin.weight for lin in linears])
        fused.scale = torch.cat([lin.scale for lin in linears])
        if has_bias:
            biases = [
                lin.bias if lin.bias is not None else first.scale.new_zeros(lin.out_features)
                for lin in linears
            ]
            fused.bias = nn.Parameter(torch.cat([b.detach() for b in biases]), requires_grad=False)
        row = 0
        for lin in linears:
            n = lin.out_features
            lin.weight, lin.scale = fused.weight[row : row + n], fused.scale[row : row + n]
            if lin.bias is not None and fused.bias is not None:
                lin.bias = nn.Parameter(fused.bias.data[row : row + n], requires_grad=False)
            row += n
        return fused

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The float weight this module computes with (for tests and comparisons)."""
        dtype = dtype or self.scale.dtype
        return (self.weight.to(torch.float32) * self.scale.float()[:, None]).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)
        if self.activations == "int8" and x2.shape[0] > 0 and _int_mm_usable(x2, self.weight):
            out = self._forward_w8a8(x2)
        elif x2.is_cuda and x2.shape[0] <= TRITON_MAX_ROWS and _triton_available():
            from worker.engine.kernels.int8_matmul import int8_matmul

            return int8_matmul(x2, self.weight, self.scale, self.bias).view(*shape[:-1], self.out_features)
        elif chunk := self._cast_chunk_bytes(x2):
            out = self._forward_cast_chunked(x2, chunk)
        else:
            out = F.linear(x2, self.weight.to(x.dtype)) * self.scale.to(x.dtype)
        if self.bias is not None:
            out = out + self.bias.to(x.dtype)
        return out.view(*shape[:-1], self.out_features)

    def _cast_chunk_bytes(self, x: torch.Tensor) -> int:
        """Bytes of float weight the cast path converts at a time; 0: all at once (see `CAST_CHUNK_BYTES`)."""
        copy = self.weight.numel() * x.element_size()
        if x.is_cuda:
            return CAST_CHUNK_BYTES if copy > CAST_CHUNK_BYTES else 0
        return CPU_CAST_CHUNK_BYTES if copy > CPU_CAST_MIN_BYTES else 0

    def _forward_cast_chunked(self, x: torch.Tensor, chunk_bytes: int) -> torch.Tensor:
        """The cast path over slices of output channels whose float copy takes at most `chunk_bytes`
        (see `CAST_CHUNK_BYTES`); the same products."""
        weight, scale = self.weight, self.scale.to(x.dtype)
        out = x.new_empty(x.shape[0], self.out_features)
        rows = max(1, chunk_bytes // (self.in_features * x.element_size()))
        for start in range(0, self.out_features, rows):
            end = min(start + rows, self.out_features)
            out[:, start:end] = F.linear(x, weight[start:end].to(x.dtype)) * scale[start:end]
        return out

    def _forward_w8a8(self, x: torch.Tensor) -> torch.Tensor:
        x_scale = x.abs().amax(dim=1, keepdim=True).float().clamp(min=1e-8) / QMAX
        x_q = torch.round(x.float() / x_scale).clamp(-QMAX, QMAX).to(torch.int8)
        acc = torch._int_mm(x_q, self.weight.t())
        return (acc.float() * x_scale * self.scale.float()).to(x.dtype)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, activations={self.activations}"
        )
