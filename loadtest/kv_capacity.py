"""KV admission capacity: how many W1-like sequences one KV pool admits at once, by KV format and pruning.

Admission is bookkeeping (block counts, prefix-cache hits, budgets), so this runs the engine's own
`StepScheduler` and `BlockManager` on CPU without a model: the pool holds the blocks that
`--kv-cache-mib` buys for the model shape (SmolLM2-135M-Instruct by default: 30 layers, 3 KV heads
of 64) in each KV format, the first `--requests` requests of workload W1 (`engine_bench.py`: a
256-token system prompt shared by all, user turns log-uniform 16-512, max_tokens 32-256) wait, and
one scheduler step admits as many as fit (token and sequence limits lifted, so KV is the only
limit). Prefix caching is on (unless `--no-prefix-caching`), so the shared system prompt is counted
once while it is shared.

A pruning row gives each request a budget of a share of its own prompt + max_tokens (rounded up to
a block, at least sinks + one block: 32 tokens), as `kv_quality.py` does. With `worst_case`
reservation (the default, `LLM_KV_RESERVE`) a request reserves prompt + max_tokens, or at most
ceil(budget / block) + 1 blocks when pruned, and takes only its sink block from the prefix cache
(a shared block it evicted would free nothing, so its reservation would stop covering its growth);
with `optimistic` it reserves its prompt, or at most its budget, and takes up to budget / block - 1
blocks from the prefix cache (optimistic counts are what admission lets in; growth may preempt).
The window and snapkv modes reserve the same blocks (they differ in which blocks they keep).

    python loadtest/kv_capacity.py                       # the table in docs/benchmarks.md
    python loadtest/kv_capacity.py --kv-cache-mib 64 --requests 500
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "loadtest"))

import torch  # noqa: E402
from engine_bench import build_workload  # noqa: E402

from scheduler import BatchPolicy  # noqa: E402
from worker.engine.base import GenerationRequest, SamplingParams  # noqa: E402
from worker.engine.block_manager import BlockManager  # noqa: E402
from worker.engine.kv_cache import KVCacheSpec, num_blocks_for_budget, resolve_kv_dtype  # noqa: E402
from worker.engine.kv_prune import PrunePolicy  # noqa: E402
from worker.engine.sequence import Sequence  # noqa: E402
from worker.engine.step_scheduler import StepScheduler  # noqa: E402


@dataclass(frozen=True)
class Row:
    name: str
    kv_dtype: str = "fp16"
    mode: Literal["window", "snapkv"] = "window"
    fraction: float | None = None  # budget as a share of each request's prompt + max_tokens


ROWS = [
    Row("fp16"),
    Row("int8-kv", "int8"),
    Row("window-50", fraction=0.5),
    Row("window-25", fraction=0.25),
    Row("snapkv-50", mode="snapkv", fraction=0.5),
    Row("snapkv-25", mode="snapkv", fraction=0.25),
    Row("int8-kv-window-50", "int8", fraction=0.5),
    Row("int8-kv-window-25", "int8", fraction=0.25),
]


def admitted(row: Row, args: argparse.Namespace, reserve: Literal["worst_case", "optimistic"]) -> dict:
    spec = KVCacheSpec(
        args.layers, args.kv_heads, args.head_dim, resolve_kv_dtype(row.kv_dtype, torch.float16)
    )
    num_blocks = num_blocks_for_budget(spec, args.block_size, torch.device("cpu"), args.kv_cache_mib << 20)
    bm = BlockManager(num_blocks, args.block_size, enable_prefix_caching=not args.no_prefix_caching)
    prune = PrunePolicy(block_size=args.block_size, sink_tokens=args.sink_tokens, mode=row.mode)
    policy = BatchPolicy(
        max_wait_ms=0.0,
        max_batch_tokens=1 << 30,
        max_num_seqs=1 << 20,
        max_prefill_chunk_tokens=1 << 20,
        kv_reserve=reserve,
    )
    scheduler = StepScheduler(policy, bm, prune)
    workload = build_workload("w1", args.vocab_size)
    now = time.monotonic()
    total_tokens = 0
    for i, (prompt, max_tokens) in enumerate(
        zip(workload.prompts[: args.requests], workload.max_tokens[: args.requests], strict=True)
    ):
        request = GenerationRequest(f"r{i}", prompt, SamplingParams(max_tokens=max_tokens), now)
        seq = Sequence(request)
        if row.fraction is not None:
            share = -(-int((len(prompt) + max_tokens) * row.fraction) // args.block_size) * args.block_size
            seq.kv_budget_tokens = max(share, prune.min_budget_tokens)
        total_tokens += len(prompt) + max_tokens
        scheduler.add(seq)
    scheduler.schedule(now)
    running = list(scheduler.running)
    held = [len(s.block_table) for s in running]
    for seq in running:
        if seq.kv_budget_tokens:
            assert len(seq.block_table) <= prune.cap_blocks(seq.kv_budget_tokens)
    return {
        "row": row.name, "reserve": reserve, "kv_dtype": row.kv_dtype, "blocks": num_blocks,
        "pool_tokens": num_blocks * args.block_size, "admitted": len(running),
        "blocks_per_seq": round(sum(held) / max(len(held), 1), 1),
        "mean_request_tokens": round(total_tokens / args.requests, 1),
    }  # fmt: skip


def commit() -> str:
    out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True, text=True
    ).stdout.strip()
    return out.stdout.strip() + ("+dirty" if dirty else "")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kv-cache-mib", type=int, default=256, help="KV pool (LLM_KV_CACHE_BYTES), MiB")
    p.add_argument("--requests", type=int, default=1000, help="the first N requests of W1 wait")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--sink-tokens", type=int, default=4)
    p.add_argument("--layers", type=int, default=30, help="model shape (default: SmolLM2-135M)")
    p.add_argument("--kv-heads", type=int, default=3)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--vocab-size", type=int, default=49152)
    p.add_argument("--no-prefix-caching", action="store_true", help="every request computes its whole prompt")
    p.add_argument("--json-out", type=Path)
    args = p.parse_args(argv)
    results = []
    for row in ROWS:
        for reserve in ("worst_case", "optimistic"):
            results.append(admitted(replace(row), args, reserve))  # type: ignore[arg-type]
    base = {r["reserve"]: r["admitted"] for r in results if r["row"] == "fp16"}
    print("| row | KV | pool blocks | pool tokens | reserve | admitted | vs fp16 | blocks / seq |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in results:
        ratio = r["admitted"] / max(base[r["reserve"]], 1)
        print(
            f"| {r['row']} | {r['kv_dtype']} | {r['blocks']} | {r['pool_tokens']} | {r['reserve']} | "
            f"{r['admitted']} | {ratio:.2f}x | {r['blocks_per_seq']} |"
        )
    meta = {"command": "python " + " ".join([sys.argv[0], *(argv or sys.argv[1:])]), "commit": commit(),
            **{k: v for k, v in vars(args).items() if k != "json_out"}}  # fmt: skip
    print(json.dumps(meta))
    if args.json_out:
        args.json_out.write_text(json.dumps({"meta": meta, "rows": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
