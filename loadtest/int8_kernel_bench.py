"""INT8 matmul kernel configs against cuBLAS FP16 per Llama-3.2-1B decode shape, timed as in a decode step.

A decode step replays its kernels from a CUDA graph and reads every weight once from HBM, so each
call here is timed the same way: a CUDA graph of `--calls` launches over copies of the weight that
together exceed the L2 cache several times (each launch finds its weight in HBM), replayed and timed
with CUDA events; microseconds per launch and the HBM bandwidth that implies. For each shape and row
count: FP16 `F.linear` (cuBLAS), then every candidate config of `kernels/int8_matmul.py` (plus, for
one row, the `EXTRA_GEMV` tiles unless `--no-extra`) with the byte-permute INT8 conversion and with the
hardware conversion; the table shows the best of each and the config that won.

    python loadtest/int8_kernel_bench.py --rows 1,16,64 --json-out int8_kernel_h200.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from worker.engine.kernels.int8_matmul import Int8MatmulConfig, candidate_configs, int8_matmul  # noqa: E402
from worker.engine.quant.int8_linear import quantize_weight  # noqa: E402

# name -> (in_features, out_features) of Llama-3.2-1B, QKV and gate/up fused as the engine runs them
SHAPES = {
    "qkv": (2048, 3072),
    "o": (2048, 2048),
    "gate_up": (2048, 16384),
    "down": (8192, 2048),
    "lm_head": (2048, 128256),
}
EXTRA_GEMV = (  # (block_n, block_k, split_k, num_warps): tiles beyond the shipped candidates
    (64, 128, 1, 4),
    (32, 512, 1, 4),
    (128, 128, 1, 8),
    (32, 256, 2, 4),
)
L2_MULTIPLE = 4  # weight copies that together take at least this many L2 caches


def graph_time_us(launch: Callable[[int], Any], copies: int, calls: int) -> float:
    """Microseconds per launch of a CUDA graph of `calls` launches cycling over `copies` weights."""
    for i in range(copies):  # warm-up outside the capture (and tuning, for the tuned path)
        launch(i)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(calls):
            launch(i % copies)
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    samples = []
    for _ in range(5):
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        samples.append(start.elapsed_time(end) * 1000 / calls)
    del graph
    return sorted(samples)[len(samples) // 2]


def configs(m: int, extra: bool) -> list[Int8MatmulConfig]:
    found = list(candidate_configs(m))
    if m == 1 and extra:
        found += [Int8MatmulConfig(1, n, k, s, w) for n, k, s, w in EXTRA_GEMV]
    return found


def bench_shape(name: str, row_counts: list[int], args: argparse.Namespace, l2: int) -> list[dict[str, Any]]:
    k, n = SHAPES[name]
    device, dtype = torch.device("cuda"), torch.float16
    copies = max(2, -(-L2_MULTIPLE * l2 // (n * k)))
    w16 = [torch.randn(n, k, device=device, dtype=dtype) * 0.02 for _ in range(copies)]
    quant = [quantize_weight(w, dtype) for w in w16]
    found = []
    for m in row_counts:
        x = torch.randn(m, k, device=device, dtype=dtype)
        reference = (x.float() @ (quant[0][0].float() * quant[0][1].float()[:, None]).T).to(dtype)
        fp16_us = graph_time_us(lambda i, x=x: F.linear(x, w16[i]), copies, args.calls)
        best: dict[bool, tuple[float, Int8MatmulConfig]] = {}
        for cfg in configs(m, not args.no_extra):
            if k < cfg.split_k * cfg.block_k:
                continue
            for fast in (True, False):
                c = dataclasses.replace(cfg, fast_convert=fast)
                out = int8_matmul(x, *quant[0], config=c)
                err = (out.float() - reference.float()).abs().max().item()
                if err > 1e-2 * reference.float().abs().max().item() + 1e-3:
                    print(f"  WRONG: {name} m={m} {c}: max error {err:.4g}", flush=True)
                    continue
                launch = lambda i, c=c, x=x: int8_matmul(x, *quant[i], config=c)  # noqa: E731
                us = graph_time_us(launch, copies, args.calls)
                if fast not in best or us < best[fast][0]:
                    best[fast] = (us, c)
        row = {
            "layer": name, "in": k, "out": n, "rows": m, "fp16_us": fp16_us,
            "fp16_tb_s": 2 * n * k / fp16_us / 1e6,
            "int8_cvt_us": best[False][0], "int8_cvt_config": dataclasses.asdict(best[False][1]),
            "int8_permute_us": best[True][0], "int8_permute_config": dataclasses.asdict(best[True][1]),
            "permute_tb_s": (n * k + 2 * n) / best[True][0] / 1e6,
        }  # fmt: skip
        found.append(row)
        c = best[True][1]
        print(
            f"| {name} | {k}x{n} | {m} | {fp16_us:.1f} | {row['fp16_tb_s']:.2f} | {best[False][0]:.1f} | "
            f"{best[True][0]:.1f} | {row['permute_tb_s']:.2f} | {best[True][0] / fp16_us:.2f} | "
            f"m{c.block_m} n{c.block_n} k{c.block_k} s{c.split_k} w{c.num_warps} st{c.num_stages} |",
            flush=True,
        )
    return found


@torch.inference_mode()
def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", default="1,16,64")
    p.add_argument("--shapes", default=",".join(SHAPES))
    p.add_argument("--calls", type=int, default=64, help="launches per timed graph")
    p.add_argument("--no-extra", action="store_true", help="only the shipped candidate configs")
    p.add_argument("--json-out", type=Path)
    args = p.parse_args()
    device = torch.device("cuda")
    l2 = torch.cuda.get_device_properties(device).L2_cache_size
    torch.manual_seed(0)
    rows: list[dict[str, Any]] = []
    print(f"device={torch.cuda.get_device_name(device)} L2={l2 >> 20} MiB calls/graph={args.calls}")
    header = "| layer | in x out | rows | fp16 us | fp16 TB/s | int8 cvt us | int8 permute us | permute TB/s "
    print(header + "| permute / fp16 | best config |\n" + "| --- " * 10 + "|")
    for name in args.shapes.split(","):
        rows += bench_shape(name, [int(r) for r in args.rows.split(",")], args, l2)
        torch.cuda.empty_cache()
    if args.json_out:
        meta = {"device": torch.cuda.get_device_name(device), "torch": torch.__version__, "calls": args.calls}
        args.json_out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
