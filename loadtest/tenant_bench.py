"""What tenants cost the worker: one request stream per tenant vs the single un-namespaced stream.

Two measurements against one private server (or REDIS_URL):
1. the read itself: a non-blocking XREADGROUP over N streams, idle (nothing new: what an idle or
   busy-stepping loop pays per iteration) and draining (entries per second through XREADGROUP +
   XACK, the same total spread over N streams);
2. end to end: `--requests` echo requests through `ChatClient.submit_many`/`results` and one
   `python -m worker --engine echo`, on the single stream and spread evenly over N tenants.

    python loadtest/tenant_bench.py --requests 20000 --tenants 8
"""

from __future__ import annotations

import argparse
import json
import os
import platform
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
from producer.wire.keys import StreamNames  # noqa: E402
from worker.local_redis.server import EmbeddedRedis  # noqa: E402

REQUEST = {"prompt": "ping", "max_tokens": 1, "stream": False}


def _streams(prefix: str, n: int) -> list[str]:
    if n == 1:
        return [StreamNames.for_prefix(prefix).requests]
    return [StreamNames.for_prefix(prefix, f"t{i}").requests for i in range(n)]


def idle_read_us(r: redis.Redis, n: int, calls: int = 2000) -> float:
    """Microseconds per non-blocking XREADGROUP over n streams with nothing new."""
    prefix = f"tb-{uuid.uuid4().hex[:6]}"
    streams = _streams(prefix, n)
    for s in streams:
        r.xgroup_create(s, "workers", id="0", mkstream=True)
    start = time.perf_counter()
    for _ in range(calls):
        r.xreadgroup("workers", "c", dict.fromkeys(streams, ">"), count=64)
    elapsed = time.perf_counter() - start
    r.delete(*streams)
    return elapsed / calls * 1e6


def drain_per_s(r: redis.Redis, n: int, total: int) -> float:
    """Entries per second read and acknowledged, `total` entries spread over n streams, COUNT 64 in all."""
    prefix = f"tb-{uuid.uuid4().hex[:6]}"
    streams = _streams(prefix, n)
    for s in streams:
        r.xgroup_create(s, "workers", id="0", mkstream=True)
    pipe = r.pipeline(transaction=False)
    for i in range(total):
        pipe.xadd(streams[i % n], {"v": "1", "ct": "json", "body": "x" * 200})
    pipe.execute()
    count = max(1, -(-64 // n))
    done = 0
    start = time.perf_counter()
    while done < total:
        got = r.xreadgroup("workers", "c", dict.fromkeys(streams, ">"), count=count)
        pipe = r.pipeline(transaction=False)
        for key, entries in got:  # type: ignore[union-attr]
            pipe.xack(key, "workers", *[e[0] for e in entries])
            done += len(entries)
        pipe.execute()
    elapsed = time.perf_counter() - start
    r.delete(*streams)
    return total / elapsed


def end_to_end_s(url: str, n_tenants: int, total: int) -> float:
    """Seconds for `total` echo requests, on the single stream (0 tenants) or over n tenants."""
    prefix = f"tbe-{uuid.uuid4().hex[:6]}"
    tenants = [f"t{i}" for i in range(n_tenants)]
    env = {**os.environ, "REDIS_URL": url, "LLM_PREFIX": prefix, "LLM_ENGINE": "echo",
           "LLM_MAX_NUM_SEQS": "256", "LLM_MAX_WAIT_MS": "0", "LLM_LOG_LEVEL": "warning",
           "LLM_TENANTS": ",".join(tenants)}  # fmt: skip
    proc = subprocess.Popen([sys.executable, "-m", "worker"], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    r = redis.Redis.from_url(url)
    first = _streams(prefix, 1)[0] if not tenants else StreamNames.for_prefix(prefix, tenants[-1]).requests
    deadline = time.monotonic() + 60
    while not r.exists(first) and time.monotonic() < deadline:
        time.sleep(0.05)
    clients = [ChatClient(url, prefix=prefix, tenant=t, timeout_s=300, max_backlog_requests=0)
               for t in (tenants or [None])]  # type: ignore[list-item]  # fmt: skip
    start = time.perf_counter()
    ids: list[list[str]] = [[] for _ in clients]
    sent = 0
    while sent < total:
        for i, c in enumerate(clients):
            chunk = [dict(REQUEST) for _ in range(min(64, total - sent))]
            ids[i] += [rid for rid in c.submit_many(chunk) if isinstance(rid, str)]
            sent += len(chunk)
            if sent >= total:
                break
    for c, mine in zip(clients, ids, strict=True):
        assert len(c.results(mine)) == len(mine)
    elapsed = time.perf_counter() - start
    proc.terminate()
    proc.wait(timeout=60)
    for c in clients:
        c.close()
    keys = list(r.scan_iter(f"{prefix}:*", count=1000))
    for i in range(0, len(keys), 1000):
        r.delete(*keys[i : i + 1000])
    return elapsed


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=5000)
    p.add_argument("--tenants", type=int, default=8)
    p.add_argument("--repeat", type=int, default=3, help="end-to-end runs of each kind (median reported)")
    p.add_argument("--json-out", type=Path)
    args = p.parse_args()
    out: dict[str, object] = {"requests": args.requests, "tenants": args.tenants,
                              "machine": platform.machine(), "cores": os.cpu_count()}  # fmt: skip
    with ExitStack() as stack:
        url = os.environ.get("REDIS_URL") or stack.enter_context(EmbeddedRedis()).url
        r = redis.Redis.from_url(url)
        sizes = sorted({1, args.tenants, 64})
        out["idle_read_us"] = {n: round(idle_read_us(r, n), 1) for n in sizes}
        out["drain_entries_per_s"] = {n: round(drain_per_s(r, n, 20_000)) for n in sizes}
        runs: dict[str, list[float]] = {"single_stream": [], f"{args.tenants}_tenants": []}
        for _ in range(args.repeat):  # alternated, so drift on a shared machine hits both alike
            runs["single_stream"].append(round(end_to_end_s(url, 0, args.requests), 2))
            runs[f"{args.tenants}_tenants"].append(round(end_to_end_s(url, args.tenants, args.requests), 2))
        out["end_to_end_s"] = runs
        out["end_to_end_median_requests_per_s"] = {
            k: round(args.requests / sorted(v)[len(v) // 2]) for k, v in runs.items()
        }
    print(json.dumps(out, indent=2))
    if args.json_out:
        args.json_out.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
