"""Queue-path benchmark (W4-style): the project's client + worker (echo engine) vs raw redis-py.

Both paths do the same work per request: one request entry XADDed to a stream, read
through a consumer group, one reply entry written to a per-request stream, the
request XACKed, and the reply read back by the sender. The raw baseline is plain
redis-py with pipelining and no project code; the project path is `ChatClient` and a
`python -m worker --engine echo` process. Both run in this process's session against
the same server, one after the other.

    python loadtest/queue_bench.py --requests 20000
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import subprocess
import sys
import time
import uuid
from contextlib import ExitStack
from pathlib import Path

import msgpack
import redis

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from producer.client import ChatClient  # noqa: E402
from worker.embedded_redis import EmbeddedRedis  # noqa: E402


def _raw_worker(url: str, prefix: str, total: int) -> None:
    """Baseline consumer: XREADGROUP -> reply XADD + XACK, pipelined per read batch."""
    r = redis.Redis.from_url(url)
    stream = f"{prefix}:requests"
    served = 0
    while served < total:
        got = r.xreadgroup("workers", "raw", {stream: ">"}, count=64, block=1000)
        if not got:
            continue
        pipe = r.pipeline(transaction=False)
        for entry_id, fields in got[0][1]:
            body = msgpack.unpackb(fields[b"body"])
            reply = msgpack.packb({"type": "done", "id": body["id"], "text": body["prompt"]})
            key = f"{prefix}:reply:{body['id']}"
            pipe.xadd(key, {"ct": "msgpack", "body": reply})
            pipe.expire(key, 3600)
            pipe.xack(stream, "workers", entry_id)
            served += 1
        pipe.execute()


def run_raw(url: str, n: int) -> float:
    """Seconds for n requests through the raw redis-py path."""
    prefix = f"rawbench-{uuid.uuid4().hex[:6]}"
    r = redis.Redis.from_url(url)
    r.xgroup_create(f"{prefix}:requests", "workers", id="0", mkstream=True)
    proc = mp.get_context("spawn").Process(target=_raw_worker, args=(url, prefix, n))
    proc.start()
    ids = [uuid.uuid4().hex for _ in range(n)]
    start = time.perf_counter()
    for i in range(0, n, 256):
        pipe = r.pipeline(transaction=False)
        for rid in ids[i : i + 256]:
            pipe.xadd(f"{prefix}:requests", {"v": "1", "ct": "msgpack",
                                             "body": msgpack.packb({"id": rid, "prompt": "ping"})})
        pipe.execute()
    # Replies are read as the batched client does: one XREAD over up to 512 reply streams.
    waiting = {f"{prefix}:reply:{rid}": "0" for rid in ids}
    while waiting:
        batch = dict(list(waiting.items())[:512])
        for key, _entries in r.xread(batch, block=5000) or []:  # type: ignore[union-attr]
            del waiting[key.decode()]
    elapsed = time.perf_counter() - start
    proc.join(timeout=30)
    _cleanup(r, prefix)
    return elapsed


def run_project(url: str, n: int, batched: bool) -> float:
    """Seconds for n requests through ChatClient and an echo worker process.

    batched=False: one `submit` round trip per request, then `result` per request (what an
    interactive backend does); batched=True: `submit_many` in chunks of 256 and `results`
    (one XREAD over many reply streams), the same pipelining the raw baseline gets.
    """
    prefix = f"projbench-{uuid.uuid4().hex[:6]}"
    env = {**os.environ, "REDIS_URL": url, "LLM_PREFIX": prefix, "LLM_ENGINE": "echo",
           "LLM_MAX_NUM_SEQS": "256", "LLM_MAX_WAIT_MS": "0", "LLM_LOG_LEVEL": "warning"}
    proc = subprocess.Popen([sys.executable, "-m", "worker"], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    r = redis.Redis.from_url(url)
    deadline = time.monotonic() + 60
    while not _group_exists(r, f"{prefix}:requests") and time.monotonic() < deadline:
        time.sleep(0.05)
    # No backlog limit: the benchmark measures throughput, not refusal.
    client = ChatClient(url, prefix=prefix, timeout_s=300, max_backlog_requests=0)
    start = time.perf_counter()
    if batched:
        ids: list[str] = []
        for i in range(0, n, 256):
            chunk = [{"prompt": "ping", "max_tokens": 1, "stream": False} for _ in range(min(256, n - i))]
            ids += [rid for rid in client.submit_many(chunk) if isinstance(rid, str)]
        replies = client.results(ids)
        assert len(replies) == n
    else:
        ids = [client.submit(prompt="ping", max_tokens=1, stream=False) for _ in range(n)]
        for rid in ids:
            client.result(rid)
    elapsed = time.perf_counter() - start
    proc.terminate()
    proc.wait(timeout=60)
    client.close()
    _cleanup(r, prefix)
    return elapsed


def _group_exists(r: redis.Redis, stream: str) -> bool:
    try:
        return any(g["name"] == b"workers" for g in r.xinfo_groups(stream))
    except redis.ResponseError:
        return False


def _cleanup(r: redis.Redis, prefix: str) -> None:
    keys = list(r.scan_iter(f"{prefix}:*", count=1000))
    for i in range(0, len(keys), 1000):
        r.delete(*keys[i : i + 1000])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=20_000)
    p.add_argument("--json-out", type=Path)
    args = p.parse_args()
    with ExitStack() as stack:
        url = os.environ.get("REDIS_URL") or stack.enter_context(EmbeddedRedis()).url
        raw_s = run_raw(url, args.requests)
        batched_s = run_project(url, args.requests, batched=True)
        single_s = run_project(url, args.requests, batched=False)
    rows = [("raw redis-py (pipelined)", raw_s), ("project, batched (submit_many/results)", batched_s),
            ("project, one request per call", single_s)]
    print(f"\nqueue path, {args.requests} requests, {platform.machine()}, {os.cpu_count()} cores\n")
    print(f"{'path':<40} {'seconds':>8} {'req/s':>9} {'vs raw':>7}")
    for name, secs in rows:
        print(f"{name:<40} {secs:>8.2f} {args.requests / secs:>9.0f} {raw_s / secs:>7.0%}")
    if args.json_out:
        results = {"requests": args.requests, "raw_s": raw_s, "batched_s": batched_s, "single_s": single_s}
        args.json_out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
