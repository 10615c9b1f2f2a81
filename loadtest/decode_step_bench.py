"""Decode step time of the paged engine vs batch size, against the HBM roofline.

For each batch size B, a fresh PagedEngine gets B requests of `--context` random prompt tokens (EOS ignored)
and steps until all B decode with no prefill left; after two more steps, `--steps` steps are timed one by
one, with no synchronisation between them (with async scheduling the engine launches step N+1 before it
reads step N back), from one `engine.step()` return to the next, and the median is reported, with the
engine's host time per step by part (planning, launching, reading outputs, waiting for the device) and,
with `--profile-steps`, the GPU's busy time per step (the host is hidden when the step is close to it).
`--async-scheduling off` times the engine that reads each step back before planning the next. Each request
may produce `--new-tokens` tokens once all decode (its max_tokens adds a bound on the prefill steps).
Roofline: every weight read once (tied embeddings once) plus each sequence's K/V at its mean context over
the timed steps, over the HBM bandwidth (`--hbm-tb-s`, or looked up from the GPU's name).
`--profile-steps N` then runs N more steps under torch.profiler and prints their kernels per step
(`kernel_profile.py`): how many a step launches, how busy they keep the GPU, and which dominate.
`--baseline static_compile` also times transformers' decode step at the same B and context: generate() with
a reused StaticCache (compiled with CUDA graphs by transformers on CUDA, eager on CPU), one warm-up generate,
then the median gap between successive tokens of a timed one.

  python loadtest/decode_step_bench.py --model llama-1b-random --device cuda --dtype float16 \\
      --baseline static_compile --json-out decode.json --plot decode.png
  python loadtest/decode_step_bench.py --model tiny-random --batch-sizes 1,4 --context 64 --steps 3 \\
      --hbm-tb-s 0.05

`--weights int8` (or w8a8, fp16; as LLM_WEIGHTS) quantises the linears at load; weights= then counts
the INT8 weights and scales, so the roofline is that of the bytes an INT8 decode step reads:

  python loadtest/decode_step_bench.py --model llama-1b-random --device cuda --dtype float16 \\
      --batch-sizes 1,16,64 --weights int8
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import engine_bench as bench  # noqa: E402
import kernel_profile  # noqa: E402

from scheduler import BatchPolicy  # noqa: E402
from worker.engine.base import GenerationRequest, SamplingParams  # noqa: E402
from worker.engine.config import EngineConfig  # noqa: E402
from worker.engine.cuda_allocator import allocator_defaults  # noqa: E402
from worker.engine.kv_cache import KVCacheSpec, resolve_kv_dtype  # noqa: E402
from worker.engine.model_files import LoadedModel  # noqa: E402
from worker.engine.paged_engine import PagedEngine  # noqa: E402
from worker.engine.quant import weight_bytes as quant_weight_bytes  # noqa: E402
from worker.engine.quant import weights_label  # noqa: E402

WARMUP_STEPS = 2  # untimed decode steps once every sequence decodes
# `--sampling`: every request greedy and plain, or greedy with the extras a chat product sets most
# (penalties and logprobs: the per-sequence counts on the device, log_softmax and top-k of the logits).
SAMPLING: dict[str, dict[str, Any]] = {
    "plain": {},
    "extras": {
        "presence_penalty": 0.5, "frequency_penalty": 0.5, "repetition_penalty": 1.1, "logprobs": True,
        "top_logprobs": 5,
    },
}  # fmt: skip
# HBM bandwidth in TB/s by GPU name (whole words: "GH200" is not an H200); first match wins.
HBM_TB_S = (("H200", 4.8), ("H100 NVL", 3.9), ("H100 PCIe", 2.0), ("H100", 3.35))


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of all parameters and buffers (INT8 linears and the INT8 embedding table keep theirs as
    buffers), each storage once: a tied lm_head shares the embedding's table, and fused projections'
    views count with their storage (`quant.weight_bytes`, also the engine's `describe()` field)."""
    return quant_weight_bytes(model)


def hbm_tb_s(device: torch.device, flag: float | None) -> float:
    if flag is not None:
        return flag
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    for key, tb_s in HBM_TB_S:
        if re.search(rf"\b{key}\b", name):
            return tb_s
    raise SystemExit(f"no known memory bandwidth for {name!r}: pass --hbm-tb-s")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def kv_spec(loaded: LoadedModel, args: argparse.Namespace) -> KVCacheSpec:
    """The cache format the engine uses (`--kv-dtype`): INT8 KV counts its own bytes in the roofline."""
    activation = next(loaded.model.parameters()).dtype
    return KVCacheSpec.from_model_config(loaded.model.config, resolve_kv_dtype(args.kv_dtype, activation))


def time_engine(loaded: LoadedModel, batch: int, args: argparse.Namespace) -> dict[str, Any]:
    """Median decode step ms at `batch` sequences, their mean context (tokens) over the timed steps, the
    engine's host ms per step by part, and (with `--profile-steps`) the GPU's busy ms per step."""
    device = torch.device(args.device)
    spec = kv_spec(loaded, args)
    chunk = args.max_prefill_chunk_tokens
    # A step computes at least one prefill chunk, so prefill ends within batch * ceil(context / chunk) steps.
    max_tokens = args.new_tokens + batch * -(-args.context // chunk)
    blocks = batch * (-(-(args.context + max_tokens) // args.block_size) + 1)
    policy = BatchPolicy(
        max_wait_ms=0, max_num_seqs=batch, max_prefill_chunk_tokens=chunk,
        max_batch_tokens=max(args.max_batch_tokens, batch + chunk),
    )  # fmt: skip
    config = EngineConfig(
        model=bench.model_name(args), policy=policy,
        kv_cache_bytes=blocks * spec.bytes_per_block(args.block_size), kv_block_size_tokens=args.block_size,
        **bench.engine_options(args),
    )  # fmt: skip
    engine = PagedEngine(loaded.model, loaded.tokenizer, config)
    rng = random.Random(batch)
    vocab = min(loaded.model.config.vocab_size, len(loaded.tokenizer))
    for i in range(batch):
        prompt = [rng.randrange(bench.FIRST_ORDINARY_ID, vocab) for _ in range(args.context)]
        sampling = SamplingParams(max_tokens=max_tokens, ignore_eos=True, **SAMPLING[args.sampling])
        engine.add_request(GenerationRequest(f"d{i}", prompt, sampling, arrival_s=time.monotonic()))
    completed: dict[str, int] = {}

    def step() -> bool:
        """One step; True if it was a pure decode step of every sequence."""
        for out in engine.step():
            completed[out.seq_id] = out.completion_tokens
        stats = engine.last_step_stats()
        return stats.prefill_tokens == 0 and stats.decode_tokens == batch

    while not step():
        if not engine.has_unfinished():
            raise RuntimeError("every request finished before all of them were decoding")
    for _ in range(WARMUP_STEPS):
        step()
    # The step after k completion tokens attends over context + k tokens (its input token included).
    mean_context = args.context + statistics.fmean(completed.values()) + (args.steps - 1) / 2
    # No synchronisation between timed steps: with async scheduling step N+1 is launched before N is read
    # back, and a sync after each step would time them one by one. Each time is one step's share of the
    # pipeline: from one `step()` return to the next.
    times = []
    host_before = dict(engine.host_seconds)
    sync(device)
    last = time.perf_counter()
    for _ in range(args.steps):
        if not step():
            raise RuntimeError("a timed step was not a decode step of every sequence")
        now = time.perf_counter()
        times.append(now - last)
        last = now
    sync(device)
    host_ms = {k: (v - host_before[k]) / args.steps * 1000 for k, v in engine.host_seconds.items()}
    result: dict[str, Any] = {"step_ms": statistics.median(times) * 1000, "mean_context": mean_context}
    result |= {"host_ms": host_ms, "async_scheduling": engine.async_scheduling}
    if args.profile_steps:
        found = kernel_profile.profile_steps(step, args.profile_steps, lambda: sync(device))
        print(f"  kernels of a decode step at B={batch}:\n{found.table()}", flush=True)
        result["gpu_busy_ms"] = found.busy_us_per_step / 1000
    engine.close()
    return result


def time_static(loaded: LoadedModel, batch: int, args: argparse.Namespace) -> tuple[float, dict[str, Any]]:
    """Median ms between successive tokens of transformers' static-cache generate() at `batch`."""
    from transformers import StaticCache

    model, device = loaded.model, torch.device(args.device)
    model.set_attn_implementation("sdpa")
    vocab = min(model.config.vocab_size, len(loaded.tokenizer))
    generator = torch.Generator().manual_seed(batch)
    ids = torch.randint(bench.FIRST_ORDINARY_ID, vocab, (batch, args.context), generator=generator).to(device)
    new, warm = args.steps + 1, bench.STATIC_WARMUP_TOKENS  # the first new token comes from the prefill
    cache = StaticCache(config=model.config, max_cache_len=args.context + max(new, warm))

    def generate(max_new_tokens: int, clock: bench.TokenClock | None = None) -> None:
        cache.reset()
        model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False,
            eos_token_id=[], pad_token_id=bench.pad_token_id(loaded), past_key_values=cache,
            streamer=clock,
        )  # fmt: skip

    warm_start = time.perf_counter()
    generate(warm)
    sync(device)
    warmup_s = time.perf_counter() - warm_start
    clock = bench.TokenClock()
    generate(new, clock)
    gaps = [b - a for a, b in zip(clock.times[1:], clock.times[2:], strict=False)]  # times[0]: the prompt
    compiled = hasattr(model, "_compiled_call")  # set by transformers when it compiled the decode step
    return statistics.median(gaps) * 1000, {"warmup_s": warmup_s, "compiled": compiled}


def format_table(rows: list[dict[str, Any]]) -> str:
    columns = [
        ("B", "batch", "{}"), ("mean ctx", "mean_context", "{:.0f}"), ("step ms", "step_ms", "{:.2f}"),
        ("tok/s", "tok_s", "{:.0f}"), ("roofline ms", "roofline_ms", "{:.2f}"),
        ("step/roofline", "ratio", "{:.2f}"),
    ]  # fmt: skip
    if any("gpu_busy_ms" in r for r in rows):
        columns += [("GPU busy ms", "gpu_busy_ms", "{:.2f}"), ("step/busy", "step_over_busy", "{:.2f}")]
    if any("static_step_ms" in r for r in rows):
        columns += [("static ms", "static_step_ms", "{:.2f}"), ("static/roofline", "static_ratio", "{:.2f}")]
    return bench.render_table(rows, columns)


def plot(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batches = [r["batch"] for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot(batches, [r["step_ms"] for r in rows], "o-", label="paged engine decode step")
    static = [r for r in rows if "static_step_ms" in r]
    if static:
        compiled = ", compiled" if static[0]["static"]["compiled"] else ""
        label = f"transformers generate(), static cache{compiled}"
        ax.plot([r["batch"] for r in static], [r["static_step_ms"] for r in static], "s-", label=label)
    ax.plot(batches, [r["roofline_ms"] for r in rows], "k-", label="HBM roofline")
    ax.plot(batches, [2 * r["roofline_ms"] for r in rows], "k--", label="2x roofline")
    ax.set_xscale("log", base=2)
    ax.set_xticks(batches, [str(b) for b in batches])
    ax.set(xlabel="batch size (sequences decoding)", ylabel="ms per decode step", title=title)
    ax.set_ylim(bottom=0)
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    bench.add_model_args(p)
    p.add_argument("--batch-sizes", default="1,16,64,256")
    p.add_argument("--context", type=int, default=1024, help="prompt tokens of every sequence")
    p.add_argument("--new-tokens", type=int, default=64, help="tokens each may produce once all decode")
    p.add_argument("--steps", type=int, default=20, help="timed decode steps")
    p.add_argument("--hbm-tb-s", type=float, default=None, help="HBM TB/s (default: by GPU name)")
    p.add_argument("--baseline", choices=["static_compile"], default=None)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--max-batch-tokens", type=int, default=2048, help="raised to B + prefill chunk if lower")
    p.add_argument("--max-prefill-chunk-tokens", type=int, default=512)
    p.add_argument("--profile-steps", type=int, default=0, help="print the kernels of N more steps")
    p.add_argument("--sampling", choices=sorted(SAMPLING), default="plain", help="extras of every request")
    p.add_argument("--json-out", type=Path, default=None)
    p.add_argument("--plot", type=Path, default=None, help="PNG of step time vs batch size")
    args = p.parse_args(argv)
    if args.new_tokens < args.steps + args.profile_steps + WARMUP_STEPS:
        p.error(f"--new-tokens must be at least --steps + --profile-steps + {WARMUP_STEPS}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    allocator_defaults(args.weights)  # before CUDA starts (hbm_tb_s reads the device)
    bandwidth = hbm_tb_s(device, args.hbm_tb_s)
    loaded = bench.load(args)
    dtype = next(loaded.model.parameters()).dtype
    weights = weight_bytes(loaded.model)
    kv_per_token = kv_spec(loaded, args).bytes_per_block(1)
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(
        f"model={loaded.source} device={gpu} dtype={dtype} linears={weights_label(loaded.model)} "
        f"weights={weights / 1e9:.3f} GB "
        f"kv={kv_per_token} B/token bandwidth={bandwidth} TB/s context={args.context} steps={args.steps} "
        f"sampling={args.sampling}",
        flush=True,
    )
    rows: list[dict[str, Any]] = []
    for batch in (int(b) for b in args.batch_sizes.split(",") if b):
        try:
            timed = time_engine(loaded, batch, args)
        except Exception as exc:  # keep the batch sizes measured so far (a large B may not fit)
            print(f"  FAILED: B={batch}: {type(exc).__name__}: {exc}", flush=True)
            continue
        step_ms, mean_context = timed["step_ms"], timed["mean_context"]
        roofline_bytes = weights + batch * mean_context * kv_per_token
        roofline_ms = roofline_bytes / (bandwidth * 1e12) * 1000
        row: dict[str, Any] = {
            "batch": batch, "mean_context": mean_context, "step_ms": step_ms, "tok_s": batch / step_ms * 1000,
            "roofline_bytes": roofline_bytes, "roofline_ms": roofline_ms, "ratio": step_ms / roofline_ms,
            "host_ms": timed["host_ms"], "async_scheduling": timed["async_scheduling"],
        }  # fmt: skip
        if "gpu_busy_ms" in timed:
            row |= {"gpu_busy_ms": timed["gpu_busy_ms"], "step_over_busy": step_ms / timed["gpu_busy_ms"]}
        if args.baseline == "static_compile":
            try:
                static_ms, notes = time_static(loaded, batch, args)
                row |= {"static_step_ms": static_ms, "static_ratio": static_ms / roofline_ms, "static": notes}
            except Exception as exc:
                print(f"  FAILED: static_compile B={batch}: {type(exc).__name__}: {exc}", flush=True)
            gc.collect()  # its StaticCache
            if device.type == "cuda":
                torch.cuda.empty_cache()
            if "static" in row and not row["static"]["compiled"]:
                print("  note: transformers compiles its decode step only on accelerators; static runs eager")
        rows.append(row)
        extra = f", static {row['static_step_ms']:.2f} ms" if "static_step_ms" in row else ""
        print(f"  done: B={batch} step {step_ms:.2f} ms, roofline {roofline_ms:.2f} ms{extra}", flush=True)
        host = ", ".join(f"{k} {v:.3f}" for k, v in row["host_ms"].items())
        print(f"  host ms per step (async scheduling {'on' if row['async_scheduling'] else 'off'}): {host}")
    print(format_table(rows))
    if args.json_out:
        config = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
        found = {"device": gpu, "dtype": str(dtype), "weight_bytes": weights, "hbm_tb_s": bandwidth}
        found["linears"] = weights_label(loaded.model)
        found["kv_bytes_per_token"] = kv_per_token
        args.json_out.write_text(json.dumps({"config": config, **found, "results": rows}, indent=2))
    if args.plot:
        dtype_name = str(dtype).removeprefix("torch.")
        plot(rows, args.plot, f"Decode step vs batch size: {gpu}, {dtype_name}, context {args.context}")
        print(f"plot: {args.plot}")


if __name__ == "__main__":
    main()
