"""Weight-only INT8 matmul for few rows: `y[M, N] = (x[M, K] @ W_q[N, K].T) * scale[N] (+ bias)`.

A decode step multiplies a handful of rows by every weight of the model, so it is bound by reading
the weights; with INT8 weights it reads half the bytes of FP16, but only if nothing writes a float
copy of the weight first (what `F.linear(x, W_q.to(x.dtype))` does). Here the INT8 tiles are loaded
and converted in registers (by byte permutes on CUDA, `int8_convert.py`), products accumulate in
FP32, and the per-channel scale (and the bias) is applied once to each output, rounded to x's dtype
once.

Two kernels share the layout (W_q row-major [N, K], one program per BLOCK_N outputs, per BLOCK_M
rows and per slice of K):

- `_gemv_kernel` (BLOCK_M = 1, one row): each program sums `w * x` over [BLOCK_N, BLOCK_K] tiles
  elementwise and reduces once at the end, a GEMV with no tensor cores (nothing to share);
- `_dot_kernel` (BLOCK_M >= 16, `tl.dot`'s minimum): rows padded to BLOCK_M, the INT8 tile cast to
  x's dtype (exact: |q| <= 127) for the tensor cores; FP32 inputs multiply in IEEE FP32, not TF32.

SPLIT_K > 1 splits K over more programs (the Llama-3.2-1B down projection has only 2,048 outputs,
too few tiles to keep every SM reading): each slice writes FP32 partial sums to a workspace, and
`_reduce_kernel` adds them in a fixed order, then scales, adds the bias and casts: deterministic,
unlike atomics. Tiles of M, N and K need not divide the shape (masked).

The config is chosen per (device, row bucket, N, K, dtype, bias) by timing a small set on the first
call (`triton.testing.do_bench`), or taken from `default_config` where timing is not possible (CPU
under the interpreter, or during a CUDA graph capture: the engine runs each decode bucket eagerly
before capturing it, so its shapes are tuned by then). Launches then allocate only the output and
a workspace of fixed size per shape, so they are CUDA-graph capturable.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from triton.runtime.errors import OutOfResources

from worker.engine.kernels.int8_convert import int8_to_f16, int8_to_f32


@dataclass(frozen=True)
class Int8MatmulConfig:
    block_m: int  # 1: the GEMV kernel; 16, 32 or 64: the tl.dot kernel
    block_n: int
    block_k: int
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 3
    fast_convert: bool = True  # on CUDA: the byte-permute conversion (`int8_convert.py`); False: cvt


# Candidates timed per shape on the GPU; few, since each compiles once and is timed once per shape.
# The GEMV kernel loads without software pipelining (no tl.dot to feed), so its bytes in flight
# come from resident programs: split K keeps a few per SM where N alone gives one (o, down). The
# tl.dot kernel pipelines its loads (cp.async, num_stages), so one row also tries it, padded to 16.
GEMV_CONFIGS = (
    Int8MatmulConfig(1, 16, 512),
    Int8MatmulConfig(1, 32, 256),
    Int8MatmulConfig(1, 16, 512, split_k=2),
    Int8MatmulConfig(1, 16, 512, split_k=4),
    Int8MatmulConfig(1, 16, 256, split_k=4),
    Int8MatmulConfig(1, 16, 256, split_k=8),
    Int8MatmulConfig(16, 64, 128, split_k=1, num_stages=4),
    Int8MatmulConfig(16, 64, 128, split_k=4, num_stages=4),
    # Fastest for Llama-3.2-1B's QKV and o (K = 2,048 in one tile row) and gate/up in a sweep on an
    # H200 (a removed study; docs/benchmarks.md, "INT8 weights", keeps its conclusion).
    Int8MatmulConfig(1, 16, 1024),
    Int8MatmulConfig(1, 64, 256, num_warps=8),
)
DOT_TILES = (  # (block_n, block_k, split_k, num_stages) for each row bucket
    (32, 256, 1, 3),
    (64, 128, 1, 3),
    (128, 128, 1, 3),
    (64, 128, 2, 4),
    (64, 128, 4, 4),
    (32, 128, 4, 4),
)
# Steps of more than 64 rows (decode at larger batches) tile M by 128: each weight tile is read and
# converted once per 128 rows instead of once per 64, which is what the conversion costs there.
# (block_n, block_k, num_warps, num_stages); a config the GPU cannot hold is skipped when tuning.
WIDE_TILES = (
    (64, 64, 4, 3),
    (64, 128, 8, 3),
    (128, 64, 8, 3),
    (128, 128, 8, 3),
)


def row_bucket(m: int) -> int:
    """BLOCK_M for `m` rows: 1 (GEMV), else 16, 32, 64 or 128 (a larger M tiles over BLOCK_M = 128)."""
    if m <= 1:
        return 1
    return min(128, max(16, triton.next_power_of_2(m)))


def candidate_configs(m: int) -> tuple[Int8MatmulConfig, ...]:
    block_m = row_bucket(m)
    if block_m == 1:
        return GEMV_CONFIGS
    if block_m == 128:
        return tuple(Int8MatmulConfig(128, n, k, 1, w, st) for n, k, w, st in WIDE_TILES)
    return tuple(Int8MatmulConfig(block_m, n, k, s, 4, st) for n, k, s, st in DOT_TILES)


def default_config(m: int, n: int, k: int) -> Int8MatmulConfig:
    """A config without timing: split K when the output tiles alone are fewer than ~256 programs."""
    block_m = row_bucket(m)
    block_n, block_k = (32, 256) if block_m == 1 else (64, 128)
    tiles = triton.cdiv(n, block_n) * triton.cdiv(m, block_m)
    split = 1
    while split < 4 and tiles * split < 256 and k >= 2 * split * block_k:
        split *= 2
    return Int8MatmulConfig(block_m, block_n, block_k, split)


@triton.jit
def _epilogue(acc, offs_m, offs_n, M, N, scale_ptr, bias_ptr, y_ptr, stride_ym, HAS_BIAS: tl.constexpr):
    """acc [BLOCK_M, BLOCK_N] FP32 -> y = acc * scale (+ bias), one rounding to y's dtype."""
    n_mask = offs_n < N
    scale = tl.load(scale_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
    out = acc * scale[None, :]
    if HAS_BIAS:
        out += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    mask = (offs_m[:, None] < M) & n_mask[None, :]
    tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :], out.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _epilogue_row(acc, row, offs_n, N, scale_ptr, bias_ptr, y_ptr, stride_ym, HAS_BIAS: tl.constexpr):
    """acc [BLOCK_N] FP32 of one row -> y[row] = acc * scale (+ bias), one rounding to y's dtype."""
    n_mask = offs_n < N
    out = acc * tl.load(scale_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        out += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + row * stride_ym + offs_n, out.to(y_ptr.dtype.element_ty), mask=n_mask)


@triton.jit
def _gemv_kernel(
    x_ptr, w_ptr, scale_ptr, bias_ptr, y_ptr, part_ptr, M, N, K,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_ym,
    HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
    FAST: tl.constexpr,
):  # fmt: skip
    pid_n, pid_k, row = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    k_per_split = tl.cdiv(tl.cdiv(K, SPLIT_K), BLOCK_K) * BLOCK_K
    k_start = pid_k * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)
    acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < K
        x = tl.load(x_ptr + row * stride_xm + offs_k * stride_xk, mask=k_mask, other=0.0)
        w = tl.load(
            w_ptr + offs_n[:, None] * stride_wn + offs_k[None, :] * stride_wk,
            mask=n_mask[:, None] & k_mask[None, :], other=0,
        )  # fmt: skip
        acc += int8_to_f32(w, FAST) * x.to(tl.float32)[None, :]
    total = tl.sum(acc, axis=1)
    if SPLIT_K == 1:
        _epilogue_row(total, row, offs_n, N, scale_ptr, bias_ptr, y_ptr, stride_ym, HAS_BIAS)
    else:
        tl.store(part_ptr + (pid_k * M + row) * N + offs_n, total, mask=n_mask)


@triton.jit
def _dot_kernel(
    x_ptr, w_ptr, scale_ptr, bias_ptr, y_ptr, part_ptr, M, N, K,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_ym,
    HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr, PRECISION: tl.constexpr, FAST: tl.constexpr,
):  # fmt: skip
    pid_n, pid_k, pid_m = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask, n_mask = offs_m < M, offs_n < N
    k_per_split = tl.cdiv(tl.cdiv(K, SPLIT_K), BLOCK_K) * BLOCK_K
    k_start = pid_k * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < K
        x = tl.load(
            x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
            mask=m_mask[:, None] & k_mask[None, :], other=0.0,
        )  # fmt: skip
        w = tl.load(  # [BLOCK_K, BLOCK_N]: W_q transposed by addressing
            w_ptr + offs_k[:, None] * stride_wk + offs_n[None, :] * stride_wn,
            mask=k_mask[:, None] & n_mask[None, :], other=0,
        )  # fmt: skip
        if FAST:  # x is FP16
            acc = tl.dot(x, int8_to_f16(w, FAST), acc, input_precision=PRECISION)
        else:
            acc = tl.dot(x, w.to(x.dtype), acc, input_precision=PRECISION)
    if SPLIT_K == 1:
        _epilogue(acc, offs_m, offs_n, M, N, scale_ptr, bias_ptr, y_ptr, stride_ym, HAS_BIAS)
    else:
        part = part_ptr + (pid_k * M + offs_m[:, None]) * N + offs_n[None, :]
        tl.store(part, acc, mask=m_mask[:, None] & n_mask[None, :])


@triton.jit
def _reduce_kernel(
    part_ptr, scale_ptr, bias_ptr, y_ptr, M, N, stride_ym,
    HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0)
    offs_n = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs_n < N
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for s in tl.static_range(SPLIT_K):
        acc += tl.load(part_ptr + (s * M + row) * N + offs_n, mask=mask, other=0.0)
    _epilogue_row(acc, row, offs_n, N, scale_ptr, bias_ptr, y_ptr, stride_ym, HAS_BIAS)


def _launch(
    x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
    y: torch.Tensor, cfg: Int8MatmulConfig,
) -> None:  # fmt: skip
    m, k = x.shape
    n = weight.shape[0]
    split = cfg.split_k
    part = torch.empty((split, m, n) if split > 1 else (1,), dtype=torch.float32, device=x.device)
    bias_arg = bias if bias is not None else scale  # never read without HAS_BIAS
    common = (
        x, weight, scale, bias_arg, y, part, m, n, k,
        x.stride(0), x.stride(1), weight.stride(0), weight.stride(1), y.stride(0),
    )  # fmt: skip
    fast = cfg.fast_convert and x.is_cuda
    if cfg.block_m == 1:
        _gemv_kernel[(triton.cdiv(n, cfg.block_n), split, m)](
            *common, HAS_BIAS=bias is not None, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, SPLIT_K=split,
            FAST=fast, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )  # fmt: skip
    else:
        _dot_kernel[(triton.cdiv(n, cfg.block_n), split, triton.cdiv(m, cfg.block_m))](
            *common, HAS_BIAS=bias is not None, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
            BLOCK_K=cfg.block_k, SPLIT_K=split, PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
            FAST=fast and x.dtype == torch.float16, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )  # fmt: skip
    if split > 1:
        block = min(1024, triton.next_power_of_2(n))
        _reduce_kernel[(m, triton.cdiv(n, block))](
            part, scale, bias_arg, y, m, n, y.stride(0), HAS_BIAS=bias is not None, SPLIT_K=split,
            BLOCK=block, num_warps=4,
        )  # fmt: skip


_tuned: dict[tuple[object, ...], Int8MatmulConfig] = {}


def _tune(
    x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None, y: torch.Tensor
) -> Int8MatmulConfig:
    """The fastest candidate for this shape on this GPU (each timed with the L2 flushed, as in decode)."""
    from triton.testing import do_bench

    m, k = x.shape
    timings = []
    with torch.cuda.device(x.device):
        for cfg in candidate_configs(m):
            if k < cfg.split_k * cfg.block_k:
                continue  # K slices shorter than one tile
            run = lambda cfg=cfg: _launch(x, weight, scale, bias, y, cfg)  # noqa: E731
            try:
                timings.append((do_bench(run, warmup=5, rep=20, return_mode="median"), cfg))
            except OutOfResources:
                continue  # more shared memory or registers than this GPU has
    return min(timings, key=lambda t: t[0])[1] if timings else default_config(m, weight.shape[0], k)


def choose_config(
    x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None, y: torch.Tensor
) -> Int8MatmulConfig:
    m, k = x.shape
    n = weight.shape[0]
    if x.device.type != "cuda":
        return default_config(m, n, k)
    key = (x.device, row_bucket(m), n, k, x.dtype, bias is not None)
    cfg = _tuned.get(key)
    if cfg is None:
        if torch.cuda.is_current_stream_capturing():
            return default_config(m, n, k)  # timing syncs, which a capture forbids
        cfg = _tuned[key] = _tune(x, weight, scale, bias, y)
    return cfg


def int8_matmul(
    x: torch.Tensor,
    weight: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    config: Int8MatmulConfig | None = None,
) -> torch.Tensor:
    """`(x @ weight.T) * scale (+ bias)` in x's dtype: x [M, K] float, weight [N, K] int8, scale and
    bias [N] (any float dtype). `config` overrides the tuned choice (tests)."""
    if x.dim() != 2 or weight.dim() != 2 or x.shape[1] != weight.shape[1]:
        raise ValueError(f"int8_matmul: x {tuple(x.shape)} and weight {tuple(weight.shape)} do not match")
    if weight.dtype != torch.int8:
        raise TypeError(f"int8_matmul: weight must be int8, not {weight.dtype}")
    m, n = x.shape[0], weight.shape[0]
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return y
    if x.shape[1] == 0:
        return y.zero_() if bias is None else y.copy_(bias.expand(m, n))
    cfg = config or choose_config(x, weight, scale, bias, y)
    _launch(x, weight, scale, bias, y, cfg)
    return y
