"""The weight-only INT8 matmul kernel (`kernels/int8_matmul.py`) against `x @ dequantized_weight.T`.

Without a GPU it runs on CPU tensors under Triton's interpreter (tests/conftest.py sets
TRITON_INTERPRET=1); tests/gpu/test_int8_matmul_gpu.py repeats it in FP16/BF16 on the GPU, inside
`Int8Linear` and in a CUDA graph.

Tolerance: the reference is computed in float64 from exactly the operands the kernel sees (x, the
INT8 weight times its scale, the bias), so the only differences are the kernel's FP32 arithmetic
and the final rounding to x's dtype. A sum of K products in FP32, any order or split, errs by at
most gamma_K * sum_i |x_i w_i| with gamma_K ~ K * 2^-24; the scale and bias add two more FP32
roundings, and the output rounding at most half an ulp of |y| <= that same sum of magnitudes. So
|y - ref| <= mag * ((K + 2) * 2^-24 + u) with mag = |x| @ |W|.T + |bias| and u the unit roundoff
of x's dtype: a rigorous bound, not a tuned one.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from worker.engine.kernels import kernels_usable

pytest.importorskip("triton")
if not kernels_usable(torch.device("cpu")) and not torch.cuda.is_available():
    pytest.skip("Triton kernels need a GPU or TRITON_INTERPRET=1", allow_module_level=True)

from worker.engine.kernels.int8_matmul import (  # noqa: E402
    GEMV_CONFIGS,
    Int8MatmulConfig,
    candidate_configs,
    default_config,
    int8_matmul,
    row_bucket,
)
from worker.engine.quant import Int8Linear  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
SKIP_EXIT = 3  # hopper_compile.py: this Triton cannot compile ahead of time here
UNIT_ROUNDOFF = {torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}


def operands(
    m: int, n: int, k: int, dtype: torch.dtype, bias: bool, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """x [m, k], an INT8 weight [n, k] with per-row scales as `Int8Linear` builds them, a bias."""
    gen = torch.Generator().manual_seed(seed)
    linear = torch.nn.Linear(k, n, bias=bias, dtype=dtype)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(n, k, generator=gen) * torch.rand(n, 1, generator=gen))
        if linear.bias is not None:
            linear.bias.copy_(torch.randn(n, generator=gen))
    module = Int8Linear.from_linear(linear)
    x = torch.randn(m, k, generator=gen).to(dtype)
    return x, module.weight, module.scale, module.bias


def check(
    y: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None
) -> None:
    assert y.dtype == x.dtype and y.shape == (x.shape[0], weight.shape[0])
    w = weight.double() * scale.double()[:, None]
    ref = x.double() @ w.T
    mag = x.double().abs() @ w.abs().T
    if bias is not None:
        ref, mag = ref + bias.double(), mag + bias.double().abs()
    k = x.shape[1]
    bound = mag * ((k + 2) * 2.0**-24 + UNIT_ROUNDOFF[x.dtype])
    excess = (y.double() - ref).abs() - bound
    assert excess.max().item() <= 0, f"max error beyond bound: {excess.max().item():.3g}"


@pytest.mark.parametrize("m", [1, 3, 16, 33])
@pytest.mark.parametrize(("n", "k"), [(96, 256), (70, 200), (40, 1000)])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_matches_dequantized_reference(m: int, n: int, k: int, bias: bool, dtype: torch.dtype):
    x, weight, scale, b = operands(m, n, k, dtype, bias, seed=m * 1000 + n + k)
    check(int8_matmul(x, weight, scale, b), x, weight, scale, b)


@pytest.mark.parametrize("bias", [False, True])
def test_bfloat16_single_row(bias: bool):
    # The interpreter casts int8 -> bfloat16 and multiplies bfloat16 tiles wrongly (numpy has no
    # bfloat16), so only the GEMV kernel (one row, products in FP32) is checked in BF16 here;
    # tests/gpu checks the tl.dot kernel in BF16.
    x, weight, scale, b = operands(1, 70, 300, torch.bfloat16, bias, seed=3)
    check(int8_matmul(x, weight, scale, b), x, weight, scale, b)


@pytest.mark.parametrize("m", [1, 5, 20, 40, 100])
def test_every_candidate_config(m: int):
    """Each config the GPU may time (split K included) computes the same product; K = 600 is a
    multiple of none of the K tiles, and splits of 4 x 256 leave the last slice empty."""
    x, weight, scale, b = operands(m, 90, 600, torch.float32, True, seed=m)
    configs = candidate_configs(m)
    assert {c.block_m for c in configs} == ({1, 16} if m == 1 else {row_bucket(m)})
    for cfg in configs:
        check(int8_matmul(x, weight, scale, b, config=cfg), x, weight, scale, b)


def test_gemv_kernel_on_several_rows_and_split_k():
    # BLOCK_M = 1 with M > 1 runs one program per row (never chosen by the tuner, still exact).
    x, weight, scale, b = operands(3, 50, 700, torch.float16, True, seed=11)
    for cfg in (GEMV_CONFIGS[0], Int8MatmulConfig(1, 16, 64, split_k=4)):
        check(int8_matmul(x, weight, scale, b, config=cfg), x, weight, scale, b)


def test_strided_activations_and_a_fused_weight_slice():
    """x as a column slice of a wider tensor, W_q a row slice of a fused (concatenated) weight."""
    parts = [operands(1, n, 160, torch.float32, False, seed=n)[1:3] for n in (48, 16, 16)]
    fused = Int8Linear(160, 80)
    fused.weight = torch.cat([w for w, _ in parts])
    fused.scale = torch.cat([s for _, s in parts])
    weight, scale = fused.weight[48:64], fused.scale[48:64]
    wide = torch.randn(7, 400, generator=torch.Generator().manual_seed(1))
    x = wide[:, 100:260]
    assert not x.is_contiguous()
    for cfg in (None, Int8MatmulConfig(16, 32, 64, split_k=2)):
        check(int8_matmul(x, weight, scale, config=cfg), x, weight, scale, None)
    row = wide[2:3, ::2][:, :160]  # one row, stride 2 along K
    check(int8_matmul(row, weight, scale), row, weight, scale, None)


def test_default_config_splits_k_only_when_output_tiles_are_few():
    assert default_config(1, 16384, 2048).split_k == 1  # gate/up: 512 tiles of 32 outputs
    assert default_config(1, 2048, 8192).split_k == 4  # down: 64 tiles
    assert default_config(1, 2048, 256).split_k == 1  # too short to split
    assert default_config(64, 2048, 2048) == Int8MatmulConfig(64, 64, 128, split_k=4)
    assert [row_bucket(m) for m in (1, 2, 16, 17, 33, 64, 65, 500)] == [1, 16, 16, 32, 64, 64, 128, 128]


def test_empty_and_invalid_inputs():
    x, weight, scale, b = operands(2, 8, 32, torch.float32, True, seed=0)
    assert int8_matmul(x[:0], weight, scale, b).shape == (0, 8)
    with pytest.raises(TypeError, match="int8"):
        int8_matmul(x, weight.float(), scale)
    with pytest.raises(ValueError, match="do not match"):
        int8_matmul(x[:, :16], weight, scale)


@pytest.mark.parametrize("dtype", ["fp16", "bf16", "fp32"])
def test_kernels_compile_for_hopper(dtype: str):
    """Compile each kernel to a sm_90 cubin (no GPU needed; `hopper_compile.py`, in a process without
    the interpreter): catches what the interpreter does not, such as a construct the compiler rejects,
    and checks that the tl.dot kernel's K loop is pipelined."""
    env = {**os.environ, "TRITON_INTERPRET": "0", "PYTHONPATH": str(ROOT)}
    script = Path(__file__).with_name("hopper_compile.py")
    done = subprocess.run([sys.executable, str(script), dtype], env=env, capture_output=True, text=True)
    if done.returncode == SKIP_EXIT:
        pytest.skip(done.stdout.strip())
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == ["gemv", "gemv", "dot", "dot", "dot", "reduce"]


def test_tuning_times_each_candidate_and_keeps_the_fastest(monkeypatch: pytest.MonkeyPatch):
    """`_tune` with a fake clock (on CPU, where choose_config never tunes): each candidate runs and
    is timed once; splits leaving K slices shorter than a tile are not tried; the fastest is kept."""
    import contextlib

    import triton.testing

    from worker.engine.kernels import int8_matmul as km

    x, weight, scale, b = operands(1, 64, 1024, torch.float32, False, seed=5)
    y = torch.full((1, 64), float("nan"))
    tried: list[km.Int8MatmulConfig] = []

    def fake_bench(fn, **kwargs):  # type: ignore[no-untyped-def]
        fn()
        check(y, x, weight, scale, None)  # every candidate wrote the right product
        y.fill_(float("nan"))
        tried.append(fn.__defaults__[0])
        return {km.GEMV_CONFIGS[4]: 1.0}.get(tried[-1], 2.0)

    monkeypatch.setattr(triton.testing, "do_bench", fake_bench)
    monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())
    assert km._tune(x, weight, scale, None, y) == km.GEMV_CONFIGS[4]
    assert tried == [c for c in km.GEMV_CONFIGS if c.split_k * c.block_k <= 1024]
    assert km.GEMV_CONFIGS[5] not in tried  # 8 slices of 256 need K >= 2048
