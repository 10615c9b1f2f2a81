"""Int8Linear's forwards against a float `nn.Linear`, per layer shape and rows (tokens per step).

For each shape (SmolLM2-135M's or Llama-3.2-1B's projections, QKV and gate/up fused as the engine's
Triton path runs them) and each row count, the median time of: the float linear (`--dtype`, default
float32 on CPU, float16 on CUDA), `Int8Linear` weight-only (INT8 weight cast to the activation dtype,
per-channel scale on the output) and `Int8Linear` W8A8 (per-token INT8 activations, `torch._int_mm`;
on CUDA rows <= 16 fall back to weight-only). Weights are random; time does not depend on them.

    python loadtest/int8_linear_bench.py --threads 1
    python loadtest/int8_linear_bench.py --device cuda --model llama-1b --json-out int8_linear_h100.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from worker.engine.quant import Int8Linear  # noqa: E402

SHAPES = {  # name -> (in_features, out_features)
    "smollm2": {"qkv": (576, 960), "o": (576, 576), "gate_up": (576, 3072), "down": (1536, 576)},
    "llama-1b": {"qkv": (2048, 3072), "o": (2048, 2048), "gate_up": (2048, 16384), "down": (8192, 2048)},
}


def timed(fn: Callable[[], torch.Tensor], device: torch.device, reps: int) -> float:
    """Median microseconds of one call."""
    for _ in range(3):
        fn()
    samples = []
    for _ in range(5):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(reps):
                fn()
            end.record()
            torch.cuda.synchronize()
            samples.append(start.elapsed_time(end) * 1000 / reps)
        else:
            t0 = time.perf_counter()
            for _ in range(reps):
                fn()
            samples.append((time.perf_counter() - t0) * 1e6 / reps)
    return statistics.median(samples)


@torch.inference_mode()
def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=sorted(SHAPES), default="smollm2")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--rows", default="1,16,64,256,1024")
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--json-out", type=Path)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype or ("float16" if device.type == "cuda" else "float32"))
    torch.manual_seed(0)
    results = []
    print(f"| layer | in x out | rows | {dtype} us | int8 (W only) us | w8a8 us | int8/float | w8a8/float |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for layer, (k, n) in SHAPES[args.model].items():
        linear = nn.Linear(k, n, bias=False, device=device, dtype=dtype)
        weight_only = Int8Linear.from_linear(linear)
        w8a8 = Int8Linear.from_linear(linear, activations="int8")
        for m in (int(r) for r in args.rows.split(",")):
            x = torch.randn(m, k, device=device, dtype=dtype)
            row = {"layer": layer, "in": k, "out": n, "rows": m}
            for name, module in (("float", linear), ("int8", weight_only), ("w8a8", w8a8)):
                row[name] = round(timed(lambda module=module, x=x: module(x), device, args.reps), 1)
            results.append(row)
            print(
                f"| {layer} | {k}x{n} | {m} | {row['float']} | {row['int8']} | {row['w8a8']} "
                f"| {row['int8'] / row['float']:.2f} | {row['w8a8'] / row['float']:.2f} |",
                flush=True,
            )
    if args.json_out:
        name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
        meta = {
            "device": name,
            "torch": torch.__version__,
            "dtype": str(dtype),
            "threads": torch.get_num_threads(),
        }
        args.json_out.write_text(json.dumps({"meta": meta, "rows": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
