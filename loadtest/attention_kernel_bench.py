"""Paged decode attention kernel alone: FP16 vs INT8 KV, against the HBM roofline, over launch configs.

One layer of Llama-3.2-1B's attention shape (32 query heads, 8 KV heads, head_dim 64), B sequences
of `--context` tokens each, their blocks scattered at random over the pool (as a long-running paged
cache holds them). For each KV format the kernel is timed with the engine's launch config (its split
count, and BLOCK_N, warps and stages of `paged_decode.LAUNCH_FLOAT` / `LAUNCH_INT8`) and with every
config of a small sweep; the table shows the engine's config, for INT8 the same with the hardware INT8->FP16
conversion instead of the byte-permute one the engine uses (`int8_convert.py`) and with V laid out
position-major like K instead of transposed per block (`paged_softmax.v_tile_transposed`), and the
fastest (the JSON holds every config's time). INT8 scales are head-major and V transposed, as the
engine's `KVCache` holds them. Bytes are what one launch must read: K and V (and, for INT8, their
FP16 scales), so "of HBM" is the share of the GPU's bandwidth the kernel reaches.

  python loadtest/attention_kernel_bench.py --batch-sizes 64,256 --contexts 1024,8192 \\
      --json-out attention.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from decode_step_bench import hbm_tb_s  # noqa: E402

from worker.engine.kernels import num_decode_splits  # noqa: E402
from worker.engine.kernels.paged_decode import LAUNCH_FLOAT, LAUNCH_INT8  # noqa: E402

HEADS, KV_HEADS, HEAD_DIM, BLOCK_SIZE = 32, 8, 64, 16
ENGINE_LAUNCH = {"fp16": LAUNCH_FLOAT, "int8": LAUNCH_INT8}  # paged_decode_attention's defaults
SWEEP = {"block_n": (32, 64, 128), "num_warps": (2, 4, 8), "num_stages": (2, 3)}


def build_inputs(batch: int, context: int, fmt: str, device: torch.device) -> dict[str, Any]:
    """Query, cache, scales and block tables for `batch` sequences of `context` tokens in format `fmt`."""
    gen = torch.Generator(device=device).manual_seed(0)
    blocks_per_seq = -(-context // BLOCK_SIZE)
    num_blocks = batch * blocks_per_seq
    shape = (num_blocks, BLOCK_SIZE, KV_HEADS, HEAD_DIM)
    query = torch.randn(batch, HEADS, HEAD_DIM, device=device, dtype=torch.float16, generator=gen)
    inputs: dict[str, Any] = {"query": query}
    if fmt == "fp16":
        inputs["k"] = torch.randn(shape, device=device, dtype=torch.float16, generator=gen)
        inputs["v"] = torch.randn(shape, device=device, dtype=torch.float16, generator=gen)
        inputs["scales"] = (None, None)
    else:
        inputs["k"] = torch.randint(-127, 128, shape, device=device, dtype=torch.int8, generator=gen)
        # V transposed per block, as the engine's KVCache holds an INT8 cache, seen in index order.
        v = torch.randint(-127, 128, shape, device=device, dtype=torch.int8, generator=gen)
        inputs["v"] = v.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)
        scales = []
        for _ in range(2):
            s = torch.rand(num_blocks, KV_HEADS, BLOCK_SIZE, device=device, generator=gen) * 0.02 + 0.001
            scales.append(s.half().transpose(1, 2))  # head-major, seen as [blocks, slots, KV]
        inputs["scales"] = tuple(scales)
    perm = torch.randperm(num_blocks, device=device, generator=gen).to(torch.int32)
    inputs["tables"] = perm.view(batch, blocks_per_seq)
    inputs["lens"] = torch.full((batch,), context, device=device, dtype=torch.int32)
    return inputs


def bytes_read(batch: int, context: int, fmt: str) -> int:
    elem = 2 if fmt == "fp16" else 1
    kv = 2 * batch * context * KV_HEADS * HEAD_DIM * elem
    return kv if fmt == "fp16" else kv + 2 * batch * context * KV_HEADS * 2


def time_config(inputs: dict[str, Any], splits: int, config: dict[str, int]) -> float:
    """Median µs of one launch (triton.testing.do_bench: L2 flushed between runs)."""
    import triton.testing

    from worker.engine.kernels.paged_decode import paged_decode_attention

    out = torch.empty_like(inputs["query"])
    k_s, v_s = inputs["scales"]

    def launch() -> None:
        paged_decode_attention(
            inputs["query"], inputs["k"], inputs["v"], inputs["tables"], inputs["lens"], HEAD_DIM**-0.5,
            num_splits=splits, out=out, k_scale=k_s, v_scale=v_s, **config,
        )  # fmt: skip

    return float(triton.testing.do_bench(launch, warmup=10, rep=40, return_mode="median")) * 1000


def bench_shape(batch: int, context: int, fmt: str, device: torch.device, num_sms: int) -> dict[str, Any]:
    inputs = build_inputs(batch, context, fmt, device)
    engine_splits = num_decode_splits(batch, KV_HEADS, num_sms)
    engine = dict(zip(("block_n", "num_warps", "num_stages"), ENGINE_LAUNCH[fmt], strict=True))
    engine_us = time_config(inputs, engine_splits, engine)
    hardware_us = position_major_us = 0.0
    if fmt == "int8":
        hardware_us = time_config(inputs, engine_splits, {**engine, "permute_convert": False})
        position_major = {**inputs, "v": inputs["v"].contiguous()}
        position_major_us = time_config(position_major, engine_splits, engine)
        del position_major
    best = (engine_us, engine_splits, engine)
    sweep: list[dict[str, Any]] = []
    split_choices = (engine_splits, engine_splits * 2)
    for splits in split_choices:
        for values in itertools.product(*SWEEP.values()):
            config = dict(zip(SWEEP, values, strict=True))
            try:
                us = time_config(inputs, splits, config)
            except Exception as exc:  # a config that does not fit the SM's shared memory is skipped
                print(f"  skip {fmt} B={batch} ctx={context} splits={splits} {config}: {type(exc).__name__}")
                continue
            sweep.append({"splits": splits, **config, "us": us})
            if us < best[0]:
                best = (us, splits, config)
    del inputs
    torch.cuda.empty_cache()
    return {
        "batch": batch, "context": context, "format": fmt, "bytes": bytes_read(batch, context, fmt),
        "engine_us": engine_us, "engine_hardware_convert_us": hardware_us,
        "engine_position_major_v_us": position_major_us, "engine_splits": engine_splits,
        "best_us": best[0], "best_splits": best[1], "best_config": best[2], "sweep": sweep,
    }  # fmt: skip


def format_table(rows: list[dict[str, Any]], tb_s: float) -> str:
    head = ["B", "context", "KV", "engine config µs", "of HBM", "hardware convert µs", "V position-major µs"]
    head += ["best µs", "of HBM"]
    head += ["best config"]
    lines = [" | ".join(head), " | ".join("---" for _ in head)]
    for r in rows:
        roof_us = r["bytes"] / (tb_s * 1e12) * 1e6
        cfg = r["best_config"]
        best = f"splits {r['best_splits']}, BLOCK_N {cfg['block_n']}, {cfg['num_warps']} warps"
        best += f", {cfg['num_stages']} stages"
        lines.append(
            " | ".join(
                [
                    str(r["batch"]),
                    str(r["context"]),
                    r["format"],
                    f"{r['engine_us']:.1f}",
                    f"{roof_us / r['engine_us']:.0%}",
                    f"{r['engine_hardware_convert_us']:.1f}" if r["format"] == "int8" else "",
                    f"{r['engine_position_major_v_us']:.1f}" if r["format"] == "int8" else "",
                    f"{r['best_us']:.1f}",
                    f"{roof_us / r['best_us']:.0%}",
                    best,
                ]
            )  # fmt: skip
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch-sizes", default="64,256")
    p.add_argument("--contexts", default="1024,8192")
    p.add_argument("--formats", default="fp16,int8")
    p.add_argument("--hbm-tb-s", type=float, default=None, help="HBM TB/s (default: by GPU name)")
    p.add_argument("--json-out", type=Path, default=None)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("this benchmark times a GPU kernel: no CUDA device")
    device = torch.device("cuda")
    num_sms = torch.cuda.get_device_properties(device).multi_processor_count
    tb_s = hbm_tb_s(device, args.hbm_tb_s)
    rows = []
    for context in (int(c) for c in args.contexts.split(",")):
        for batch in (int(b) for b in args.batch_sizes.split(",")):
            for fmt in args.formats.split(","):
                rows.append(bench_shape(batch, context, fmt, device, num_sms))
                print(rows[-1], flush=True)
    gpu = torch.cuda.get_device_name(device)
    print(f"\n{gpu}, {tb_s} TB/s; one layer, {HEADS} heads / {KV_HEADS} KV heads, head_dim {HEAD_DIM}\n")
    print(format_table(rows, tb_s))
    if args.json_out:
        args.json_out.write_text(json.dumps({"gpu": gpu, "hbm_tb_s": tb_s, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
