"""Quality of weight and KV-cache formats on the real model: perplexity and greedy-token agreement.

Each row loads the model with one weights format (`LLM_WEIGHTS`), builds a `PagedEngine` with that
row's engine options, and measures through the engine itself (paged KV cache, chunked prefill, the
backend in force), so a KV format or a KV eviction policy shows up in the numbers when its row
passes the engine option that turns it on:

  perplexity  The text is tokenised whole (no special tokens) and cut into consecutive,
              non-overlapping windows of `--window` tokens (the tail shorter than a window is
              dropped). Each window is one request on a fresh context, prefilled in chunks of
              `--chunk` tokens, so every chunk after the first attends to the K/V that earlier
              chunks wrote into the paged cache. A forward hook on the decoder keeps the final
              hidden state of every token; the model's own `lm_head` turns them into logits, and
              token t+1 is scored at position t (a window's first token is context only).
              PPL = exp(mean NLL over every scored token). Prefix caching is off, so every token is
              computed.
  agreement   64 fixed chat prompts (`PROMPTS`: facts, reasoning, code, writing, advice, ...),
              greedy, up to `--max-tokens` new tokens, EOS honoured, all 64 in the engine at once.
              Against the baseline row's tokens: `identical` = prompts with exactly the same tokens;
              `prefix` = mean over prompts of (common prefix length / baseline length), the share of
              the baseline's greedy tokens a row reproduces before its first divergence.

Perplexity text: `loadtest/data/pride_and_prejudice_ch1-12.txt`, chapters I-XII of Jane Austen's
*Pride and Prejudice* (1813), from the Project Gutenberg eBook #1342 (the 1894 George Allen edition),
illustration captions and italics marks removed and paragraphs unwrapped; 99,951 characters,
23,614 SmolLM2 tokens. The novel is in the public domain; no Project Gutenberg header, footer or
trademark is included (see loadtest/data/README.md). Being a classic it is almost certainly in the
model's pre-training data, so absolute perplexities read low; the comparison between rows is what
this measures. Nothing here calibrates on it (INT8 scales come from the weights alone).

Rows (`--rows`, comma-separated, in order; the first is the agreement reference):

  baseline               LLM_WEIGHTS=auto (FP32 on CPU, FP16 on GPU)
  int8-weights           LLM_WEIGHTS=int8: weight-only INT8 linears, per-output-channel scales, and
                         the (tied) embedding / lm_head as one INT8 table with a scale per row
  int8-weights-lm-head   INT8 linears and an INT8 lm_head, the embedding lookup float (what an untied
                         model would get if its embedding stayed float: isolates the lookup's cost)
  int8-weights-float-embedding  INT8 linears only; embedding and lm_head float (LLM_WEIGHTS=int8
                         before the embedding was quantised)
  w8a8                   INT8 linears with per-token INT8 activations (`torch._int_mm`)
  bf16                   LLM_WEIGHTS=bf16: the whole model in bfloat16, for scale (what a plain
                         half-precision change costs in perplexity and agreement)
  int8-kv                LLM_KV_DTYPE=int8: INT8 K/V rotated by the normalised Hadamard matrix, one
                         FP16 scale per token per KV head, weights as the baseline
  int8-weights-int8-kv   LLM_WEIGHTS=int8 and LLM_KV_DTYPE=int8 together

  window-50, window-25    KV pruning, LLM_KV_PRUNE_MODE=window (4 sink tokens = one block kept, then
                         the most recent blocks), at a budget of 50% / 25% of each request's tokens
  snapkv-50, snapkv-25   KV pruning, LLM_KV_PRUNE_MODE=snapkv (sinks, the prompt blocks the last 32
                         queries of each prefill chunk attend to most, the recent window)
  int8-kv-snapkv-50      both: an INT8 cache pruned by snapkv at 50%

A pruning row's budget is a share of each request's length, set per request (`kv_budget_tokens`):
for perplexity, of the window (50%: 512 of 1024 tokens, so the window's second half is scored with
at most 512 cached tokens; its chunks are cut to (budget - 16) / 2 tokens); for agreement, of
prompt + max_tokens, rounded up to a block and at least the smallest budget (32 tokens), so a
short chat may end up with more than the share.

    python loadtest/kv_quality.py                                   # baseline, int8-weights
    python loadtest/kv_quality.py --rows baseline,int8-weights,w8a8 --json-out docs/bench/cpu_quality.json
    python loadtest/kv_quality.py --rows baseline,int8-weights,int8-kv,int8-weights-int8-kv
    python loadtest/kv_quality.py --windows 2 --prompts 8           # a quick look
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from scheduler import BatchPolicy  # noqa: E402
from worker.engine.base import GenerationRequest, SamplingParams  # noqa: E402
from worker.engine.config import EngineConfig  # noqa: E402
from worker.engine.model_files import DEFAULT_MODEL, LoadedModel  # noqa: E402
from worker.engine.model_loader import load_model  # noqa: E402
from worker.engine.paged_engine import PagedEngine  # noqa: E402
from worker.engine.quant import quantize_linears  # noqa: E402

TEXT = ROOT / "loadtest" / "data" / "pride_and_prejudice_ch1-12.txt"

PROMPTS = [
    # facts
    "What is the capital of Australia?",
    "Who wrote the novel Frankenstein?",
    "How many planets are in the solar system? Name them.",
    "What is the boiling point of water at sea level in Fahrenheit?",
    "Which element has the chemical symbol Fe?",
    "When did the Berlin Wall fall?",
    "What is the largest ocean on Earth?",
    "Who painted the Mona Lisa?",
    # science and explanation
    "Explain photosynthesis in two sentences.",
    "Why is the sky blue?",
    "What is the difference between a virus and a bacterium?",
    "How does a refrigerator keep food cold?",
    "Explain what inflation means in economics.",
    "What causes the seasons on Earth?",
    "Describe how vaccines train the immune system.",
    "What is machine learning, in simple terms?",
    # math and reasoning
    "What is 17 multiplied by 23?",
    "If a train travels 120 km in 1.5 hours, what is its average speed?",
    "Is 91 a prime number? Explain.",
    "Solve for x: 3x + 7 = 22.",
    "A shirt costs $40 and is discounted by 25%. What is the new price?",
    "What is the next number in the sequence 2, 6, 12, 20, 30?",
    "How many minutes are there in a week?",
    "If all cats are animals and some animals are black, are all cats black?",
    # code
    "Write a Python function that reverses a string.",
    "What does the SQL statement SELECT COUNT(*) FROM users do?",
    "Explain the difference between a list and a tuple in Python.",
    "Write a JavaScript function that returns the largest number in an array.",
    "What is a race condition in concurrent programming?",
    "How do I read a file line by line in Python?",
    "What is the time complexity of binary search?",
    "Write a bash command that counts the lines in every .txt file in a folder.",
    # writing
    "Write a haiku about autumn leaves.",
    "Write a two-sentence horror story.",
    "Write a short thank-you note to a teacher.",
    "Describe a sunset over the sea in three sentences.",
    "Write a limerick about a cat who loves to code.",
    "Give me a catchy slogan for a bicycle shop.",
    "Write the opening line of a mystery novel.",
    "Summarize the plot of Romeo and Juliet in three sentences.",
    # advice and how-to
    "How can I improve my sleep?",
    "Give me three tips for a job interview.",
    "How do I make a simple tomato sauce?",
    "What should I pack for a weekend hiking trip?",
    "How can I save money on groceries?",
    "What are good ways to learn a new language?",
    "How do I change a flat tire?",
    "How should I prepare for a marathon?",
    # language and transformation
    "Translate 'Good morning, how are you?' into French.",
    "What is the plural of 'mouse'?",
    "Give three synonyms for 'happy'.",
    "Correct the grammar: 'She don't like apples.'",
    "Rewrite this sentence formally: 'Gonna grab food, brb.'",
    "What does the idiom 'break the ice' mean?",
    "Turn this list into a sentence: apples, bread, milk.",
    "Explain the difference between 'affect' and 'effect'.",
    # opinion, planning, misc
    "What are the pros and cons of working from home?",
    "Plan a one-day itinerary for a visit to Paris.",
    "Suggest a name for a golden retriever puppy.",
    "What are three benefits of regular exercise?",
    "Compare electric cars and gasoline cars briefly.",
    "What is a healthy breakfast I can make in five minutes?",
    "Tell me a fun fact about octopuses.",
    "What questions should I ask before adopting a dog?",
]
assert len(PROMPTS) == 64


@dataclass
class Row:
    """One configuration: a weights format for the loader, options for `PagedEngine`, an optional
    model transform after loading (e.g. quantising lm_head too)."""

    name: str
    weights: str = "auto"
    engine_options: dict[str, Any] = field(default_factory=dict)
    transform: Callable[[Any], None] | None = None
    note: str = ""
    kv_fraction: float | None = None  # KV pruning budget as a share of each request's tokens


def build_rows(args: argparse.Namespace) -> dict[str, Row]:
    def quantize_lm_head(model: Any) -> None:
        quantize_linears(model, skip=())  # lm_head too (from the tied float table, which stays)

    def quantize_linears_only(model: Any) -> None:
        quantize_linears(model)  # lm_head skipped

    return {
        row.name: row
        for row in (
            Row("baseline", note="LLM_WEIGHTS=auto"),
            Row("int8-weights", "int8", note="INT8 linears; one INT8 table for embedding and lm_head"),
            Row(
                "int8-weights-lm-head",
                transform=quantize_lm_head,
                note="INT8 linears and lm_head; embedding lookup float",
            ),  # fmt: skip
            Row(
                "int8-weights-float-embedding",
                transform=quantize_linears_only,
                note="INT8 linears only; embedding and lm_head float",
            ),  # fmt: skip
            Row("w8a8", "w8a8", note="INT8 weights + per-token INT8 activations"),
            Row("bf16", "bf16", note="every weight and activation in bfloat16: a reference precision change"),
            Row(
                "int8-kv",
                engine_options={"kv_dtype": "int8"},
                note="LLM_KV_DTYPE=int8 (K/V rotated by H before quantising)",
            ),  # fmt: skip
            Row(
                "int8-weights-int8-kv",
                "int8",
                engine_options={"kv_dtype": "int8"},
                note="LLM_WEIGHTS=int8, LLM_KV_DTYPE=int8",
            ),  # fmt: skip
            *(
                Row(
                    f"{mode}-{pct}",
                    engine_options={"kv_prune_mode": mode},
                    kv_fraction=pct / 100,
                    note=f"LLM_KV_PRUNE_MODE={mode}, budget {pct}% of each request's tokens",
                )  # fmt: skip
                for mode in ("window", "snapkv")
                for pct in (50, 25)
            ),
            Row(
                "int8-kv-snapkv-50",
                engine_options={"kv_dtype": "int8", "kv_prune_mode": "snapkv"},
                kv_fraction=0.5,
                note="LLM_KV_DTYPE=int8 and snapkv at 50%",
            ),  # fmt: skip
        )
    }


@dataclass
class RowResult:
    name: str
    weights: str
    kv_dtype: str
    weight_bytes: int
    ppl: float
    nll: float
    scored_tokens: int
    ppl_s: float
    gen_s: float
    gen_tokens: int
    identical: int | None = None
    prefix_agreement: float | None = None
    kv_blocks: int = 0  # blocks of the pool at --kv-cache-mib (INT8 KV: ~1.94x FP16's)
    note: str = ""


def weight_bytes(model: Any) -> int:
    """Bytes of the model's parameters and buffers, a tensor shared by two modules (tied) counted once."""
    tensors = {t.data_ptr(): t for t in (*model.parameters(), *model.buffers())}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def make_engine(loaded: LoadedModel, row: Row, args: argparse.Namespace) -> PagedEngine:
    policy = BatchPolicy(
        max_wait_ms=0, max_batch_tokens=max(args.chunk, 2048), max_prefill_chunk_tokens=args.chunk,
        max_num_seqs=len(PROMPTS),
    )  # fmt: skip
    config = EngineConfig(
        model=args.model, policy=policy, kv_cache_bytes=args.kv_cache_mib << 20, enable_prefix_caching=False,
        attention_backend=args.attention_backend, **row.engine_options,
    )  # fmt: skip
    return PagedEngine(loaded.model, loaded.tokenizer, config)


def kv_budget(num_tokens: int, fraction: float | None, engine: PagedEngine) -> int | None:
    """A budget of `fraction` of `num_tokens`, rounded up to a block, at least the engine's smallest."""
    if fraction is None:
        return None
    bs = engine.block_manager.block_size
    return max(-(-int(num_tokens * fraction) // bs) * bs, engine.prune.min_budget_tokens)


def _request(
    rid: str, ids: list[int], max_tokens: int, ignore_eos: bool, kv_budget_tokens: int | None = None
) -> GenerationRequest:
    return GenerationRequest(
        seq_id=rid, prompt_token_ids=ids, arrival_s=time.monotonic(),
        sampling=SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=ignore_eos),
        kv_budget_tokens=kv_budget_tokens,
    )  # fmt: skip


@torch.inference_mode()
def perplexity(
    engine: PagedEngine, windows: list[list[int]], kv_fraction: float | None = None
) -> tuple[float, int]:
    """(sum of NLL, scored tokens) over the windows, each prefilled in chunks through the engine."""
    model = engine.model
    captured: list[torch.Tensor] = []

    def keep_hidden(_module: Any, _inputs: Any, output: Any) -> None:
        hidden = output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]
        captured.append(hidden[0].detach())

    handle = model.get_decoder().register_forward_hook(keep_hidden)
    total_nll, scored = 0.0, 0
    try:
        for w, ids in enumerate(windows):
            captured.clear()
            budget = kv_budget(len(ids), kv_fraction, engine)
            engine.add_request(_request(f"ppl{w}", ids, 1, ignore_eos=True, kv_budget_tokens=budget))
            while engine.has_unfinished():
                engine.step()
            hidden = torch.cat(captured)
            if hidden.shape[0] != len(ids):
                raise RuntimeError(f"window {w}: {hidden.shape[0]} hidden states for {len(ids)} tokens")
            targets = torch.tensor(ids[1:], device=hidden.device)
            for start in range(0, len(ids) - 1, 256):
                end = min(start + 256, len(ids) - 1)
                logits = model.lm_head(hidden[start:end]).float()
                nll = torch.nn.functional.cross_entropy(logits, targets[start:end], reduction="sum")
                total_nll += float(nll)
            scored += len(ids) - 1
    finally:
        handle.remove()
    return total_nll, scored


def greedy(
    engine: PagedEngine, prompts: list[list[int]], max_tokens: int, kv_fraction: float | None = None
) -> list[list[int]]:
    for i, ids in enumerate(prompts):
        budget = kv_budget(len(ids) + max_tokens, kv_fraction, engine)
        engine.add_request(_request(f"p{i}", ids, max_tokens, ignore_eos=False, kv_budget_tokens=budget))
    tokens: dict[str, list[int]] = {}
    while engine.has_unfinished():
        for out in engine.step():
            tokens.setdefault(out.seq_id, []).extend(out.new_token_ids)
    return [tokens.get(f"p{i}", []) for i in range(len(prompts))]


def agreement(reference: list[list[int]], tokens: list[list[int]]) -> tuple[int, float]:
    identical = sum(a == b for a, b in zip(reference, tokens, strict=True))
    shares = []
    for ref, got in zip(reference, tokens, strict=True):
        common = 0
        for a, b in zip(ref, got, strict=False):
            if a != b:
                break
            common += 1
        shares.append(common / len(ref) if ref else float(not got))
    return identical, sum(shares) / len(shares)


def run_row(row: Row, args: argparse.Namespace, text: str) -> tuple[RowResult, list[list[int]]]:
    loaded = load_model(args.model, device=args.device, dtype=args.dtype, weights=row.weights)
    if row.transform is not None:
        row.transform(loaded.model)
    engine = make_engine(loaded, row, args)
    tokenizer = loaded.tokenizer
    ids = tokenizer.encode(text, add_special_tokens=False)
    windows = [ids[i : i + args.window] for i in range(0, len(ids) - args.window + 1, args.window)]
    windows = windows[: args.windows] if args.windows else windows
    t0 = time.perf_counter()
    nll, scored = perplexity(engine, windows, row.kv_fraction)
    t1 = time.perf_counter()
    prompts = [engine.encode_chat([{"role": "user", "content": p}]) for p in PROMPTS[: args.prompts]]
    tokens = greedy(engine, prompts, args.max_tokens, row.kv_fraction)
    t2 = time.perf_counter()
    info = engine.describe()
    result = RowResult(
        name=row.name, weights=info["weights"], kv_dtype=info["kv_dtype"],
        weight_bytes=weight_bytes(loaded.model), ppl=math.exp(nll / scored), nll=nll / scored,
        scored_tokens=scored, ppl_s=round(t1 - t0, 1), gen_s=round(t2 - t1, 1),
        gen_tokens=sum(len(t) for t in tokens), kv_blocks=int(info["kv_blocks"]), note=row.note,
    )  # fmt: skip
    engine.close()
    del engine, loaded
    gc.collect()
    return result, tokens


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}{gpu}"


def commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
        )
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True).stdout.strip()  # fmt: skip
        return out.stdout.strip() + ("+dirty" if dirty else "")
    except OSError:
        return "unknown"


def print_table(results: list[RowResult], baseline: RowResult, num_prompts: int) -> None:
    headers = ["row", "weights", "KV", "weights MiB", "KV blocks", "PPL", "vs baseline", "identical",
               "prefix agree", "PPL s", "gen s"]  # fmt: skip
    rows = []
    for r in results:
        delta = f"{(r.ppl / baseline.ppl - 1) * 100:+.2f}%"
        ident = "-" if r.identical is None else f"{r.identical}/{num_prompts}"
        prefix = "-" if r.prefix_agreement is None else f"{r.prefix_agreement * 100:.1f}%"
        rows.append([r.name, r.weights, r.kv_dtype, f"{r.weight_bytes / 2**20:.1f}", str(r.kv_blocks),
                     f"{r.ppl:.3f}", delta, ident, prefix, f"{r.ppl_s:.0f}", f"{r.gen_s:.0f}"])  # fmt: skip
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        print("| " + " | ".join(headers) + " |")
        print("|" + " --- |" * len(headers))
        for row in rows:
            print("| " + " | ".join(row) + " |")
        return
    table = Table(*headers)
    for row in rows:
        table.add_row(*row)
    Console(width=160).print(table)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--rows", default="baseline,int8-weights", help="comma-separated row names (first = reference)"
    )
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="auto", help="LLM_DTYPE of every row")
    p.add_argument("--attention-backend", default="auto")
    p.add_argument("--window", type=int, default=1024, help="perplexity window, tokens")
    p.add_argument("--chunk", type=int, default=256, help="prefill chunk (max_prefill_chunk_tokens)")
    p.add_argument("--windows", type=int, default=0, help="score only the first N windows (0: all)")
    p.add_argument("--prompts", type=int, default=len(PROMPTS), help="use the first N chat prompts")
    p.add_argument("--max-tokens", type=int, default=48, help="greedy tokens per chat prompt")
    p.add_argument("--kv-cache-mib", type=int, default=512)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--text", type=Path, default=TEXT)
    p.add_argument("--json-out", type=Path)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    available = build_rows(args)
    names = [n.strip() for n in args.rows.split(",") if n.strip()]
    unknown = [n for n in names if n not in available]
    if unknown:
        p.error(f"unknown rows {unknown}; known: {', '.join(available)}")
    text = args.text.read_text(encoding="utf-8")
    started = {"commit": commit(), "machine": machine()}  # the code measured, not what HEAD is at the end
    results: list[RowResult] = []
    reference: list[list[int]] | None = None
    for name in names:
        result, tokens = run_row(available[name], args, text)
        if reference is None:
            reference = tokens
        result.identical, result.prefix_agreement = agreement(reference, tokens)
        results.append(result)
        seconds = result.ppl_s + result.gen_s
        print(
            f"{name}: PPL {result.ppl:.3f} over {result.scored_tokens} tokens, "
            f"{result.identical}/{args.prompts} identical, {seconds:.0f} s",
            flush=True,
        )
    print_table(results, results[0], args.prompts)
    meta = {
        "command": "python " + " ".join(sys.argv if argv is None else [sys.argv[0], *argv]),
        **started, "model": args.model, "text": str(args.text.name),
        "window": args.window, "chunk": args.chunk, "prompts": args.prompts, "max_tokens": args.max_tokens,
        "threads": torch.get_num_threads(), "dtype": args.dtype,
    }  # fmt: skip
    print(json.dumps(meta))
    if args.json_out:
        args.json_out.write_text(
            json.dumps({"meta": meta, "rows": [asdict(r) for r in results]}, indent=2) + "\n"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
