"""Engine benchmark: the paged continuous-batching engine vs transformers `generate()` on padded batches.

Both run in this process, on the same model and the same fixed-seed workload, with every request
arriving at t=0 (offline throughput; TTFT then includes queueing). Workloads (DESIGN.md, Benchmarks):

  w2-cpu  32 requests, 512-token shared prefix + 32 own tokens, 32 new tokens (W2 scaled for CPU)
  w1      1,000 requests, 256-token shared system prompt, user turns log-uniform 16-512, max_tokens 32-256
  w2      256 requests, 2,048-token shared prefix + 32 own tokens, 64 new tokens
  w3      64 requests of 8,192 prompt tokens, 256 new tokens, KV cache 25% of what all of them need

EOS is ignored everywhere, so every system produces the same number of tokens. Example:

  HF_HUB_OFFLINE=1 python loadtest/engine_bench.py --workload w2-cpu --threads 1
  python loadtest/engine_bench.py --workload w2 --model llama-1b-random --device cuda --dtype float16
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psutil
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from worker.engine.base import GenerationRequest, SamplingParams  # noqa: E402
from worker.engine.kv_cache import KVCacheSpec  # noqa: E402
from worker.engine.llm_engine import PagedEngine  # noqa: E402
from worker.engine.model_loader import LoadedModel, load_model  # noqa: E402
from worker.engine.random_model import random_causal_lm  # noqa: E402

FIRST_ORDINARY_ID = 100  # below are SmolLM2's special and byte tokens; random prompts avoid them


@dataclass(frozen=True)
class Workload:
    name: str
    prompts: list[list[int]]
    max_tokens: list[int]
    kv_fraction: float | None = None  # KV cache as a share of what all requests need at once

    @property
    def total_kv_tokens(self) -> int:
        return sum(len(p) + m for p, m in zip(self.prompts, self.max_tokens, strict=True))


def build_workload(name: str, vocab_size: int, seed: int = 0) -> Workload:
    """The named workload with token ids drawn from a fixed-seed RNG."""
    rng = random.Random(seed)

    def tokens(n: int) -> list[int]:
        return [rng.randrange(FIRST_ORDINARY_ID, vocab_size) for _ in range(n)]

    if name in ("w2-cpu", "w2"):
        count, prefix_len, new = (32, 512, 32) if name == "w2-cpu" else (256, 2048, 64)
        prefix = tokens(prefix_len)
        return Workload(name, [prefix + tokens(32) for _ in range(count)], [new] * count)
    if name == "w1":
        system = tokens(256)
        prompts = [system + tokens(int(round(16 * 32 ** rng.random()))) for _ in range(1000)]
        return Workload(name, prompts, [rng.randint(32, 256) for _ in prompts])
    if name == "w3":
        return Workload(name, [tokens(8192) for _ in range(64)], [256] * 64, kv_fraction=0.25)
    raise ValueError(f"unknown workload {name!r}")


@dataclass
class RunResult:
    system: str
    requests: int
    output_tokens: int
    wall_s: float
    prefill_tokens: int
    peak_memory_bytes: int
    ttft_ms: list[float] = field(repr=False)
    tpot_ms: list[float] = field(repr=False)

    def summary(self) -> dict[str, Any]:
        row = {k: v for k, v in asdict(self).items() if k not in ("ttft_ms", "tpot_ms")}
        row["output_tok_s"] = self.output_tokens / self.wall_s
        for label, values in (("ttft", self.ttft_ms), ("tpot", self.tpot_ms)):
            row[f"{label}_p50_ms"] = percentile(values, 50)
            row[f"{label}_p95_ms"] = percentile(values, 95)
        return row


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


class PeakMemory:
    """Peak GPU memory allocated, or on CPU the peak RSS sampled every 10 ms, within a `with` block."""

    def __init__(self, device: torch.device):
        self.device = device
        self.peak = 0
        self._stop = threading.Event()

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        proc = psutil.Process()
        while not self._stop.is_set():
            self.peak = max(self.peak, proc.memory_info().rss)
            self._stop.wait(0.01)

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device)
        else:
            self._stop.set()
            self._thread.join()


def run_paged(
    loaded: LoadedModel, workload: Workload, device: torch.device, args: argparse.Namespace
) -> RunResult:
    kv_bytes = args.kv_cache_bytes
    if workload.kv_fraction is not None and kv_bytes is None:
        spec = KVCacheSpec.from_model_config(loaded.model.config, next(loaded.model.parameters()).dtype)
        kv_bytes = int(workload.total_kv_tokens * workload.kv_fraction * spec.bytes_per_block(1))
    engine = PagedEngine(
        loaded.model, loaded.tokenizer, kv_cache_bytes=kv_bytes, block_size=args.block_size,
        max_num_seqs=args.max_num_seqs, max_batch_tokens=args.max_batch_tokens,
        max_prefill_chunk_tokens=args.max_prefill_chunk_tokens, kv_reserve=args.kv_reserve,
        enable_prefix_caching=not args.no_prefix_caching,
    )  # fmt: skip
    first: dict[str, float] = {}
    last: dict[str, float] = {}
    counts: dict[str, int] = {}
    prefill = 0
    with PeakMemory(device) as mem:
        start = time.perf_counter()
        for i, (prompt, max_tokens) in enumerate(zip(workload.prompts, workload.max_tokens, strict=True)):
            sampling = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
            engine.add_request(GenerationRequest(f"r{i}", prompt, sampling, arrival_s=time.monotonic()))
        while engine.has_unfinished():
            outputs = engine.step()
            now = time.perf_counter()
            prefill += engine.last_step_stats().prefill_tokens
            for out in outputs:
                if out.new_token_ids:
                    first.setdefault(out.request_id, now)
                    last[out.request_id] = now
                    counts[out.request_id] = counts.get(out.request_id, 0) + len(out.new_token_ids)
        wall = time.perf_counter() - start
    engine.close()
    tpot = [(last[r] - first[r]) * 1000 / (counts[r] - 1) for r in counts if counts[r] > 1]
    return RunResult(
        "paged engine", len(workload.prompts), sum(counts.values()), wall, prefill, mem.peak,
        [(t - start) * 1000 for t in first.values()], tpot,
    )  # fmt: skip


class _TokenClock:
    """A `generate()` streamer that only records when each decoding step delivered its tokens."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def put(self, value: torch.Tensor) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def run_static(loaded: LoadedModel, workload: Workload, device: torch.device, batch_size: int) -> RunResult:
    """transformers `generate()` on left-padded batches of `batch_size`, in arrival order."""
    model, pad_id = loaded.model, loaded.tokenizer.pad_token_id
    model.set_attn_implementation("sdpa")
    ttft: list[float] = []
    tpot: list[float] = []
    output_tokens = prefill = 0
    with PeakMemory(device) as mem, torch.inference_mode():
        start = time.perf_counter()
        for lo in range(0, len(workload.prompts), batch_size):
            prompts = workload.prompts[lo : lo + batch_size]
            new = max(workload.max_tokens[lo : lo + batch_size])  # a static batch runs to its longest
            width = max(len(p) for p in prompts)
            ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts], device=device)
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
            clock = _TokenClock()
            out = model.generate(
                ids, attention_mask=mask, max_new_tokens=new, do_sample=False,
                eos_token_id=[], pad_token_id=pad_id, streamer=clock,
            )  # fmt: skip
            generated = out.shape[1] - width
            prefill += ids.numel()
            output_tokens += sum(workload.max_tokens[lo : lo + batch_size])
            first_token = clock.times[1]  # times[0] is the prompt being handed over
            ttft += [(first_token - start) * 1000] * len(prompts)
            tpot += [(clock.times[-1] - first_token) * 1000 / max(generated - 1, 1)] * len(prompts)
        wall = time.perf_counter() - start
    return RunResult(f"generate() bs={batch_size}", len(workload.prompts), output_tokens, wall, prefill,
                     mem.peak, ttft, tpot)  # fmt: skip


def load(args: argparse.Namespace) -> LoadedModel:
    if args.model == "llama-1b-random":
        dtype = None if args.dtype == "auto" else getattr(torch, args.dtype)
        return random_causal_lm("llama-1b", device=args.device, dtype=dtype)
    return load_model("SmolLM2-135M-Instruct" if args.model == "default" else args.model,
                      device=args.device, dtype=args.dtype)  # fmt: skip


def format_table(rows: list[dict[str, Any]], device: torch.device) -> str:
    mem_label = "peak GPU alloc MiB" if device.type == "cuda" else "peak RSS MiB"
    columns = [
        ("system", "system", "{}"), ("output tok/s", "output_tok_s", "{:.1f}"),
        ("TTFT p50 ms", "ttft_p50_ms", "{:.0f}"), ("TTFT p95 ms", "ttft_p95_ms", "{:.0f}"),
        ("TPOT p50 ms", "tpot_p50_ms", "{:.1f}"), ("prefill tokens", "prefill_tokens", "{}"),
        ("wall s", "wall_s", "{:.1f}"), (mem_label, "peak_memory_bytes", "{}"),
    ]  # fmt: skip
    cells = [[title for title, _, _ in columns]]
    for row in rows:
        values = dict(row, peak_memory_bytes=row["peak_memory_bytes"] // (1 << 20))
        cells.append([fmt.format(values[key]) for _, key, fmt in columns])
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
    lines = [
        "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))
        )
        for r in cells
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workload", choices=["w2-cpu", "w1", "w2", "w3"], default="w2-cpu")
    p.add_argument("--model", default="default", help="default | llama-1b-random | a model id or path")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"])
    p.add_argument("--static-batch-sizes", default="8,32", help="comma-separated generate() batch sizes")
    p.add_argument("--skip-static", action="store_true", help="run the paged engine only")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (CPU)")
    p.add_argument("--kv-cache-bytes", type=int, default=None)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-batch-tokens", type=int, default=2048)
    p.add_argument("--max-prefill-chunk-tokens", type=int, default=512)
    p.add_argument("--kv-reserve", choices=["worst_case", "optimistic"], default="worst_case")
    p.add_argument("--no-prefix-caching", action="store_true")
    p.add_argument("--json-out", type=Path, default=None)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    loaded = load(args)
    vocab = min(loaded.model.config.vocab_size, len(loaded.tokenizer))
    workload = build_workload(args.workload, vocab)
    prompt_tokens = sum(len(p) for p in workload.prompts)
    dtype = next(loaded.model.parameters()).dtype
    print(
        f"workload={workload.name} requests={len(workload.prompts)} prompt_tokens={prompt_tokens} "
        f"output_tokens={sum(workload.max_tokens)} model={loaded.source} device={device} dtype={dtype} "
        f"threads={torch.get_num_threads()}",
        flush=True,
    )
    results = [run_paged(loaded, workload, device, args)]
    print(f"  done: {results[-1].system} in {results[-1].wall_s:.1f}s", flush=True)
    if not args.skip_static:
        for batch_size in (int(b) for b in args.static_batch_sizes.split(",") if b):
            results.append(run_static(loaded, workload, device, batch_size))
            print(f"  done: {results[-1].system} in {results[-1].wall_s:.1f}s", flush=True)
    rows = [r.summary() for r in results]
    print(format_table(rows, device))
    if args.json_out:
        config = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
        args.json_out.write_text(json.dumps({"config": config, "results": rows}, indent=2))


if __name__ == "__main__":
    main()
