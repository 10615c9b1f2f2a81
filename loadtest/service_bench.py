"""The whole service against its own engine: W1 XADDed by a client, served by `python -m worker`.

One run, in this order, on the same machine and the same engine settings:

  engine   `loadtest/engine_bench.py --workload w1 --skip-static` in a subprocess: the paged engine
           alone, every request handed to it in process (the ceiling the service is measured against);
  service  a private Redis-compatible server (the packaged valkey-server), one worker process
           (`python -m worker`, paged engine) and this process as the client: the W1 prompts are
           XADDed with `ChatClient.submit_many` (streamed replies, so the worker writes every token
           event), and the final replies read back with `ChatClient.results`.

The service's output tok/s counts the completion tokens of the final replies over the time from the
first XADD to the last final reply read. TTFT, TPOT and queue time are the worker's own timings from
each reply (`done.timings`; TTFT counts from the entry's XADD time, so it includes the Redis backlog).
W1's prompts are token ids; the service gets them as text (decoded with the model's tokenizer), so
its prompt token counts differ slightly from the engine's: both totals are printed.

    python loadtest/service_bench.py --model llama-1b-random --device cuda --dtype float16 \
        --max-num-seqs 256 --max-batch-tokens 8192 --max-prefill-chunk-tokens 2048 \
        --kv-cache-bytes 17179869184 --json-out service_w1.json

The cost of the metrics (docs/metrics.md): `--metrics-compare` adds, each round, a service row with the
worker's metrics port on and scraped every `--scrape-interval-s` (1 s by default); the other service rows
run with it off. `--requests` past 1,000 appends further W1 draws, for runs long enough to resolve 1%.

Finding where the time goes: `--worker-cpus 0-5` runs the worker (and the engine process it starts)
on those CPUs only and moves this client to the others; `--py-spy-dir DIR` samples the worker and
its engine process with py-spy (`py-spy record --subprocesses --format raw`, on-CPU stacks) into
DIR/worker_<row>.txt. `--repeat N` runs N rounds (engine, then service rows, alternated, so a slow
or fast spell of the machine hits both) and prints each system's median over the rounds against
the engine's median. Every service row reports the CPU seconds each process spent (client, worker,
engine process, server), read with psutil at the end of the run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import psutil  # noqa: E402
import redis  # noqa: E402

from loadtest.engine_bench import build_workload, percentile  # noqa: E402
from loadtest.metrics_scraper import Scraper  # noqa: E402
from producer.client import ChatClient, Reply  # noqa: E402
from worker.engine.random_model import load_default_tokenizer  # noqa: E402
from worker.local_redis.server import EmbeddedRedis, free_port  # noqa: E402


def engine_row(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    """Run the engine-only W1 row in a subprocess (its GPU memory is freed before the worker starts)."""
    cmd = [
        sys.executable, str(ROOT / "loadtest" / "engine_bench.py"), "--workload", "w1", "--skip-static",
        "--model", args.model, "--device", args.device, "--dtype", args.dtype,
        "--max-num-seqs", str(args.max_num_seqs), "--max-batch-tokens", str(args.max_batch_tokens),
        "--max-prefill-chunk-tokens", str(args.max_prefill_chunk_tokens), "--json-out", str(out),
    ]  # fmt: skip
    if args.kv_cache_bytes:
        cmd += ["--kv-cache-bytes", str(args.kv_cache_bytes)]
    subprocess.run(cmd, check=True, cwd=ROOT)
    return json.loads(out.read_text())["results"][0]


def start_worker(
    url: str, prefix: str, args: argparse.Namespace, log_path: Path, metrics_port: int = 0
) -> subprocess.Popen[bytes]:
    settings = {
        "engine": "paged", "model": args.model, "device": args.device, "dtype": args.dtype,
        "max_num_seqs": args.max_num_seqs, "max_batch_tokens": args.max_batch_tokens,
        "max_prefill_chunk_tokens": args.max_prefill_chunk_tokens, "max_waiting_requests": args.requests,
        "read_count": 256, "max_backlog_requests": 0, "max_prompt_tokens": 8192, "metrics_port": metrics_port,
    }  # fmt: skip
    if args.kv_cache_bytes:
        settings["kv_cache_bytes"] = args.kv_cache_bytes
    env = {**os.environ, "REDIS_URL": url, "LLM_PREFIX": prefix, "PYTHONUNBUFFERED": "1"}
    env.update({f"LLM_{k.upper()}": str(v) for k, v in settings.items()})
    cmd = [sys.executable, "-m", "worker"]
    if args.profile_worker:
        cmd[1:1] = ["-m", "cProfile", "-o", str(args.profile_worker)]
    if args.worker_cpus:
        cmd = ["taskset", "-c", args.worker_cpus, *cmd]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=log)
    deadline = time.monotonic() + args.start_timeout_s
    while time.monotonic() < deadline:
        if '"worker_started"' in log_path.read_text(errors="replace"):
            return proc
        if proc.poll() is not None:
            raise SystemExit(f"worker exited {proc.returncode}:\n{log_path.read_text()[-3000:]}")
        time.sleep(0.5)
    proc.kill()
    raise SystemExit(f"worker did not start:\n{log_path.read_text()[-3000:]}")


def command_stats(client: redis.Redis) -> dict[str, dict[str, float]]:
    """Redis's own account of the run: calls and microseconds per command (INFO commandstats)."""
    stats = client.info("commandstats")
    return {
        k.removeprefix("cmdstat_"): {
            "calls": v["calls"],
            "usec": v["usec"],
            "usec_per_call": v["usec_per_call"],
        }
        for k, v in stats.items()
        if v.get("usec", 0) > 0
    }


def process_cpu_s(proc: psutil.Process) -> dict[str, float]:
    """CPU seconds (user + system) of a process and of each of its children, by role."""
    out: dict[str, float] = {}
    for role, p in [("worker", proc), *(("engine process", c) for c in proc.children(recursive=True))]:
        try:
            t = p.cpu_times()
        except psutil.Error:
            continue
        out[role] = out.get(role, 0.0) + t.user + t.system
    return out


def start_py_spy(pid: int, path: Path) -> subprocess.Popen[bytes]:
    cmd = ["py-spy", "record", "--subprocesses", "--format", "raw", "--rate", "100", "--nonblocking",
           "--pid", str(pid), "--output", str(path)]  # fmt: skip
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def service_row(
    args: argparse.Namespace, workdir: Path, stream: bool, metrics: bool = False
) -> dict[str, Any]:
    """W1 through Redis and one worker; `metrics`: its metrics port on and scraped (else off)."""
    tokenizer = load_default_tokenizer()
    prompts, max_tokens = w1_draws(len(tokenizer), args.requests)
    requests = [
        {"prompt": tokenizer.decode(p), "max_tokens": m, "stream": stream}
        for p, m in zip(prompts, max_tokens, strict=True)
    ]
    prefix = f"svc-{uuid.uuid4().hex[:6]}"
    with EmbeddedRedis() as server:
        metrics_port = free_port() if metrics else 0
        proc = start_worker(server.url, prefix, args, workdir / "worker.log", metrics_port)
        scraper = Scraper(metrics_port, args.scrape_interval_s) if metrics else None
        spy = None
        if args.py_spy_dir:
            args.py_spy_dir.mkdir(parents=True, exist_ok=True)
            name = f"worker_{'stream' if stream else 'final'}{'_metrics' if metrics else ''}.txt"
            spy = start_py_spy(proc.pid, args.py_spy_dir / name)
        worker_ps = psutil.Process(proc.pid)
        server_ps = psutil.Process(server._proc.pid) if server._proc else None
        cpu_before = process_cpu_s(worker_ps)
        server_before = sum(server_ps.cpu_times()[:2]) if server_ps else 0.0
        client_before = time.process_time()
        client = ChatClient(server.url, prefix=prefix, timeout_s=args.timeout_s, max_backlog_requests=0)
        try:
            start = time.perf_counter()
            ids: list[str] = []
            for i in range(0, len(requests), 100):  # 100 XADDs per round trip
                ids += [r for r in client.submit_many(requests[i : i + 100]) if isinstance(r, str)]
            replies = client.results(ids, timeout_s=args.timeout_s)
            wall_s = time.perf_counter() - start
            redis_stats = command_stats(client.redis)
            cpu_s = {"client": time.process_time() - client_before}
            cpu_after = process_cpu_s(worker_ps)
            cpu_s.update({role: cpu_after[role] - cpu_before.get(role, 0.0) for role in cpu_after})
            if server_ps:
                cpu_s["server"] = sum(server_ps.cpu_times()[:2]) - server_before
        finally:
            if scraper is not None and not scraper.stop():
                raise SystemExit("the worker's metrics port never answered a scrape")
            client.close()
            proc.terminate()
            proc.wait(timeout=120)
            if spy:
                spy.wait(timeout=60)
    done = [r for r in replies.values() if isinstance(r, Reply)]
    errors = len(replies) - len(done)
    stats = {}
    for line in (workdir / "worker.log").read_text(errors="replace").splitlines():
        if '"worker_stopped"' in line:
            stats = json.loads(line)
    ttft = [r.timings.ttft_ms for r in done if r.timings.ttft_ms is not None]
    tpot = [r.timings.tpot_ms for r in done if r.timings.tpot_ms is not None]
    output_tokens = sum(r.usage.completion_tokens for r in done)
    return {
        "system": ("service" if stream else "service, stream=false") + (", metrics on" if metrics else ""),
        "requests": len(ids), "answered": len(done), "errors": errors,
        "output_tokens": output_tokens, "requested_tokens": sum(max_tokens[: len(ids)]),
        "prompt_tokens": sum(r.usage.prompt_tokens for r in done),
        "cached_tokens": sum(r.usage.cached_tokens for r in done),
        "wall_s": wall_s, "output_tok_s": output_tokens / wall_s,
        "ttft_p50_ms": percentile(ttft, 50), "ttft_p95_ms": percentile(ttft, 95),
        "tpot_p50_ms": percentile(tpot, 50), "tpot_p95_ms": percentile(tpot, 95),
        "queue_p50_ms": statistics.median(r.timings.queue_ms for r in done),
        "worker_steps": stats.get("steps"), "worker_phase_s": stats.get("phase_s"),
        "redis_commands": redis_stats, "cpu_s": cpu_s,
    }  # fmt: skip


def w1_draws(vocab_size: int, count: int) -> tuple[list[list[int]], list[int]]:
    """The first `count` W1 requests: W1 itself (seed 0), then further draws of the same mix (seeds 1, 2,
    ...), each with its own system prompt, for runs longer than one W1."""
    prompts: list[list[int]] = []
    max_tokens: list[int] = []
    seed = 0
    while len(prompts) < count:
        workload = build_workload("w1", vocab_size=vocab_size, seed=seed)
        prompts += workload.prompts
        max_tokens += workload.max_tokens
        seed += 1
    return prompts[:count], max_tokens[:count]


def parse_cpu_list(text: str) -> list[int]:
    """taskset's list syntax: "0-3,8" -> [0, 1, 2, 3, 8]."""
    cpus: list[int] = []
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        cpus += range(int(lo), int(hi or lo) + 1)
    return cpus


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="llama-1b-random")
    p.add_argument("--device", default="cuda", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default="float16", choices=["auto", "float32", "float16", "bfloat16"])
    p.add_argument(
        "--requests", type=int, default=1000,
        help="the first N requests of W1; past 1,000, further W1 draws (seeds 1, 2, ...) follow",
    )  # fmt: skip
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-batch-tokens", type=int, default=8192)
    p.add_argument("--max-prefill-chunk-tokens", type=int, default=2048)
    p.add_argument("--kv-cache-bytes", type=int, default=None)
    p.add_argument("--skip-engine", action="store_true", help="run the service only")
    p.add_argument("--also-unstreamed", action="store_true", help="add a service row with stream=false")
    p.add_argument("--start-timeout-s", type=float, default=600)
    p.add_argument("--timeout-s", type=float, default=900)
    p.add_argument("--json-out", type=Path)
    p.add_argument("--profile-worker", type=Path, help="run the worker under cProfile, stats to this file")
    p.add_argument("--worker-cpus", help="taskset CPU list for the worker; the client moves to the others")
    p.add_argument("--py-spy-dir", type=Path, help="sample the worker and engine processes with py-spy")
    p.add_argument("--repeat", type=int, default=1, help="rounds of engine + service rows, alternated")
    p.add_argument(
        "--metrics-compare", action="store_true",
        help="add a service row with the worker's metrics port on and scraped (the others: off)",
    )  # fmt: skip
    p.add_argument(
        "--scrape-interval-s", type=float, default=1.0, help="with --metrics-compare (Prometheus: 15-30 s)"
    )
    args = p.parse_args()
    if args.requests > 1000 and not args.skip_engine:
        raise SystemExit("the engine row runs W1's 1,000 requests: past 1,000, add --skip-engine")
    if args.worker_cpus:
        worker_cpus = set(range(psutil.cpu_count())) - set(parse_cpu_list(args.worker_cpus))
        if not worker_cpus:
            raise SystemExit("--worker-cpus leaves no CPU for the client")
        os.sched_setaffinity(0, worker_cpus)
    rounds = []
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        for n in range(args.repeat):  # alternated, so slow and fast spells of the machine hit both
            rows = [] if args.skip_engine else [engine_row(args, workdir / "engine.json")]
            service = [service_row(args, workdir, stream=True)]
            if args.metrics_compare:  # metrics off then on, alternating the order by round
                service.append(service_row(args, workdir, stream=True, metrics=True))
                if n % 2:
                    service.reverse()
            rows += service
            if args.also_unstreamed:
                rows.append(service_row(args, workdir, stream=False))
            for r in rows:
                r["round"] = n + 1
            report(rows, args)
            rounds.append(rows)
    if args.repeat > 1:
        summarize(rounds, args.skip_engine)
    if args.json_out:
        config = {k: str(v) for k, v in vars(args).items()}
        results = [r for rows in rounds for r in rows]
        args.json_out.write_text(json.dumps({"config": config, "results": results}, indent=2))


def report(rows: list[dict[str, Any]], args: argparse.Namespace) -> None:
    where = f"{args.model} {args.dtype} on {args.device}"
    print(f"\nW1 ({args.requests} requests), {where}, round {rows[0]['round']}\n")
    print(
        f"{'system':<8} {'out tok/s':>10} {'wall s':>8} {'TTFT p50':>9} {'p95':>9} {'TPOT p50':>9} {'p95':>8}"
    )
    for r in rows:
        print(
            f"{r['system']:<22} {r['output_tok_s']:>10,.0f} {r['wall_s']:>8.2f} {r['ttft_p50_ms']:>9.1f} "
            f"{r['ttft_p95_ms']:>9.1f} {r['tpot_p50_ms']:>9.2f} {r['tpot_p95_ms']:>8.2f}"
        )
    for svc in rows[0 if args.skip_engine else 1 :]:
        if not args.skip_engine:
            ratio = svc["output_tok_s"] / rows[0]["output_tok_s"]
            print(f"\n{svc['system']} / engine output tok/s: {ratio:.1%}")
        print(f"{svc['system']}: {svc['answered']}/{svc['requests']} answered, {svc['errors']} errors, "
              f"{svc['output_tokens']} of {svc['requested_tokens']} requested tokens, "
              f"prompt tokens {svc['prompt_tokens']} ({svc['cached_tokens']} cached)")  # fmt: skip
        print("  CPU s over the run: " + ", ".join(f"{k} {v:.1f}" for k, v in svc["cpu_s"].items()))
        print(f"  worker seconds by loop phase: {svc['worker_phase_s']}")
        busiest = sorted(svc["redis_commands"].items(), key=lambda kv: -kv[1]["usec"])[:6]
        print("  Redis time by command: " + ", ".join(
            f"{name} {v['usec'] / 1e6:.2f} s ({v['calls']} calls)" for name, v in busiest))  # fmt: skip


def summarize(rounds: list[list[dict[str, Any]]], skip_engine: bool) -> None:
    """Median output tok/s of each system over the rounds, and each against the engine's median."""
    by_system: dict[str, list[float]] = {}
    for rows in rounds:
        for r in rows:
            by_system.setdefault(r["system"], []).append(r["output_tok_s"])
    print(f"\nover {len(rounds)} rounds (median, then each round):")
    engine = None if skip_engine else statistics.median(by_system["paged engine"])
    for system, values in by_system.items():
        line = f"  {system:<22} {statistics.median(values):>10,.0f}  " + " ".join(f"{v:,.0f}" for v in values)
        if engine and system != "paged engine":
            line += f"   median / engine median: {statistics.median(values) / engine:.1%}"
        print(line)


if __name__ == "__main__":
    main()
