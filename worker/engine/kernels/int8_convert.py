"""INT8 -> FP32 / FP16 conversion inside Triton kernels, at the rate HBM delivers INT8 bytes.

The hardware's integer-to-float conversion (I2F) runs at a quarter of the
FP32 rate on Hopper, too slow to keep up with the HBM bytes of a weight-only GEMV: with it these
the INT8 matmul read ~1.6 TB/s of INT8 where an FP16 GEMV reads ~3.1 TB/s (H200). As FasterTransformer's and
TensorRT-LLM's weight-only kernels do, four INT8 values in one register are biased to unsigned
(xor 0x80), each byte is permuted (prmt, full rate) into the mantissa of a float whose exponent
makes its value 2^23 + u (FP32) or 1024 + u (FP16), and one subtraction removes the offset: exact,
since |w| <= 127 fits either mantissa. PTX cannot run under the CPU interpreter, so callers pass
FAST only for CUDA tensors; the FP16 form is for FP16 operands only (BF16's 7-bit mantissa cannot
hold 128 + u exactly).

Used by the weight-only INT8 matmul (`int8_matmul.py`) and by the INT8 KV cache's attention loop
(`paged_softmax.py`, FP16 queries), where it measured faster once that loop's loads were pipelined
(H200, docs/benchmarks.md).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def int8_to_f32(w, FAST: tl.constexpr):
    """`w` (INT8) as FP32; FAST: the byte-permute form (CUDA only)."""
    if FAST:
        return tl.inline_asm_elementwise(
            asm="""{
            .reg .b32 t, k, off;
            xor.b32 t, $4, 0x80808080;
            mov.b32 k, 0x4B000000;
            mov.b32 off, 0x4B000080;
            prmt.b32 $0, t, k, 0x7540;
            prmt.b32 $1, t, k, 0x7541;
            prmt.b32 $2, t, k, 0x7542;
            prmt.b32 $3, t, k, 0x7543;
            sub.f32 $0, $0, off;
            sub.f32 $1, $1, off;
            sub.f32 $2, $2, off;
            sub.f32 $3, $3, off;
            }""",
            constraints="=r,=r,=r,=r,r",
            args=[w],
            dtype=tl.float32,
            is_pure=True,
            pack=4,
        )
    return w.to(tl.float32)


@triton.jit
def int8_to_f16(w, FAST: tl.constexpr):
    """`w` (INT8) as FP16; FAST: the byte-permute form (CUDA only)."""
    if FAST:
        return tl.inline_asm_elementwise(
            asm="""{
            .reg .b32 t, k, off;
            xor.b32 t, $2, 0x80808080;
            mov.b32 k, 0x64646464;
            mov.b32 off, 0x64806480;
            prmt.b32 $0, t, k, 0x4140;
            prmt.b32 $1, t, k, 0x4342;
            sub.f16x2 $0, $0, off;
            sub.f16x2 $1, $1, off;
            }""",
            constraints="=r,=r,r",
            args=[w],
            dtype=tl.float16,
            is_pure=True,
            pack=4,
        )
    return w.to(tl.float16)
