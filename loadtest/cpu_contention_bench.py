"""A CPU worker with busy neighbours: `make demo`'s six chats, with and without other processes on the cores.

Each round starts one `python -m worker` (paged engine, the default model on the CPU) under a thread
configuration, sends the demo's six concurrent chats (48 tokens each) and reads the replies, first on
an idle machine, then with `--busy` spinning processes beside it (what a shared node or a test run
does). Configurations, alternated by round:

  spinning   the pool as it was: `LLM_TORCH_THREADS` = every CPU, OpenMP's default wait policy
  default    the worker's defaults: the CPUs it may use but one, `OMP_WAIT_POLICY=PASSIVE`

    python loadtest/cpu_contention_bench.py
    python loadtest/cpu_contention_bench.py --rounds 3 --busy 2 --json-out docs/bench/cpu_contention.json

Output tok/s is the six replies' completion tokens over the wall time from the first submit to the
last reply; TTFT is each reply's own (`timings.ttft_ms`), p50 over the six.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import redis

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from producer.client import ChatClient  # noqa: E402
from worker.engine.host_cpus import available_cpus  # noqa: E402
from worker.local_redis.server import EmbeddedRedis  # noqa: E402
from worker.tools.demo import QUESTIONS  # noqa: E402

CONFIGS: dict[str, dict[str, str]] = {
    # An empty OMP_WAIT_POLICY keeps the worker from setting PASSIVE, and libgomp then uses its default.
    "spinning": {"LLM_TORCH_THREADS": str(available_cpus()), "OMP_WAIT_POLICY": ""},
    "default": {},
}


def _spin() -> None:
    while True:
        pass


@contextmanager
def busy(n: int) -> Iterator[None]:
    """`n` processes that each keep a core busy, as neighbours do."""
    procs = [multiprocessing.Process(target=_spin, daemon=True) for _ in range(n)]
    for p in procs:
        p.start()
    try:
        yield
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.join()


def start_worker(url: str, prefix: str, env_extra: dict[str, str]) -> subprocess.Popen[bytes]:
    env = {**os.environ, "REDIS_URL": url, "LLM_PREFIX": prefix, "LLM_LOG_LEVEL": "warning", **env_extra}
    for key in ("LLM_TORCH_THREADS", "OMP_WAIT_POLICY"):
        if key not in env_extra:
            env.pop(key, None)
    quiet = subprocess.DEVNULL
    proc = subprocess.Popen([sys.executable, "-m", "worker"], cwd=ROOT, env=env, stdout=quiet, stderr=quiet)
    r = redis.Redis.from_url(url)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"worker exited with {proc.returncode}")
        try:
            if any(g["name"] == b"workers" for g in r.xinfo_groups(f"{prefix}:requests")):
                return proc
        except redis.ResponseError:
            pass
        time.sleep(0.1)
    raise SystemExit("worker did not start")


def chats(url: str, prefix: str, max_tokens: int) -> dict[str, float]:
    with ChatClient(url, prefix=prefix, timeout_s=900) as client:
        client.result(client.submit([{"role": "user", "content": "Hi"}], max_tokens=4))  # warm the path
        started = time.monotonic()
        ids = [client.submit([{"role": "user", "content": q}], max_tokens=max_tokens) for q in QUESTIONS]
        replies = [client.result(i) for i in ids]
        wall_s = time.monotonic() - started
    tokens = sum(r.usage.completion_tokens for r in replies)
    ttfts = [r.timings.ttft_ms or 0.0 for r in replies]
    return {"tok_s": tokens / wall_s, "ttft_p50_ms": statistics.median(ttfts), "wall_s": wall_s}


def run(config: str, busy_n: int, url: str, max_tokens: int) -> dict[str, Any]:
    prefix = f"contend-{uuid.uuid4().hex[:6]}"
    proc = start_worker(url, prefix, CONFIGS[config])
    try:
        idle = chats(url, prefix, max_tokens)
        with busy(busy_n):
            loaded = chats(url, prefix, max_tokens)
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    return {"config": config, "idle": idle, "busy": loaded}


def _commit() -> str:
    out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    return out.stdout.strip() or "unknown"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--busy", type=int, default=2, help="spinning processes beside the worker")
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument("--json-out", type=Path)
    args = p.parse_args(argv)
    rows: list[dict[str, Any]] = []
    with EmbeddedRedis() as server:
        for round_ in range(args.rounds):
            order = list(CONFIGS) if round_ % 2 == 0 else list(reversed(CONFIGS))
            for config in order:
                row = run(config, args.busy, server.url, args.max_tokens)
                row["round"] = round_ + 1
                rows.append(row)
                print(
                    f"round {round_ + 1} {config:9s} idle {row['idle']['tok_s']:6.1f} tok/s, "
                    f"{args.busy} busy {row['busy']['tok_s']:6.1f} tok/s "
                    f"(TTFT p50 {row['idle']['ttft_p50_ms']:.0f} / {row['busy']['ttft_p50_ms']:.0f} ms)",
                    flush=True,
                )
    print(f"\n{'config':10s} {'idle tok/s':>11s} {'busy tok/s':>11s} {'idle TTFT':>10s} {'busy TTFT':>10s}")
    for config in CONFIGS:
        mine = [r for r in rows if r["config"] == config]

        def med(kind: str, key: str, rs: list[dict[str, Any]] = mine) -> float:
            return statistics.median(r[kind][key] for r in rs)

        print(
            f"{config:10s} {med('idle', 'tok_s'):11.1f} {med('busy', 'tok_s'):11.1f} "
            f"{med('idle', 'ttft_p50_ms'):8.0f}ms {med('busy', 'ttft_p50_ms'):8.0f}ms"
        )
    cpus = available_cpus()
    print(f"(medians over {args.rounds} rounds; {cpus} CPUs available; {args.busy} busy processes)")
    if args.json_out:
        args.json_out.write_text(
            json.dumps(
                {
                    "commit": _commit(),
                    "command": " ".join(sys.argv),
                    "cpus": cpus,
                    "busy": args.busy,
                    "rounds": args.rounds,
                    "rows": rows,
                },
                indent=2,
            )
            + "\n"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
