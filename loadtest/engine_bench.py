"""Engine benchmark: the paged continuous-batching engine vs transformers baselines.

Everything runs in this process, on the same model and the same fixed-seed workload, with every request
arriving at t=0 (offline throughput; TTFT then includes queueing). The paged engine runs first, then each
`--baseline` in the order given, each a row of the same table and JSON:

  generate        `generate()` on left-padded batches of each of `--static-batch-sizes` (dynamic KV cache)
  generate_batch  transformers' own continuous batching (`model.generate_batch`, paged|sdpa attention); it
                  takes one generation config for all requests, so every request gets max_new_tokens =
                  round(mean of the workload's max_tokens) and the row counts the tokens really produced;
                  same step token budget and sequence cap as the engine, KV blocks matched to the engine's
                  budget where one is fixed (the workload's, `--kv-cache-bytes`, or the CPU default)
  static_compile  `generate()` with a static KV cache (one `StaticCache` per batch shape, sized for the
                  longest batch and reused, so shapes never change) on left-padded batches of each of
                  `--static-batch-sizes`; on CUDA transformers compiles its decode step (torch.compile,
                  reduce-overhead: CUDA graphs). A warm-up generate per batch shape runs before the clock
                  starts; its seconds are printed. On CPU transformers does not compile: the row says so.

Workloads (DESIGN.md, Benchmarks):

  w2-cpu  32 requests, 512-token shared prefix + 32 own tokens, 32 new tokens (W2 scaled for CPU)
  w1      1,000 requests, 256-token shared system prompt, user turns log-uniform 16-512, max_tokens 32-256
  w2      256 requests, 2,048-token shared prefix + 32 own tokens, 64 new tokens
  w3      64 requests of 8,192 prompt tokens, 256 new tokens, KV cache 25% of what all of them need
          (with `--kv-budget-tokens 2112`, each request is pruned to 25% of its 8,448 tokens, so all 64 fit)

EOS is ignored everywhere, so every system produces the tokens it was asked for. Examples:

  HF_HUB_OFFLINE=1 python loadtest/engine_bench.py --workload w2-cpu --threads 1
  python loadtest/engine_bench.py --workload w2 --model llama-1b-random --device cuda --dtype float16
  python loadtest/engine_bench.py --workload w1 --model llama-1b-random --device cuda --dtype float16 \
      --baseline generate,generate_batch,static_compile --static-batch-sizes 64 --json-out w1.json
  python loadtest/engine_bench.py --workload w2-cpu --model tiny-random --baseline generate_batch
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import statistics
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psutil
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from scheduler import BatchPolicy  # noqa: E402
from worker.engine.base import GenerationRequest, SamplingParams  # noqa: E402
from worker.engine.config import EngineConfig  # noqa: E402
from worker.engine.cuda_allocator import allocator_defaults  # noqa: E402
from worker.engine.kv_cache import KV_DTYPE_CHOICES, KVCacheSpec  # noqa: E402
from worker.engine.model_files import DEFAULT_MODEL, LoadedModel  # noqa: E402
from worker.engine.model_loader import load_model  # noqa: E402
from worker.engine.paged_engine import PagedEngine  # noqa: E402
from worker.engine.quant import WEIGHTS_CHOICES, weights_label  # noqa: E402
from worker.engine.structured import GrammarSpec  # noqa: E402

# `--response-format json_schema`: what a routing / extraction reply looks like (nested, an enum, a
# bounded number, an array); a random-weights model fills it with whatever the mask allows.
REPLY_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "intent": {"enum": ["question", "complaint", "order", "other"]},
        "confidence": {"type": "number", "minimum": 0, "maximum": 1},
        "entities": {"type": "array", "items": {"type": "object", "properties": {
            "name": {"type": "string"}, "kind": {"type": "string"}}, "required": ["name", "kind"]}},
        "answer": {"type": "string"},
    },
    "required": ["intent", "confidence", "entities", "answer"],
}  # fmt: skip

FIRST_ORDINARY_ID = 100  # below are SmolLM2's special and byte tokens; random prompts avoid them
BASELINES = ("generate", "generate_batch", "static_compile")
STATIC_WARMUP_TOKENS = 16  # enough decode steps to compile and record the CUDA graphs of one batch shape
GIB = 1 << 30


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
    prefill_tokens: int | None  # None where the system does not report it
    peak_memory_bytes: int
    ttft_ms: list[float] = field(repr=False)
    tpot_ms: list[float] = field(repr=False)
    notes: dict[str, Any] = field(default_factory=dict)  # warm-up seconds, resolved settings

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


def kv_budget_bytes(loaded: LoadedModel, workload: Workload, args: argparse.Namespace) -> int | None:
    """The KV cache bytes fixed by `--kv-cache-bytes` or the workload; None = the engine's default."""
    if args.kv_cache_bytes is not None or workload.kv_fraction is None:
        return args.kv_cache_bytes
    spec = KVCacheSpec.from_model_config(loaded.model.config, next(loaded.model.parameters()).dtype)
    return int(workload.total_kv_tokens * workload.kv_fraction * spec.bytes_per_block(1))


def pad_token_id(loaded: LoadedModel) -> int:
    """The tokenizer's pad id, else its EOS id (a tokenizer converted from GGUF may define no pad token)."""
    pad = loaded.tokenizer.pad_token_id
    return int(pad if pad is not None else loaded.tokenizer.eos_token_id)


def model_name(args: argparse.Namespace) -> str:
    return DEFAULT_MODEL if args.model == "default" else args.model


def engine_options(args: argparse.Namespace) -> dict[str, Any]:
    """EngineConfig fields set only when asked for (the engine's defaults otherwise)."""
    options: dict[str, Any] = {"cuda_graphs": False} if args.enforce_eager else {}
    if args.prefill_interval_steps is not None:
        options["prefill_interval_steps"] = args.prefill_interval_steps
    if args.no_fused_layers:
        options["fused_layers"] = False
    if args.kv_dtype != "auto":
        options["kv_dtype"] = args.kv_dtype
    if args.async_scheduling != "auto":
        options["async_scheduling"] = args.async_scheduling == "on"
    if getattr(args, "kv_budget_tokens", 0):
        options["kv_budget_tokens"] = args.kv_budget_tokens
        options["kv_prune_mode"] = args.kv_prune_mode
    return options


def run_paged(
    loaded: LoadedModel, workload: Workload, device: torch.device, args: argparse.Namespace
) -> RunResult:
    # No time window: the whole workload is queued at once.
    policy = BatchPolicy(
        max_wait_ms=0, max_num_seqs=args.max_num_seqs, max_batch_tokens=args.max_batch_tokens,
        max_prefill_chunk_tokens=args.max_prefill_chunk_tokens, kv_reserve=args.kv_reserve,
    )  # fmt: skip
    config = EngineConfig(
        model=model_name(args), policy=policy, kv_cache_bytes=kv_budget_bytes(loaded, workload, args),
        kv_block_size_tokens=args.block_size, enable_prefix_caching=not args.no_prefix_caching,
        grammar_threads=args.grammar_threads,
        **engine_options(args),
    )  # fmt: skip
    engine = PagedEngine(loaded.model, loaded.tokenizer, config)
    first: dict[str, float] = {}
    last: dict[str, float] = {}
    counts: dict[str, int] = {}
    prefill = 0
    with PeakMemory(device) as mem:
        start = time.perf_counter()
        for i, (prompt, max_tokens) in enumerate(zip(workload.prompts, workload.max_tokens, strict=True)):
            sampling = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
            grammar = GrammarSpec.json_schema(REPLY_SCHEMA) if args.response_format == "json_schema" else None
            engine.add_request(
                GenerationRequest(f"r{i}", prompt, sampling, arrival_s=time.monotonic(), grammar=grammar)
            )
        while engine.has_unfinished():
            outputs = engine.step()
            now = time.perf_counter()
            prefill += engine.last_step_stats().prefill_tokens
            for out in outputs:
                if out.new_token_ids:
                    first.setdefault(out.seq_id, now)
                    last[out.seq_id] = now
                    counts[out.seq_id] = counts.get(out.seq_id, 0) + len(out.new_token_ids)
        wall = time.perf_counter() - start
    engine.close()
    tpot = [(last[r] - first[r]) * 1000 / (counts[r] - 1) for r in counts if counts[r] > 1]
    notes = engine_options(args)
    return RunResult(
        "paged engine", len(workload.prompts), sum(counts.values()), wall, prefill, mem.peak,
        [(t - start) * 1000 for t in first.values()], tpot, notes,
    )  # fmt: skip


class TokenClock:
    """A `generate()` streamer that only records when each decoding step delivered its tokens."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def put(self, value: torch.Tensor) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def left_padded(
    prompts: list[list[int]], pad_id: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Input ids and attention mask of `prompts` left-padded to the longest."""
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    return ids, mask


def run_static(
    loaded: LoadedModel, workload: Workload, device: torch.device, batch_size: int, static_cache: bool = False
) -> RunResult:
    """transformers `generate()` on left-padded batches of `batch_size`, in arrival order.

    With `static_cache`, each batch shape gets one `StaticCache` sized for the longest batch (prompt width
    plus its new tokens), reset and reused by every batch of that shape: the decode step sees the same
    shapes and cache addresses every time, so on CUDA transformers' automatic compile (torch.compile,
    reduce-overhead) traces and records its CUDA graphs once, during a warm-up before the clock starts.
    """
    from transformers import StaticCache

    model, pad_id = loaded.model, pad_token_id(loaded)
    model.set_attn_implementation("sdpa")
    batches = [
        (workload.prompts[lo : lo + batch_size], workload.max_tokens[lo : lo + batch_size])
        for lo in range(0, len(workload.prompts), batch_size)
    ]
    max_cache_len = max(max(len(p) for p in prompts) + max(news) for prompts, news in batches)
    caches: dict[int, Any] = {}

    def generate(prompts: list[list[int]], new: int, streamer: TokenClock | None = None) -> torch.Tensor:
        ids, mask = left_padded(prompts, pad_id, device)
        kwargs: dict[str, Any] = {}
        if static_cache:
            cache = caches.get(len(prompts))
            if cache is None:
                cache = caches[len(prompts)] = StaticCache(config=model.config, max_cache_len=max_cache_len)
            cache.reset()
            kwargs["past_key_values"] = cache
        return model.generate(
            ids, attention_mask=mask, max_new_tokens=new, do_sample=False, eos_token_id=[],
            pad_token_id=pad_id, streamer=streamer, **kwargs,
        )  # fmt: skip

    label, notes = f"generate() bs={batch_size}", {}
    if static_cache:
        warm_start = time.perf_counter()
        with torch.no_grad():
            for prompts, news in {len(p): (p, n) for p, n in (batches[0], batches[-1])}.values():
                generate(prompts, min(max(news), STATIC_WARMUP_TOKENS))
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        compiled = hasattr(model, "_compiled_call")  # set by transformers when it compiled the decode step
        label = f"generate(static cache, {'compiled' if compiled else 'not compiled'}) bs={batch_size}"
        warmup_s = time.perf_counter() - warm_start
        if not compiled:
            print(
                f"  note: transformers compiles the decode step only on accelerators; {device} runs it eager"
            )
        notes = {"warmup_s": warmup_s, "compiled": compiled, "max_cache_len": max_cache_len}
    ttft: list[float] = []
    tpot: list[float] = []
    output_tokens = prefill = 0
    # no_grad rather than inference_mode under compile: generate()'s own mode, what transformers tests.
    with PeakMemory(device) as mem, torch.no_grad() if static_cache else torch.inference_mode():
        start = time.perf_counter()
        for prompts, news in batches:
            clock = TokenClock()
            new = max(news)  # a static batch runs to its longest
            out = generate(prompts, new, clock)
            generated = out.shape[1] - max(len(p) for p in prompts)
            prefill += len(prompts) * max(len(p) for p in prompts)
            output_tokens += sum(news)
            first_token = clock.times[1]  # times[0] is the prompt being handed over
            ttft += [(first_token - start) * 1000] * len(prompts)
            tpot += [(clock.times[-1] - first_token) * 1000 / max(generated - 1, 1)] * len(prompts)
        wall = time.perf_counter() - start
    caches.clear()
    return RunResult(label, len(workload.prompts), output_tokens, wall, prefill, mem.peak, ttft, tpot, notes)


def run_generate_batch(
    loaded: LoadedModel, workload: Workload, device: torch.device, args: argparse.Namespace
) -> RunResult:
    """transformers' continuous batching (`generate_batch`), one max_new_tokens for every request.

    The wall clock runs from the first request's creation to the last one's end, so the manager's setup
    and warm-up (timed separately) and its shutdown are outside it, as the engine's construction is.
    """
    from transformers import GenerationConfig
    from transformers.generation import ContinuousBatchingConfig

    model = loaded.model
    new = round(statistics.fmean(workload.max_tokens))
    # The engine's step token budget and sequence cap; KV blocks matched to its budget where one is fixed.
    cb_fields: dict[str, Any] = {"max_batch_tokens": args.max_batch_tokens}
    cb_fields["max_requests_per_batch"] = args.max_num_seqs
    defaults = ContinuousBatchingConfig()
    # Tokens per block: `block_size` in transformers 5.17, renamed `page_size` in later releases.
    block: int = getattr(defaults, "page_size", None) or defaults.block_size or 256
    kv_bytes = kv_budget_bytes(loaded, workload, args)
    if kv_bytes is not None:
        spec = KVCacheSpec.from_model_config(model.config, next(model.parameters()).dtype)
        cb_fields["num_blocks"] = max(1, kv_bytes // spec.bytes_per_block(block))
    elif device.type == "cpu":
        # transformers would size the cache from the host's RAM (and budget a dense mask of
        # max_batch_tokens x cache tokens): give it room for every request at once, no more.
        lengths = [len(p) + new for p in workload.prompts]
        cb_fields["num_blocks"] = sum(-(-n // block) for n in lengths)
    generation_config = GenerationConfig(
        max_new_tokens=new, do_sample=False, eos_token_id=-1, pad_token_id=pad_token_id(loaded)
    )  # eos -1: no request stops early
    model.set_attn_implementation("paged|sdpa")  # SDPA, as the other systems; no flash-attn assumed
    with PeakMemory(device) as mem:
        call_start = time.perf_counter()
        outputs = model.generate_batch(
            workload.prompts, generation_config=generation_config,
            continuous_batching_config=ContinuousBatchingConfig(**cb_fields), record_timestamps=True,
        )  # fmt: skip
    model.set_attn_implementation("sdpa")
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    results = list(outputs.values())
    errors = [r.error for r in results if r.error is not None]
    if len(results) != len(workload.prompts) or errors:
        got = f"{len(results)}/{len(workload.prompts)}"
        raise RuntimeError(f"generate_batch returned {got} results; errors: {errors[:3]}")
    start = min(r.created_time for r in results)
    wall = max(r.lifespan[1] for r in results) - start
    stamps = [r.timestamps or [] for r in results]
    ttft = [(ts[0] - start) * 1000 for ts in stamps if ts]
    tpot = [(ts[-1] - ts[0]) * 1000 / (len(ts) - 1) for ts in stamps if len(ts) > 1]
    notes = {"setup_s": start - call_start, "max_new_tokens": new, **cb_fields}
    return RunResult(
        f"generate_batch (max_new_tokens={new} each)", len(results),
        sum(len(r.generated_tokens) for r in results), wall, None, mem.peak, ttft, tpot, notes,
    )  # fmt: skip


def run_baselines(
    names: list[str], loaded: LoadedModel, workload: Workload, device: torch.device, args: argparse.Namespace
) -> tuple[list[RunResult], list[dict[str, str]]]:
    """Each baseline in turn; one that fails is reported and the others still run."""
    batch_sizes = [int(b) for b in args.static_batch_sizes.split(",") if b]
    runs: list[tuple[str, Any]] = []
    for name in names:
        if name == "generate_batch":
            runs.append((name, lambda: run_generate_batch(loaded, workload, device, args)))
        else:
            for bs in batch_sizes:
                runs.append((f"{name} bs={bs}", lambda bs=bs, name=name: run_static(
                    loaded, workload, device, bs, static_cache=name == "static_compile")))  # fmt: skip
    results: list[RunResult] = []
    failed: list[dict[str, str]] = []
    for name, run in runs:
        try:
            results.append(run())
        except Exception as exc:  # a baseline's failure must not lose the rows measured so far
            print(f"  FAILED: {name}: {type(exc).__name__}: {exc}", flush=True)
            failed.append({"system": name, "error": f"{type(exc).__name__}: {exc}"})
            continue
        r = results[-1]
        notes = " ".join(f"{k}={v:.1f}" if isinstance(v, float) else f"{k}={v}" for k, v in r.notes.items())
        print(f"  done: {r.system} in {r.wall_s:.1f}s {notes}".rstrip(), flush=True)
    return results, failed


def load(args: argparse.Namespace) -> LoadedModel:
    """The model, and on CUDA a line with the load's peak device memory beside the weights it left."""
    cuda = torch.device(args.device).type == "cuda"
    allocator_defaults(args.weights)  # before CUDA starts: a streamed INT8 load fragments the cache
    if cuda:
        torch.cuda.reset_peak_memory_stats(args.device)
        before = torch.cuda.memory_allocated(args.device)
    loaded = load_model(model_name(args), device=args.device, dtype=args.dtype, weights=args.weights)
    if cuda:
        held = torch.cuda.memory_allocated(args.device) - before
        peak = torch.cuda.max_memory_allocated(args.device) - before
        print(
            f"model load: weights held {held / GIB:.2f} GiB, peak GPU alloc {peak / GIB:.2f} GiB "
            f"(peak - weights = {(peak - held) / GIB:.2f} GiB)",
            flush=True,
        )
    return loaded


def format_table(rows: list[dict[str, Any]], device: torch.device) -> str:
    mem_label = "peak GPU alloc MiB" if device.type == "cuda" else "peak RSS MiB"
    columns = [
        ("system", "system", "{}"), ("output tok/s", "output_tok_s", "{:.1f}"),
        ("TTFT p50 ms", "ttft_p50_ms", "{:.0f}"), ("TTFT p95 ms", "ttft_p95_ms", "{:.0f}"),
        ("TPOT p50 ms", "tpot_p50_ms", "{:.1f}"), ("prefill tokens", "prefill_tokens", "{}"),
        ("wall s", "wall_s", "{:.1f}"), (mem_label, "peak_memory_bytes", "{}"),
    ]  # fmt: skip
    mib = [dict(r, peak_memory_bytes=r["peak_memory_bytes"] // (1 << 20)) for r in rows]
    return render_table(mib, columns)


def render_table(rows: list[dict[str, Any]], columns: list[tuple[str, str, str]]) -> str:
    """Rows as aligned text under (title, key, format) columns; a missing or None value prints n/a."""
    cells = [[title for title, _, _ in columns]]
    cells += [["n/a" if r.get(key) is None else fmt.format(r[key]) for _, key, fmt in columns] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
    lines = [
        "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))
        )
        for r in cells
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def add_model_args(p: argparse.ArgumentParser) -> None:
    """Model options shared with decode_step_bench.py."""
    models = "default | llama-1b-random | tiny-random | a model id or path"
    p.add_argument("--model", default="default", help=models)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"])
    quant = "LLM_WEIGHTS: int8 = weight-only INT8 linears, w8a8 = INT8 activations too"
    p.add_argument("--weights", default="auto", choices=WEIGHTS_CHOICES, help=quant)
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (CPU)")
    eager = "pass enforce_eager=True to PagedEngine (no CUDA graphs)"
    p.add_argument("--enforce-eager", action="store_true", help=eager)
    p.add_argument(
        "--prefill-interval-steps",
        type=int,
        default=None,
        help="PagedEngine prefill batching interval (default: the engine's, 8 with CUDA graphs)",
    )
    p.add_argument("--no-fused-layers", action="store_true", help="keep transformers' layers (no fused swap)")
    p.add_argument(
        "--kv-dtype", default="auto", choices=KV_DTYPE_CHOICES,
        help="paged engine's KV cache format (LLM_KV_DTYPE); a workload's KV budget stays in bytes",
    )  # fmt: skip
    p.add_argument(
        "--async-scheduling", default="auto", choices=["auto", "on", "off"],
        help="launch step N+1 before step N is read back (LLM_ASYNC_SCHEDULING; auto: the engine's default)",
    )  # fmt: skip


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workload", choices=["w2-cpu", "w1", "w2", "w3"], default="w2-cpu")
    add_model_args(p)
    p.add_argument("--baseline", default="generate", help=f"comma-separated, from {', '.join(BASELINES)}")
    p.add_argument("--static-batch-sizes", default="8,32", help="batch sizes of generate and static_compile")
    p.add_argument("--skip-static", action="store_true", help="run the paged engine only (no baseline)")
    p.add_argument("--kv-cache-bytes", type=int, default=None)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-batch-tokens", type=int, default=2048)
    p.add_argument("--max-prefill-chunk-tokens", type=int, default=512)
    p.add_argument("--kv-reserve", choices=["worst_case", "optimistic"], default="worst_case")
    p.add_argument("--no-prefix-caching", action="store_true")
    budget = "KV pruning budget of every request (LLM_KV_BUDGET_TOKENS; 0 = off), paged engine only"
    p.add_argument("--kv-budget-tokens", type=int, default=0, help=budget)
    p.add_argument("--kv-prune-mode", choices=["window", "snapkv"], default="window")
    p.add_argument(
        "--response-format", choices=["text", "json_schema"], default="text",
        help="json_schema: every paged-engine request's reply constrained to REPLY_SCHEMA",
    )  # fmt: skip
    p.add_argument("--grammar-threads", type=int, default=0, help="LLM_GRAMMAR_THREADS (0: the default)")
    p.add_argument("--json-out", type=Path, default=None)
    args = p.parse_args(argv)
    args.baselines = [b for b in args.baseline.split(",") if b]
    unknown = sorted(set(args.baselines) - set(BASELINES))
    if unknown:
        p.error(f"unknown --baseline {', '.join(unknown)}; choose from {', '.join(BASELINES)}")
    return args


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
        f"weights={weights_label(loaded.model)} threads={torch.get_num_threads()}",
        flush=True,
    )
    results = [run_paged(loaded, workload, device, args)]
    print(f"  done: {results[-1].system} in {results[-1].wall_s:.1f}s", flush=True)
    failed: list[dict[str, str]] = []
    if not args.skip_static:
        more, failed = run_baselines(args.baselines, loaded, workload, device, args)
        results += more
    rows = [r.summary() for r in results]
    print(format_table(rows, device))
    if args.json_out:
        config = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
        args.json_out.write_text(json.dumps({"config": config, "results": rows, "failed": failed}, indent=2))


if __name__ == "__main__":
    main()
