"""Queue-path benchmark (W4-style): the project's client + worker (echo engine) vs raw redis-py.

Both paths do the same work per request: one request entry XADDed to a stream, read
through a consumer group, one reply entry written to a per-request stream, the
request XACKed, and the reply read back by the sender. The raw baseline is plain
redis-py with pipelining and no project code; the project path is `ChatClient` and a
`python -m worker --engine echo` process. Both run in this process's session against
the same server, one after the other.

    python loadtest/queue_bench.py --requests 20000

Cluster mode (docs/scaling.md): `--cluster` runs on a Redis Cluster (REDIS_URL naming a node with
LLM_REDIS_CLUSTER semantics, or a local 3-primary cluster started here), for each W in `--workers`
(echo workers) and each N in `--shards`: throughput, p50/p99 of the service latency (enqueue to
final reply written, the workers' `timings.total_ms`), Redis commands per request (INFO
commandstats over all nodes) and CPU seconds per worker; plus the raw redis-py baseline of the
same run (one hash-tagged stream, one consumer process).

    python loadtest/queue_bench.py --cluster --shards 1 4 --workers 1 2 4 --requests 5000

One node's ceiling (docs/scaling.md): `--server-cpu` runs the project path (batched client, one
echo worker, default backlog checks) on one node, with `stream=false` and with 8 streamed
tokens, and reads the server's own counters before and after each run: the main thread's CPU
time (INFO cpu, used_cpu_user_main_thread + used_cpu_sys_main_thread) and the commands and
their execution time (INFO commandstats). CPU microseconds per request give the ceiling of
one fully busy server core: 1e6 / µs per request requests/s, times commands per request
commands/s.

    python loadtest/queue_bench.py --server-cpu --requests 20000 --repeat 3

The cost of the metrics (docs/metrics.md): `--metrics` runs the batched project path with the worker's
metrics port off and on (scraped every second), alternating, `--repeat` rounds.

    python loadtest/queue_bench.py --metrics --requests 20000 --repeat 4
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import statistics
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

from loadtest.metrics_scraper import Scraper  # noqa: E402
from producer.client import ChatClient  # noqa: E402
from producer.wire.keys import StreamNames  # noqa: E402
from producer.wire.redis_factory import connect  # noqa: E402
from worker.local_redis.cluster import LocalCluster  # noqa: E402
from worker.local_redis.server import EmbeddedRedis, free_port  # noqa: E402


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
            pipe.xadd(
                f"{prefix}:requests",
                {"v": "1", "ct": "msgpack", "body": msgpack.packb({"id": rid, "prompt": "ping"})},
            )
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


def run_project(url: str, n: int, batched: bool, metrics: bool = False) -> float:
    """Seconds for n requests through ChatClient and an echo worker process.

    batched=False: one `submit` round trip per request, then `result` per request (what an
    interactive backend does); batched=True: `submit_many` in chunks of 256 and `results`
    (one XREAD over many reply streams), the same pipelining the raw baseline gets.
    metrics=False: the worker's metrics port is off; True: on, and scraped every second (`Scraper`)
    for the whole run (`--metrics` compares the two).
    """
    prefix = f"projbench-{uuid.uuid4().hex[:6]}"
    env = {
        **os.environ,
        "REDIS_URL": url,
        "LLM_PREFIX": prefix,
        "LLM_ENGINE": "echo",
        "LLM_MAX_NUM_SEQS": "256",
        "LLM_MAX_WAIT_MS": "0",
        "LLM_LOG_LEVEL": "warning",
        "LLM_METRICS_PORT": str(free_port() if metrics else 0),
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "worker"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    scraper = Scraper(int(env["LLM_METRICS_PORT"])) if metrics else None
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
    if scraper is not None:
        scrapes = scraper.stop()
        assert scrapes > 0, "the metrics port never answered"
    proc.terminate()
    proc.wait(timeout=60)
    client.close()
    _cleanup(r, prefix)
    return elapsed


def metrics_main(args: argparse.Namespace) -> None:
    """Metrics off and on, alternating, `--repeat` rounds of the batched project path."""
    with ExitStack() as stack:
        url = os.environ.get("REDIS_URL") or stack.enter_context(EmbeddedRedis()).url
        runs: dict[bool, list[float]] = {False: [], True: []}
        for i in range(args.repeat):
            for metrics in (False, True) if i % 2 == 0 else (True, False):
                runs[metrics].append(args.requests / run_project(url, args.requests, True, metrics))
    print(f"\nqueue path with metrics off and on, {args.requests} requests x {args.repeat} rounds, "
          f"{platform.machine()}, {os.cpu_count()} cores\n")  # fmt: skip
    print(f"{'metrics':<8} {'req/s (each round)':<40} {'median':>8}")
    medians = {}
    for metrics, rates in runs.items():
        medians[metrics] = statistics.median(rates)
        each = " ".join(f"{r:.0f}" for r in rates)
        print(f"{'on' if metrics else 'off':<8} {each:<40} {medians[metrics]:>8.0f}")
    print(f"\nmetrics cost {1 - medians[True] / medians[False]:.1%} of throughput (median of the rounds)")
    if args.json_out:
        out = {
            "requests": args.requests,
            "rounds": args.repeat,
            "off_req_s": runs[False],
            "on_req_s": runs[True],
        }
        args.json_out.write_text(json.dumps(out, indent=2))


def _group_exists(r: redis.Redis, stream: str) -> bool:
    try:
        return any(g["name"] == b"workers" for g in r.xinfo_groups(stream))
    except redis.ResponseError:
        return False


def _cleanup(r: redis.Redis, prefix: str) -> None:
    keys = list(r.scan_iter(f"{prefix}:*", count=1000))
    for i in range(0, len(keys), 1000):
        r.delete(*keys[i : i + 1000])


SERVER_CPU_WORDS = 8  # tokens of each --server-cpu request (the echo engine answers the prompt's words)
SERVER_CPU_CHUNK = 2048  # requests submitted before their results are read (below the default backlog limit)


def _server_counters(r: redis.Redis) -> dict[str, float]:
    """The server's CPU seconds (main thread; whole process) and commandstats totals so far.

    commandstats counts a script's inner commands both in their own entries and in the script's
    `usec`, so summing every entry's usec counts script time twice: the time is kept as the
    scripts' (EVAL/EVALSHA, inner commands included) and the stream reads' (XREAD/XREADGROUP),
    which together are nearly all command time on this path (the rest runs inside the scripts).
    """
    cpu = r.info("cpu")
    stats = r.info("commandstats")
    commands = {k: v for k, v in stats.items() if k.startswith("cmdstat_") and k != "cmdstat_info"}

    def usec(*names: str) -> float:
        return float(sum(int(commands.get(f"cmdstat_{name}", {}).get("usec", 0)) for name in names))

    return {
        "main_cpu_s": float(cpu["used_cpu_user_main_thread"]) + float(cpu["used_cpu_sys_main_thread"]),
        "cpu_s": float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"]),
        "calls": float(sum(int(v["calls"]) for v in commands.values())),
        "script_usec": usec("eval", "evalsha"),
        "read_usec": usec("xread", "xreadgroup"),
    }


def run_server_cpu(url: str, n: int, stream: bool) -> dict[str, float]:
    """n requests of SERVER_CPU_WORDS tokens through ChatClient and one echo worker; the server's
    own cost per request from its counters (CPU of the main thread, commands, their usec)."""
    prefix = f"cpubench-{uuid.uuid4().hex[:6]}"
    env = {**os.environ, "REDIS_URL": url, "LLM_PREFIX": prefix, "LLM_ENGINE": "echo",
           "LLM_MAX_NUM_SEQS": "256", "LLM_MAX_WAIT_MS": "2", "LLM_LOG_LEVEL": "warning"}  # fmt: skip
    proc = subprocess.Popen([sys.executable, "-m", "worker"], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    r = redis.Redis.from_url(url)
    deadline = time.monotonic() + 60
    while not _group_exists(r, f"{prefix}:requests") and time.monotonic() < deadline:
        time.sleep(0.05)
    # The default backlog check (admission script) stays on: chunks stay below its limit.
    client = ChatClient(url, prefix=prefix, timeout_s=300)
    text = " ".join(f"w{i}" for i in range(SERVER_CPU_WORDS))
    client.chat(prompt=text, max_tokens=SERVER_CPU_WORDS, stream=stream)  # warm: scripts loaded, worker up
    before = _server_counters(r)
    start = time.perf_counter()
    answered = 0
    for i in range(0, n, SERVER_CPU_CHUNK):
        ids: list[str] = []
        for j in range(i, min(n, i + SERVER_CPU_CHUNK), 256):
            chunk = [{"prompt": text, "max_tokens": SERVER_CPU_WORDS, "stream": stream}] * min(256, n - j)
            ids += [rid for rid in client.submit_many(chunk) if isinstance(rid, str)]
        replies = client.results(ids)
        answered += sum(1 for rep in replies.values() if not isinstance(rep, Exception))
    elapsed = time.perf_counter() - start
    after = _server_counters(r)
    proc.terminate()
    proc.wait(timeout=60)
    client.close()
    _cleanup(r, prefix)
    r.close()
    assert answered == n, f"{answered} of {n} answered"
    d = {k: after[k] - before[k] for k in before}
    main_us = d["main_cpu_s"] * 1e6 / n
    return {
        "stream": stream, "requests": n, "seconds": elapsed, "req_per_s": n / elapsed,
        "server_main_cpu_us_per_req": main_us, "server_cpu_us_per_req": d["cpu_s"] * 1e6 / n,
        "commands_per_req": d["calls"] / n, "script_usec_per_req": d["script_usec"] / n,
        "read_usec_per_req": d["read_usec"] / n,
        "server_busy_share": d["main_cpu_s"] / elapsed,
        "ceiling_req_per_s": 1e6 / main_us, "ceiling_commands_per_s": 1e6 / main_us * d["calls"] / n,
    }  # fmt: skip


def server_cpu_main(args: argparse.Namespace) -> None:
    with ExitStack() as stack:
        url = os.environ.get("REDIS_URL") or stack.enter_context(EmbeddedRedis()).url
        info = redis.Redis.from_url(url).info("server")
        cases = [stream for _ in range(args.repeat) for stream in (False, True)]
        rows = [run_server_cpu(url, args.requests, stream) for stream in cases]
    version = info.get("valkey_version") or info.get("redis_version")
    print(f"\none node ({info.get('server_name', 'redis')} {version}), {args.requests} requests of "
          f"{SERVER_CPU_WORDS} tokens, one echo worker, {os.cpu_count()} cores\n")  # fmt: skip
    print(f"{'replies':<10} {'req/s':>7} {'cmd/req':>7} {'server CPU µs/req':>17} {'scripts µs':>10} "
          f"{'reads µs':>8} {'busy':>5} {'ceiling req/s':>13} {'ceiling cmd/s':>13}")  # fmt: skip
    for row in rows:
        print(f"{'streamed' if row['stream'] else 'final':<10} {row['req_per_s']:>7.0f} "
              f"{row['commands_per_req']:>7.1f} {row['server_main_cpu_us_per_req']:>17.1f} "
              f"{row['script_usec_per_req']:>10.1f} {row['read_usec_per_req']:>8.1f} "
              f"{row['server_busy_share']:>5.0%} "
              f"{row['ceiling_req_per_s']:>13.0f} {row['ceiling_commands_per_s']:>13.0f}")  # fmt: skip
    if args.json_out:
        out = {"requests": args.requests, "words": SERVER_CPU_WORDS, "cores": os.cpu_count(),
               "server": f"{info.get('server_name', 'redis')} {version}", "rows": rows}  # fmt: skip
        args.json_out.write_text(json.dumps(out, indent=2))


def _raw_cluster_worker(url: str, prefix: str, total: int) -> None:
    """The raw baseline on a cluster: one stream, its replies in its slot (hash tag), one consumer."""
    r = connect(url, cluster=True)
    stream = f"{prefix}:{{raw}}:requests"
    served = 0
    while served < total:
        got = r.xreadgroup("workers", "raw", {stream: ">"}, count=64, block=1000)
        if not got:
            continue
        pipe = r.pipeline(transaction=False)
        for entry_id, fields in got[0][1]:
            body = msgpack.unpackb(fields[b"body"])
            key = f"{prefix}:{{raw}}:reply:{body['id']}"
            pipe.xadd(key, {"ct": "msgpack", "body": msgpack.packb({"type": "done", "id": body["id"]})})
            pipe.expire(key, 3600)
            pipe.xack(stream, "workers", entry_id)
            served += 1
        pipe.execute()


def run_raw_cluster(url: str, n: int) -> float:
    prefix = f"rawbench-{uuid.uuid4().hex[:6]}"
    r = connect(url, cluster=True)
    stream = f"{prefix}:{{raw}}:requests"
    r.xgroup_create(stream, "workers", id="0", mkstream=True)
    proc = mp.get_context("spawn").Process(target=_raw_cluster_worker, args=(url, prefix, n))
    proc.start()
    ids = [uuid.uuid4().hex for _ in range(n)]
    start = time.perf_counter()
    for i in range(0, n, 256):
        pipe = r.pipeline(transaction=False)
        for rid in ids[i : i + 256]:
            body = msgpack.packb({"id": rid, "prompt": "ping"})
            pipe.xadd(stream, {"v": "1", "ct": "msgpack", "body": body})
        pipe.execute()
    waiting = {f"{prefix}:{{raw}}:reply:{rid}": "0" for rid in ids}
    while waiting:
        batch = dict(list(waiting.items())[:512])
        for key, _entries in r.xread(batch, block=5000) or []:  # type: ignore[union-attr]
            del waiting[key.decode()]
    elapsed = time.perf_counter() - start
    proc.join(timeout=30)
    r.close()
    return elapsed


def _commands(url: str) -> int:
    """Commands served so far by all primaries of the cluster (INFO commandstats)."""
    r = connect(url, cluster=True)
    total = 0
    for node in r.get_primaries():  # type: ignore[attr-defined]
        stats = r.info("commandstats", target_nodes=node)  # type: ignore[call-arg]
        total += sum(int(v["calls"]) for k, v in stats.items() if k.startswith("cmdstat_"))
    r.close()
    return total


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_cluster_case(url: str, n: int, shards: int, workers: int) -> dict[str, float]:
    """n requests through `workers` echo workers over `shards` shard streams on the cluster."""
    prefix = f"clbench-{uuid.uuid4().hex[:6]}"
    env = {**os.environ, "REDIS_URL": url, "LLM_REDIS_CLUSTER": "true", "LLM_STREAM_SHARDS": str(shards),
           "LLM_PREFIX": prefix, "LLM_ENGINE": "echo", "LLM_MAX_NUM_SEQS": "256", "LLM_MAX_WAIT_MS": "0",
           "LLM_LOG_LEVEL": "warning"}  # fmt: skip
    procs = [
        subprocess.Popen([sys.executable, "-m", "worker"], cwd=ROOT, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL, env={**env, "LLM_CONSUMER_NAME": f"w{i}"})
        for i in range(workers)
    ]  # fmt: skip
    r = connect(url, cluster=True)
    spaces = StreamNames.layout(prefix, [None], shards, cluster=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not all(_consumers(r, n.requests) >= workers for n in spaces):
        time.sleep(0.1)
    client = ChatClient(url, prefix=prefix, timeout_s=300, max_backlog_requests=0, redis_cluster=True,
                        stream_shards=shards)  # fmt: skip
    cpu0 = [_cpu_s(p.pid) for p in procs]
    commands0 = _commands(url)
    start = time.perf_counter()
    ids: list[str] = []
    for i in range(0, n, 256):
        chunk = [{"prompt": "ping", "max_tokens": 1, "stream": False} for _ in range(min(256, n - i))]
        ids += [rid for rid in client.submit_many(chunk) if isinstance(rid, str)]
    replies = client.results(ids)
    elapsed = time.perf_counter() - start
    commands = _commands(url) - commands0
    cpu = [_cpu_s(p.pid) - c for p, c in zip(procs, cpu0, strict=True)]
    for p in procs:
        p.terminate()
    for p in procs:
        p.wait(timeout=60)
    client.close()
    r.close()
    latencies = sorted(rep.timings.total_ms for rep in replies.values() if not isinstance(rep, Exception))
    assert len(latencies) == n
    return {
        "shards": shards, "workers": workers, "requests": n, "seconds": elapsed, "req_per_s": n / elapsed,
        "p50_ms": latencies[n // 2], "p99_ms": latencies[int(n * 0.99) - 1],
        "commands_per_request": commands / n, "worker_cpu_s": sum(cpu) / workers,
        "worker_cpu_share": sum(cpu) / elapsed / workers,
    }  # fmt: skip


def _consumers(r: redis.Redis, stream: str) -> int:
    try:
        return len(r.xinfo_consumers(stream, "workers"))
    except redis.ResponseError:
        return 0


def cluster_main(args: argparse.Namespace) -> None:
    with ExitStack() as stack:
        url = os.environ.get("REDIS_URL") or stack.enter_context(LocalCluster(masters=3)).url
        raw_s = run_raw_cluster(url, args.requests)
        rows = [run_cluster_case(url, args.requests, s, w) for s in args.shards for w in args.workers]
    print(f"\nqueue path on a 3-primary cluster, {args.requests} requests, {os.cpu_count()} cores")
    print(f"raw redis-py (one stream, one consumer): {args.requests / raw_s:.0f} req/s\n")
    print(f"{'shards':>6} {'workers':>7} {'req/s':>7} {'p50 ms':>7} {'p99 ms':>7} {'cmd/req':>7} "
          f"{'cpu/worker':>10}")  # fmt: skip
    for row in rows:
        print(f"{row['shards']:>6} {row['workers']:>7} {row['req_per_s']:>7.0f} {row['p50_ms']:>7.1f} "
              f"{row['p99_ms']:>7.1f} {row['commands_per_request']:>7.1f} "
              f"{row['worker_cpu_share']:>10.0%}")  # fmt: skip
    if args.json_out:
        out = {"requests": args.requests, "cores": os.cpu_count(), "raw_req_per_s": args.requests / raw_s,
               "rows": rows}  # fmt: skip
        args.json_out.write_text(json.dumps(out, indent=2))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=20_000)
    p.add_argument("--json-out", type=Path)
    p.add_argument("--cluster", action="store_true", help="on a Redis Cluster (REDIS_URL, or a local one)")
    p.add_argument("--shards", type=int, nargs="+", default=[1, 4], help="--cluster: stream shard counts")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4], help="--cluster: worker counts")
    p.add_argument(
        "--server-cpu",
        action="store_true",
        help="one node's CPU time per request and its ceiling (INFO cpu, commandstats)",
    )
    p.add_argument("--repeat", type=int, default=1, help="--server-cpu, --metrics: runs of each case")
    p.add_argument("--metrics", action="store_true", help="the worker's metrics port off vs on (scraped)")
    args = p.parse_args()
    if args.metrics:
        metrics_main(args)
        return
    if args.server_cpu:
        server_cpu_main(args)
        return
    if args.cluster:
        cluster_main(args)
        return
    with ExitStack() as stack:
        url = os.environ.get("REDIS_URL") or stack.enter_context(EmbeddedRedis()).url
        raw_s = run_raw(url, args.requests)
        batched_s = run_project(url, args.requests, batched=True)
        single_s = run_project(url, args.requests, batched=False)
    rows = [
        ("raw redis-py (pipelined)", raw_s),
        ("project, batched (submit_many/results)", batched_s),
        ("project, one request per call", single_s),
    ]
    print(f"\nqueue path, {args.requests} requests, {platform.machine()}, {os.cpu_count()} cores\n")
    print(f"{'path':<40} {'seconds':>8} {'req/s':>9} {'vs raw':>7}")
    for name, secs in rows:
        print(f"{name:<40} {secs:>8.2f} {args.requests / secs:>9.0f} {raw_s / secs:>7.0%}")
    if args.json_out:
        results = {"requests": args.requests, "raw_s": raw_s, "batched_s": batched_s, "single_s": single_s}
        args.json_out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
