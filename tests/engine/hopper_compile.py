"""Compile the INT8 matmul kernels to sm_90 cubins without a GPU: `python hopper_compile.py fp16`;
`python hopper_compile.py fp16 kv-store` compiles the INT8 KV store kernels (Hadamard rotation) instead.

Run by tests/engine/test_int8_matmul.py in a process without TRITON_INTERPRET (the interpreter
replaces the kernels by Python functions). Pointers and the sizes and strides of rows are declared
16-aligned, as Triton specialises them at run time; unit strides along K are constants, likewise.
Prints one word per compiled kernel; exits with 3 where this Triton has no ahead-of-time compiler.
"""

from __future__ import annotations

import sys
from typing import Any

try:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
except ImportError as exc:
    print(f"no ahead-of-time Triton compiler: {exc}")
    sys.exit(3)

from worker.engine.kernels import int8_matmul as km

MATMUL_ARGS = ["x_ptr", "w_ptr", "scale_ptr", "bias_ptr", "y_ptr", "part_ptr", "M", "N", "K"]
MATMUL_ARGS += ["stride_xm", "stride_xk", "stride_wn", "stride_wk", "stride_ym"]
ALIGNED = ("N", "K", "stride_xm", "stride_wn", "stride_ym")
SCALE_LAYOUT = ("stride_sb", "stride_ss", "stride_sh", "scale_block")
V_LAYOUT = ("cache_vb", "cache_vs", "cache_vh", "cache_vd", "cache_block")


def compile_for_hopper(
    kernel: Any, types: dict[str, str], constexprs: dict[str, Any], also_aligned: tuple[str, ...] = (),
    **options: int,
) -> Any:  # fmt: skip
    names = [n for n in kernel.arg_names]
    signature = {n: "constexpr" if n in constexprs else types[n] for n in names}
    aligned = [
        i for i, n in enumerate(names)
        if n not in constexprs and (n.endswith("_ptr") or n in ALIGNED or n in also_aligned)
    ]  # fmt: skip
    source = ASTSource(
        fn=kernel,
        signature=signature,
        constexprs={(names.index(n),): v for n, v in constexprs.items()},
        attrs={(i,): [["tt.divisibility", 16]] for i in aligned},
    )
    return triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options)


def main(dtype: str) -> None:
    pointers = [f"*{dtype}", "*i8", f"*{dtype}", f"*{dtype}", f"*{dtype}", "*fp32"]
    types = dict(zip(MATMUL_ARGS, pointers + ["i32"] * 8, strict=True))
    unit = {"stride_xk": 1, "stride_wk": 1}
    for cfg in (km.GEMV_CONFIGS[0], km.GEMV_CONFIGS[3]):
        consts = {**unit, "HAS_BIAS": True, "BLOCK_N": cfg.block_n, "BLOCK_K": cfg.block_k}
        consts |= {"SPLIT_K": cfg.split_k, "FAST": True}
        compiled = compile_for_hopper(km._gemv_kernel, types, consts, num_warps=4)
        assert compiled.asm["cubin"]
        assert "0x4B000000" in compiled.asm["ptx"], "the byte-permute INT8 conversion is not in the kernel"
        print("gemv")
    for cfg in (*km.candidate_configs(20)[:2], km.candidate_configs(200)[-1]):
        consts = {**unit, "HAS_BIAS": False, "BLOCK_M": cfg.block_m, "BLOCK_N": cfg.block_n}
        consts |= {"BLOCK_K": cfg.block_k, "SPLIT_K": cfg.split_k}
        consts["PRECISION"] = "ieee" if dtype == "fp32" else "tf32"
        consts["FAST"] = dtype == "fp16"
        compiled = compile_for_hopper(
            km._dot_kernel, types, consts, num_warps=cfg.num_warps, num_stages=cfg.num_stages
        )
        assert "cp.async" in compiled.asm["ptx"], "the K loop's loads are not pipelined"
        permuted = "0x64646464" in compiled.asm["ptx"]
        assert permuted == (dtype == "fp16"), "FP16 (only) takes the byte-permute conversion"
        print("dot")
    reduce_types = {"part_ptr": "*fp32", "scale_ptr": f"*{dtype}", "bias_ptr": f"*{dtype}"}
    reduce_types |= {"y_ptr": f"*{dtype}", "M": "i32", "N": "i32", "stride_ym": "i32"}
    consts = {"HAS_BIAS": True, "SPLIT_K": 4, "BLOCK": 1024}
    assert compile_for_hopper(km._reduce_kernel, reduce_types, consts, num_warps=4).asm["cubin"]
    print("reduce")


def main_kv_store(dtype: str) -> None:
    """The quantising, rotating store kernels at SmolLM2's, Llama-3.2-1B's and a head_dim 128 shape.

    Prints `store` and `rope` per shape, each followed by `mma` where the rotation's tl.dot runs on the
    tensor cores (FP16/BF16) or `fma` where it does not (FP32, IEEE products)."""
    from worker.engine.kernels import kv_store, rope_store

    caches = {"k_cache_ptr": "*i8", "v_cache_ptr": "*i8", "k_scale_ptr": "*fp16", "v_scale_ptr": "*fp16"}
    caches["slot_ptr"] = "*i64"
    for kv_heads, heads, dim in ((3, 9, 64), (8, 32, 64), (8, 32, 128)):
        rotation = {"QUANT": True, "IEEE": dtype == "fp32", "NORM": dim**-0.5}
        types = {"key_ptr": f"*{dtype}", "value_ptr": f"*{dtype}", **caches}
        types |= {n: "i32" for n in ("stride_kt", "stride_kh", "stride_vt", "stride_vh", "stride_slot")}
        types |= {n: "i32" for n in SCALE_LAYOUT + V_LAYOUT}
        consts = {"NUM_KV_HEADS": kv_heads, "HEAD_DIM": dim, "BLOCK_H": 16, "BLOCK_D": dim, **rotation}
        ptx = compile_for_hopper(kv_store._store_kv_kernel, types, consts, num_warps=4).asm["ptx"]
        print("store", "mma" if "mma" in ptx else "fma")
        types = {n: f"*{dtype}" for n in ("qkv_ptr", "cos_ptr", "sin_ptr", "q_out_ptr")} | caches
        types |= {n: "i32" for n in ("stride_t", "stride_cos", "stride_qo", "stride_slot", *SCALE_LAYOUT)}
        types |= {n: "i32" for n in V_LAYOUT}
        consts = {"NUM_HEADS": heads, "NUM_KV_HEADS": kv_heads, "HEAD_DIM": dim, "BLOCK_H": max(heads, 16)}
        consts |= {"BLOCK_KV": 16, "HALF": dim // 2, **rotation}
        ptx = compile_for_hopper(rope_store._rope_store_kernel, types, consts, num_warps=4).asm["ptx"]
        print("rope", "mma" if "mma" in ptx else "fma")


def main_decode(dtype: str) -> None:
    """The paged decode attention kernel over a float and an INT8 cache at Llama-3.2-1B's shape.

    Prints `decode` and the number of asynchronous copies (cp.async) in the compiled loop's IR, per
    cache: the pipeline copies each of the loop's tile loads once before the loop and once inside it,
    so a float cache (K, V) gives 4 and an INT8 cache (K, V and their scales, `load_scale_pairs`) 8,
    with the hardware INT8 conversion and (FP16 only) with the byte-permute one.
    Scale loads the pipeline leaves synchronous (16-bit loads did) give 4 there too."""
    from worker.engine.kernels import paged_decode

    strides = ["stride_qt", "stride_qh", "stride_kb", "stride_ks", "stride_vs", "stride_vh", "stride_vd"]
    strides += ["stride_sb", "stride_sh", "stride_bt"]
    strides += ["stride_ot", "stride_oh"]
    variants = [(dtype, False), ("i8", False)] + ([("i8", True)] if dtype == "fp16" else [])
    for cache, permute in variants:
        scales = "*fp16" if cache == "i8" else f"*{cache}"
        types = {"q_ptr": f"*{dtype}", "k_cache_ptr": f"*{cache}", "v_cache_ptr": f"*{cache}"}
        types |= {"k_scale_ptr": scales, "v_scale_ptr": scales, "block_tables_ptr": "*i32"}
        types |= {"context_lens_ptr": "*i32", "out_ptr": f"*{dtype}", "part_out_ptr": "*fp32"}
        types |= {"part_lse_ptr": "*fp32", "qk_scale": "fp32", **{n: "i32" for n in strides}}
        consts = {"NUM_SPLITS": 1, "GROUP": 4, "HEAD_DIM": 64, "BLOCK_SIZE": 16, "BLOCK_G": 16, "BLOCK_D": 64}
        consts |= {"BLOCK_N": 64, "QUANT": cache == "i8", "FAST_CVT": permute, "UNROTATE": cache == "i8"}
        consts["NORM"] = 0.125
        # An INT8 cache's V is transposed per block (unit stride over the slots, which Triton
        # specialises as a constant); a float cache's has unit stride over head_dim.
        consts |= {"V_T": cache == "i8", "stride_vs" if cache == "i8" else "stride_vd": 1}
        consts["DOT_PRECISION"] = "ieee" if dtype == "fp32" else None
        aligned = tuple(n for n in strides if n != "stride_bt")  # as Triton specialises them at run time
        types = {n: t for n, t in types.items() if n not in consts}
        compiled = compile_for_hopper(
            paged_decode._paged_decode_kernel, types, consts, aligned, num_warps=4, num_stages=2
        )
        assert ("0x64646464" in compiled.asm["ptx"]) == permute, "the byte-permute conversion, where asked"
        print("decode", compiled.asm["ttgir"].count("ttg.async_copy_global_to_local"))


if __name__ == "__main__":
    if sys.argv[2:] == ["kv-store"]:
        main_kv_store(sys.argv[1])
    elif sys.argv[2:] == ["decode"]:
        main_decode(sys.argv[1])
    else:
        main(sys.argv[1])
