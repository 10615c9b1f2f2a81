"""Int8Linear's forwards against a float `nn.Linear`, per layer shape and rows (tokens per step).

For each shape (SmolLM2-135M's or Llama-3.2-1B's projections, QKV and gate/up fused as the engine's
Triton path runs them) and each row count, the median time of: the float linear (`--dtype`, default
float32 on CPU, float16 on CUDA), the weight-only cast path (INT8 weight cast to the activation dtype,
`F.linear`, per-channel scale on the output: what `Int8Linear` runs on CPU and for prefill-sized
steps on CUDA), on CUDA the Triton kernel `kernels/int8_matmul.py` (what `Int8Linear` runs for steps
of at most `TRITON_MAX_ROWS` rows; tuned on its first call, before the clock), and `Int8Linear`
W8A8 (per-token INT8 activations, `torch._int_mm`; on CUDA rows <= 16 take the Triton kernel).
Weights are random; time does not depend on them.

    python loadtest/int8_linear_bench.py --threads 1
    python loadtest/int8_linear_bench.py --device cuda --model llama-1b --rows 1,4,16,32,64,256 \\
        --json-out int8_linear_h100.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from worker.engine.quant import Int8Linear  # noqa: E402
from worker.engine.quant.int8_linear import TRITON_MAX_ROWS  # noqa: E402

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


def forwards(
    linear: nn.Linear, weight_only: Int8Linear, w8a8: Int8Linear, x: torch.Tensor, triton: bool
) -> dict[str, Callable[[], torch.Tensor]]:
    """The timed calls on `x`, by column."""
    calls: dict[str, Callable[[], torch.Tensor]] = {
        "float": lambda: linear(x),
        # Int8Linear's weight-only forward without the kernel: cast, cuBLAS (or MKL), scale.
        "int8": lambda: F.linear(x, weight_only.weight.to(x.dtype)) * weight_only.scale,
        "w8a8": lambda: w8a8(x),
    }
    if triton:
        from worker.engine.kernels.int8_matmul import int8_matmul

        calls["triton"] = lambda: int8_matmul(x, weight_only.weight, weight_only.scale)
    return calls


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
    triton = device.type == "cuda"
    columns = [("float", f"{dtype} us"), ("int8", "int8 cast us")]
    columns += [("triton", "int8 triton us")] if triton else []
    columns += [("w8a8", "w8a8 us")]
    ratios = [name for name, _ in columns[1:]]
    titles = [t for _, t in columns] + [f"{name}/float" for name in ratios]
    print("| layer | in x out | rows | " + " | ".join(titles) + " |")
    print("| --- " * (3 + len(titles)) + "|")
    for layer, (k, n) in SHAPES[args.model].items():
        linear = nn.Linear(k, n, bias=False, device=device, dtype=dtype)
        weight_only = Int8Linear.from_linear(linear)
        w8a8 = Int8Linear.from_linear(linear, activations="int8")
        for m in (int(r) for r in args.rows.split(",")):
            x = torch.randn(m, k, device=device, dtype=dtype)
            calls = forwards(linear, weight_only, w8a8, x, triton and m <= TRITON_MAX_ROWS)
            row: dict[str, Any] = {"layer": layer, "in": k, "out": n, "rows": m}
            for name, fn in calls.items():
                row[name] = round(timed(fn, device, args.reps), 1)
            results.append(row)
            cells = [str(row.get(name, "-")) for name, _ in columns]
            cells += [f"{row[name] / row['float']:.2f}" if name in row else "-" for name in ratios]
            print(f"| {layer} | {k}x{n} | {m} | " + " | ".join(cells) + " |", flush=True)
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
