"""INT8 KV cache (`LLM_KV_DTYPE=int8`): the quantise/dequantise reference the kernels are tested against.

Each KV head's K (after RoPE) and V vector is first rotated by the normalised Hadamard matrix H of
size head_dim (`kv_rotation`: x -> x H), then quantised symmetrically with one scale per token per
KV head, computed when the token is written and never again (no calibration, nothing that depends
on other tokens): `scale = max_d |y[d]| / 127`, stored as FP16, and `q = round(y / scale)` against
that stored scale, so dequantising (`q * scale`) reproduces exactly the rounding made here. Each
element of the rotated vector y is then off by at most half a step, `|y - q * scale| <= scale / 2`
(plus the FP16 rounding of the scale itself, which the division against the stored scale absorbs).

Why the rotation: H is orthonormal, so attention reads the cache unchanged but for the rounding
when the queries are rotated too ((q H).(k H) = q.k) and the output multiplied by H^T
((P (V H)) H^T = P V). It spreads a key's few large channels over all of them, so one scale per
vector rounds it about half as coarsely (in SmolLM2-135M, K's relative error 1.15% -> 0.55%; see
docs/benchmarks.md, "INT8 KV cache"). Sylvester's construction needs a power-of-two head_dim,
which the INT8 cache therefore requires (`check_head_dim`; SmolLM2 and Llama-3.2 use 64).

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
kernels compute without a libdevice call; both agree bit for bit under the interpreter on the
unrotated values. The kernels rotate in registers (`kernels/kv_store.py`, `kernels/rope_store.py`),
summing in another order than the torch matmul, so a rotated value may differ in its last bit and
round to the neighbouring INT8 step.
"""

from __future__ import annotations

import math

import torch

KV_QMAX = 127
KV_SCALE_DTYPE = torch.float16
# FP16's normal range: a scale below it (an all-zero or nearly zero vector) is raised to it, so no
# scale is ever zero or subnormal (a subnormal scale would round by far more than 2^-11).
KV_SCALE_MIN = torch.finfo(torch.float16).tiny
KV_SCALE_MAX = torch.finfo(torch.float16).max


def hadamard_matrix(
    n: int, dtype: torch.dtype = torch.float32, device: torch.device | None = None, random_signs: bool = False
) -> torch.Tensor:
    """The normalised n x n Hadamard matrix of Sylvester's construction (n a power of two).

    Orthonormal (H H^T = I): rotating both q and k by it (x -> x H) keeps q.k, and multiplying an
    attention output by H^T undoes the rotation of V. Sylvester's matrix is also symmetric. With
    `random_signs` its rows are multiplied by fixed pseudo-random signs (diag(+-1) H, seed 0, as
    QuaRot randomises it): still orthonormal, no longer symmetric.
    """
    if n < 1 or n & (n - 1):
        raise ValueError(f"a Sylvester Hadamard matrix needs a power-of-two size; got {n}")
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    if random_signs:
        signs = torch.randint(0, 2, (n,), generator=torch.Generator().manual_seed(0)) * 2 - 1
        h = signs.double()[:, None] * h
    return (h / math.sqrt(n)).to(dtype=dtype, device=device)


def check_head_dim(head_dim: int) -> None:
    """Refuse a head_dim the INT8 cache cannot rotate (Sylvester's H needs a power of two)."""
    if head_dim < 1 or head_dim & (head_dim - 1):
        raise ValueError(
            f"LLM_KV_DTYPE=int8 needs a power-of-two head_dim (K/V are rotated by a Hadamard matrix "
            f"before quantising); this model's head_dim is {head_dim}: use LLM_KV_DTYPE=auto, fp16 or bf16"
        )


def kv_rotation(head_dim: int, device: torch.device | None = None) -> torch.Tensor:
    """The FP32 [head_dim, head_dim] matrix H an INT8 cache applies to K and V before quantising.

    Each head's K and V are stored as x H (quantised); the attention rotates the query the same way
    and multiplies its output by H^T, so attention is unchanged but for the rounding (module doc).
    Sylvester's H is symmetric, so H^T = H.
    """
    check_head_dim(head_dim)
    return hadamard_matrix(head_dim, torch.float32, device)


def rotate(x: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
    """x [..., head_dim] -> x @ rotation in FP32, back in x's dtype (queries in, outputs out)."""
    return (x.float() @ rotation).to(x.dtype)


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
