"""INT8 KV cache (`LLM_KV_DTYPE=int8`): the quantise/dequantise reference the kernels are tested against.

Symmetric, one scale per token per KV head, computed when the token is written and never again
(no calibration, nothing that depends on other tokens): `scale = max_d |x[d]| / 127`, stored as
FP16, and `q = round(x / scale)` against that stored scale, so dequantising (`q * scale`)
reproduces exactly the rounding made here. Each element is then off by at most half a step,
`|x - q * scale| <= scale / 2` (plus the FP16 rounding of the scale itself, which the division
against the stored scale absorbs).

Why per token and per head: a K/V vector is written once and read by every later query, and
its magnitude varies a lot between heads and between tokens (attention-sink tokens carry large
keys); one scale per (token, head) follows that at the cost of two bytes per 64-128 values.
Why FP16 scales: with head_dim 64, an FP32 scale would cost 4 of every 68 bytes and leave the
pool at 1.88x the blocks of FP16; FP16 scales give 1.94x, and their 11-bit mantissa rounds a
scale by at most 2^-11, absorbed as above. Their range is the price: a scale is kept within
[2^-14, 65504] (FP16's normal range), so a vector whose largest element is below 127 * 2^-14
(about 0.0078) is quantised on the fixed step 2^-14 (absolute error at most 3e-5, still within
half a step) instead of 1/127 of its own maximum, and one above 127 * 65504 would saturate.
Neither bound is near real K/V: in SmolLM2-135M the largest element of a vector ranges from 1.4
to 20 for K and from 0.045 to 13 for V. BF16 scales would have the range but round the scale to
8 bits and, under Triton's interpreter, convert by truncation (the kernels' tests compare bits).

Rounding is half away from zero (not torch's half to even) because it is what the Triton store
kernels compute without a libdevice call; both agree bit for bit under the interpreter.
"""

from __future__ import annotations

import torch

KV_QMAX = 127
KV_SCALE_DTYPE = torch.float16
# FP16's normal range: a scale below it (an all-zero or nearly zero vector) is raised to it, so no
# scale is ever zero or subnormal (a subnormal scale would round by far more than 2^-11).
KV_SCALE_MIN = torch.finfo(torch.float16).tiny
KV_SCALE_MAX = torch.finfo(torch.float16).max


def round_half_away(x: torch.Tensor) -> torch.Tensor:
    """Round to the nearest integer, ties away from zero (as the Triton kernels do)."""
    return torch.sign(x) * torch.floor(x.abs() + 0.5)


def quantize_kv(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[..., head_dim] float -> (int8 [..., head_dim], FP16 scale [...]), one scale per vector."""
    xf = x.float()
    scale = (xf.abs().amax(dim=-1) / KV_QMAX).clamp(max=KV_SCALE_MAX).to(KV_SCALE_DTYPE)
    scale = scale.clamp(min=KV_SCALE_MIN)
    q = round_half_away(xf / scale.float()[..., None]).clamp(-KV_QMAX, KV_QMAX).to(torch.int8)
    return q, scale


def dequantize_kv(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(int8 [..., head_dim], scale [...]) -> `dtype` [..., head_dim]; multiplied in FP32."""
    return (q.float() * scale.float()[..., None]).to(dtype)
