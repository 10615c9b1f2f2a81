"""Worker-loop latency on the echo engine: a lone request's queueing, and how fast a burst drains.

Two measurements against one `python -m worker --engine echo` process (echo engine named as such:
it measures the queue path and the loop, not a model):

  lone   N requests one at a time, spaced apart, on an idle worker: queue_ms p50/p99 (XADD to
         admission, from each reply's timings) against the time window `max_wait_ms`.
  burst  B requests at once, max_num_seqs S, max_tokens T, an echo step of D ms: the wall time
         until the last final reply, against the time the tokens themselves take,
         ceil(B / S) * T * D (each wave of S sequences runs T steps).

    python loadtest/loop_latency_bench.py
    python loadtest/loop_latency_bench.py --burst 320 --max-num-seqs 32 --max-tokens 16 --step-ms 5
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
import uuid
from contextlib import ExitStack
from pathlib import Path

import redis

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from producer.client import ChatClient  # noqa: E402
from worker.local_redis.server import EmbeddedRedis  # noqa: E402


def start_worker(url: str, prefix: str, **settings: object) -> subprocess.Popen[bytes]:
    env = {**os.environ, "REDIS_URL": url, "LLM_PREFIX": prefix, "LLM_ENGINE": "echo",
           "LLM_LOG_LEVEL": "warning"}  # fmt: skip
    env.update({f"LLM_{k.upper()}": str(v) for k, v in settings.items()})
    proc = subprocess.Popen([sys.executable, "-m", "worker"], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    r = redis.Redis.from_url(url)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if any(g["name"] == b"workers" for g in r.xinfo_groups(f"{prefix}:requests")):
                return proc
        except redis.ResponseError:
            pass
        time.sleep(0.05)
    raise SystemExit("worker did not start")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def lone(url: str, args: argparse.Namespace) -> dict[str, float]:
    prefix = f"lone-{uuid.uuid4().hex[:6]}"
    proc = start_worker(url, prefix, max_wait_ms=args.max_wait_ms)
    client = ChatClient(url, prefix=prefix, timeout_s=60)
    queue_ms = []
    for i in range(args.lone + 5):
        reply = client.chat([{"role": "user", "content": "hi"}], max_tokens=2)
        if i >= 5:  # the first few warm up connections and the worker's first reads
            queue_ms.append(reply.timings.queue_ms)
        time.sleep(args.lone_gap_ms / 1000)
    proc.terminate()
    proc.wait(timeout=30)
    client.close()
    return {"p50_ms": statistics.median(queue_ms), "p99_ms": percentile(queue_ms, 99),
            "max_ms": max(queue_ms)}  # fmt: skip


def burst(url: str, args: argparse.Namespace) -> dict[str, float]:
    prefix = f"burst-{uuid.uuid4().hex[:6]}"
    proc = start_worker(
        url, prefix, max_num_seqs=args.max_num_seqs, echo_token_delay_ms=args.step_ms,
        max_wait_ms=args.max_wait_ms, max_waiting_requests=max(args.burst, 64),
    )  # fmt: skip
    client = ChatClient(url, prefix=prefix, timeout_s=300, max_backlog_requests=0)
    words = " ".join(f"w{i}" for i in range(args.max_tokens))
    start = time.perf_counter()
    ids = client.submit_many([{"prompt": words, "max_tokens": args.max_tokens, "stream": False}] * args.burst)
    replies = client.results([i for i in ids if isinstance(i, str)])
    wall_s = time.perf_counter() - start
    proc.terminate()
    proc.wait(timeout=30)
    client.close()
    assert len(replies) == args.burst
    token_s = math.ceil(args.burst / args.max_num_seqs) * args.max_tokens * args.step_ms / 1000
    return {"wall_s": wall_s, "token_s": token_s, "ratio": wall_s / token_s}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lone", type=int, default=100, help="lone requests measured")
    p.add_argument("--lone-gap-ms", type=float, default=50.0)
    p.add_argument("--max-wait-ms", type=float, default=10.0, help="the worker's time window")
    p.add_argument("--burst", type=int, default=320)
    p.add_argument("--max-num-seqs", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--step-ms", type=float, default=5.0, help="echo engine step time")
    p.add_argument("--json-out", type=Path)
    args = p.parse_args()
    with ExitStack() as stack:
        url = os.environ.get("REDIS_URL") or stack.enter_context(EmbeddedRedis()).url
        lone_result = lone(url, args)
        burst_result = burst(url, args)
    print(f"\nworker loop, echo engine, {os.cpu_count()} cores, max_wait_ms {args.max_wait_ms}\n")
    lone_line = (
        f"lone request queue_ms: p50 {lone_result['p50_ms']:.1f}  p99 {lone_result['p99_ms']:.1f}  "
        f"max {lone_result['max_ms']:.1f}  ({args.lone} requests, {args.lone_gap_ms:.0f} ms apart)"
    )
    burst_line = (
        f"burst of {args.burst} (max_num_seqs {args.max_num_seqs}, {args.max_tokens} tokens, "
        f"{args.step_ms} ms steps): {burst_result['wall_s']:.2f} s, "
        f"tokens take {burst_result['token_s']:.2f} s, ratio {burst_result['ratio']:.2f}"
    )
    print(lone_line)
    print(burst_line)
    if args.json_out:
        config = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
        results = {"config": config, "lone": lone_result, "burst": burst_result}
        args.json_out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
