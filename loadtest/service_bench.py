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

Open loop (as vLLM's `benchmark_serving.py --request-rate`): the rows above hand the service all of W1 at
once, which measures throughput but not the latency at a given load. `--request-rate R1,R2,...`
(requests/s) sends the requests one at a time at Poisson arrival times (exponential gaps drawn with
`--seed`, scaled to a mean of exactly 1/R; every rate scales the same gaps) while a reader thread reads
their streamed replies as they come. `--capacity-fractions 0.25,0.5,0.75,1.0` adds rows at those fractions
of the offline capacity (the offline service row's requests answered / wall). One worker serves every row
in turn, the offline row first: a row ends when its last final reply is read, and a final and its XACK
are one script, so the next row starts on an empty queue. Each row sends W1 draws of its own (the
offline row W1 itself, each later row the seeds after those of the row before), so no row finds its
prompts in the prefix cache.

Per rate: the achieved rate (requests sent / the span of the sends), output tok/s, TTFT p50/p99 twice
(the worker's from `done.timings`, counted from the XADD; the client's, from the send to the read of the
first token event), TPOT p50/p99 (the worker's), end-to-end p50/p99 (the client's, send to final reply
read), errors. Goodput is the highest rate tested at which the client's TTFT p99 <= `--ttft-slo-ms` (500)
and the worker's TPOT p99 <= `--tpot-slo-ms` (50), with its output tok/s against the offline row's;
`--goodput-search N` adds N rows bisecting between the highest passing rate and the lowest failing one
above it. `--plot PNG` draws TTFT and TPOT p50/p99 against the request rate (with matplotlib). On a GPU:

    python loadtest/service_bench.py --model llama-1b-random --device cuda --dtype float16 \
        --max-num-seqs 256 --max-batch-tokens 8192 --max-prefill-chunk-tokens 2048 \
        --kv-cache-bytes 17179869184 --skip-engine --capacity-fractions 0.25,0.5,0.75,1.0 \
        --goodput-search 2 --plot docs/bench/h100_service_open_loop.png --json-out service_open_loop.json

At toy scale on a CPU, with SmolLM2 (`--model default --device cpu --dtype float32 --requests 40
--skip-engine --request-rate 1,2`), or with the echo engine, no model, to check the client and the loop
(`--engine echo --skip-engine --requests 40 --request-rate 5,10`).
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import math
import os
import queue
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import psutil  # noqa: E402
import redis  # noqa: E402
from redis.typing import KeyT, StreamIdT  # noqa: E402

from loadtest.engine_bench import build_workload, percentile  # noqa: E402
from loadtest.metrics_scraper import Scraper  # noqa: E402
from loadtest.worker_launch import spawn_worker, wait_started  # noqa: E402
from producer.client import ChatClient, ChatError, Reply, final_reply  # noqa: E402
from producer.wire.models import TokenEvent, new_request_id  # noqa: E402
from producer.wire.redis_types import read_entries  # noqa: E402
from worker.engine.model_files import DEFAULT_MODEL  # noqa: E402
from worker.engine.random_model import load_default_tokenizer  # noqa: E402
from worker.local_redis.server import EmbeddedRedis, free_port  # noqa: E402

W1_SIZE = 1000  # requests of one W1 draw (engine_bench.build_workload)


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
    cmd += ["--async-scheduling", args.async_scheduling]
    subprocess.run(cmd, check=True, cwd=ROOT)
    return json.loads(out.read_text())["results"][0]


def start_worker(
    url: str, prefix: str, args: argparse.Namespace, log_path: Path, metrics_port: int = 0
) -> subprocess.Popen[bytes]:
    model = DEFAULT_MODEL if args.model == "default" else args.model  # as engine_bench names it
    settings = {
        "engine": args.engine, "model": model, "device": args.device, "dtype": args.dtype,
        "max_num_seqs": args.max_num_seqs, "max_batch_tokens": args.max_batch_tokens,
        "max_prefill_chunk_tokens": args.max_prefill_chunk_tokens, "max_waiting_requests": args.requests,
        "read_count": 256, "max_backlog_requests": 0, "max_prompt_tokens": 8192, "metrics_port": metrics_port,
    }  # fmt: skip
    if args.kv_cache_bytes:
        settings["kv_cache_bytes"] = args.kv_cache_bytes
    if args.async_scheduling != "auto":
        settings["async_scheduling"] = args.async_scheduling == "on"
    profile = ["-m", "cProfile", "-o", str(args.profile_worker)] if args.profile_worker else []
    wrap = ["taskset", "-c", args.worker_cpus] if args.worker_cpus else []
    proc = spawn_worker(url, prefix, settings, log_path, wrap=wrap, python_args=profile)
    wait_started([proc], [log_path], args.start_timeout_s)
    return proc


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


@dataclass
class Session:
    """A private server, one worker on it and this process's client: what service rows run on."""

    client: ChatClient
    worker: psutil.Process
    server: psutil.Process | None
    log_path: Path

    def cpu_mark(self) -> dict[str, float]:
        """CPU seconds so far, by process, for `cpu_since`."""
        mark = {"client": time.process_time(), **process_cpu_s(self.worker)}
        if self.server:
            mark["server"] = sum(self.server.cpu_times()[:2])
        return mark

    def cpu_since(self, mark: dict[str, float]) -> dict[str, float]:
        """CPU seconds spent by each process since `mark` (client first, then worker, engine, server)."""
        now = self.cpu_mark()
        return {role: now[role] - mark.get(role, 0.0) for role in now}


@contextlib.contextmanager
def service_session(
    args: argparse.Namespace, workdir: Path, spy_name: str, metrics: bool = False
) -> Iterator[Session]:
    """Start the server and the worker (`metrics`: its metrics port on and scraped); stop both on exit."""
    prefix = f"svc-{uuid.uuid4().hex[:6]}"
    log_path = workdir / "worker.log"
    with EmbeddedRedis() as server:
        metrics_port = free_port() if metrics else 0
        proc = start_worker(server.url, prefix, args, log_path, metrics_port)
        scraper = Scraper(metrics_port, args.scrape_interval_s) if metrics else None
        spy = None
        if args.py_spy_dir:
            args.py_spy_dir.mkdir(parents=True, exist_ok=True)
            spy = start_py_spy(proc.pid, args.py_spy_dir / spy_name)
        server_ps = psutil.Process(server._proc.pid) if server._proc else None
        client = ChatClient(server.url, prefix=prefix, timeout_s=args.timeout_s, max_backlog_requests=0)
        try:
            yield Session(client, psutil.Process(proc.pid), server_ps, log_path)
        finally:
            if scraper is not None and not scraper.stop():
                raise SystemExit("the worker's metrics port never answered a scrape")
            client.close()
            proc.terminate()
            proc.wait(timeout=120)
            if spy:
                spy.wait(timeout=60)


def worker_stopped(log_path: Path) -> dict[str, Any]:
    """The worker's `worker_stopped` log line: its steps and loop phase seconds over its whole run."""
    stats: dict[str, Any] = {}
    for line in log_path.read_text(errors="replace").splitlines():
        if '"worker_stopped"' in line:
            stats = json.loads(line)
    return {"worker_steps": stats.get("steps"), "worker_phase_s": stats.get("phase_s")}


def w1_requests(
    tokenizer: Any, count: int, stream: bool, first_seed: int = 0
) -> tuple[list[dict[str, Any]], list[int]]:
    """`count` W1 requests as the service gets them (prompts as text), and their max_tokens."""
    prompts, max_tokens = w1_draws(len(tokenizer), count, first_seed)
    requests = [
        {"prompt": tokenizer.decode(p), "max_tokens": m, "stream": stream}
        for p, m in zip(prompts, max_tokens, strict=True)
    ]
    return requests, max_tokens


def service_row(
    args: argparse.Namespace, workdir: Path, stream: bool, metrics: bool = False
) -> dict[str, Any]:
    """W1 through Redis and one worker; `metrics`: its metrics port on and scraped (else off)."""
    requests, max_tokens = w1_requests(load_default_tokenizer(), args.requests, stream)
    system = ("service" if stream else "service, stream=false") + (", metrics on" if metrics else "")
    spy_name = f"worker_{'stream' if stream else 'final'}{'_metrics' if metrics else ''}.txt"
    with service_session(args, workdir, spy_name, metrics) as session:
        row = offline_pass(session, requests, max_tokens, args.timeout_s)
    return {"system": system, **row, **worker_stopped(session.log_path)}


def offline_pass(
    session: Session, requests: list[dict[str, Any]], max_tokens: list[int], timeout_s: float
) -> dict[str, Any]:
    """Every request XADDed at once (100 per round trip), then the final replies read back."""
    client = session.client
    mark = session.cpu_mark()
    start = time.perf_counter()
    ids: list[str] = []
    for i in range(0, len(requests), 100):  # 100 XADDs per round trip
        ids += [r for r in client.submit_many(requests[i : i + 100]) if isinstance(r, str)]
    replies = client.results(ids, timeout_s=timeout_s)
    wall_s = time.perf_counter() - start
    redis_stats = command_stats(client.redis)
    cpu_s = session.cpu_since(mark)
    done = [r for r in replies.values() if isinstance(r, Reply)]
    ttft = [r.timings.ttft_ms for r in done if r.timings.ttft_ms is not None]
    tpot = [r.timings.tpot_ms for r in done if r.timings.tpot_ms is not None]
    output_tokens = sum(r.usage.completion_tokens for r in done)
    return {
        "requests": len(ids), "answered": len(done), "errors": len(replies) - len(done),
        "output_tokens": output_tokens, "requested_tokens": sum(max_tokens[: len(ids)]),
        "prompt_tokens": sum(r.usage.prompt_tokens for r in done),
        "cached_tokens": sum(r.usage.cached_tokens for r in done),
        "wall_s": wall_s, "output_tok_s": output_tokens / wall_s,
        "ttft_p50_ms": percentile(ttft, 50), "ttft_p95_ms": percentile(ttft, 95),
        "tpot_p50_ms": percentile(tpot, 50), "tpot_p95_ms": percentile(tpot, 95),
        "queue_p50_ms": statistics.median(r.timings.queue_ms for r in done),
        "redis_commands": redis_stats, "cpu_s": cpu_s,
    }  # fmt: skip


def w1_draws(vocab_size: int, count: int, first_seed: int = 0) -> tuple[list[list[int]], list[int]]:
    """The first `count` W1 requests: W1 itself (seed 0), then further draws of the same mix (seeds 1, 2,
    ...), each with its own system prompt, for runs longer than one W1; from `first_seed` on if given."""
    prompts: list[list[int]] = []
    max_tokens: list[int] = []
    seed = first_seed
    while len(prompts) < count:
        workload = build_workload("w1", vocab_size=vocab_size, seed=seed)
        prompts += workload.prompts
        max_tokens += workload.max_tokens
        seed += 1
    return prompts[:count], max_tokens[:count]


# -- open loop -----------------------------------------------------------------------------------------
READ_BLOCK_MS = 100  # a reply read's longest wait; any new request ends it sooner (ReplyReader)
MAX_READ_KEYS = 512  # reply streams named by one XREAD, as `ChatClient.results` does


@dataclass
class Sent:
    """One request of an open-loop row, on this process's clock (`time.perf_counter`)."""

    request_id: str
    reply_key: str
    sent_at: float
    cursor: bytes | str = "0"
    first_token_at: float | None = None
    final_at: float | None = None
    final: Reply | ChatError | None = None


@dataclass
class ReplyReader:
    """Reads the replies of requests while they are sent, on a thread of its own: when each one's first
    token event and its final reply arrive here.

    One XREAD per poll names every open reply stream and the request stream itself: every new request
    is an entry there, so a read blocked on the older replies ends as soon as one is sent and the next
    read names its reply stream too (a request is handed over before it is sent, so none is missed).
    """

    client: ChatClient
    requests_key: str
    timeout_s: float
    incoming: queue.SimpleQueue[Sent | None] = field(default_factory=queue.SimpleQueue)
    sent: list[Sent] = field(default_factory=list)
    error: BaseException | None = None
    _open: dict[str, Sent] = field(default_factory=dict)
    _wake_cursor: bytes | str = "$"
    _turn: int = 0
    _thread: threading.Thread | None = None

    def start(self) -> None:
        info = self.client.redis.xinfo_stream(self.requests_key)  # the worker made it (MKSTREAM)
        self._wake_cursor = info["last-generated-id"]
        self._thread = threading.Thread(target=self._run, name="reply-reader", daemon=True)
        self._thread.start()

    def add(self, request_id: str, sent_at: float) -> None:
        """Watch a request's replies; called just before it is sent."""
        self.incoming.put(Sent(request_id, self.client.reply_key(request_id), sent_at))

    def finish(self) -> list[Sent]:
        """Wait until every request has its final reply; fails after `timeout_s` (from the call) without
        them, as `ChatClient.results` does: the next row must not start while these still run."""
        assert self._thread is not None
        self.incoming.put(None)
        self._thread.join(self.timeout_s + 2 * READ_BLOCK_MS / 1000)
        unanswered = sum(s.final is None for s in self.sent)
        if self._thread.is_alive() or self.error is not None or unanswered:
            raise SystemExit(
                f"open loop: {unanswered} of {len(self.sent)} requests unanswered ({self.error!r})"
            )
        return self.sent

    def _run(self) -> None:
        try:
            closed, deadline = False, math.inf
            while not closed or self._open:
                closed = self._take_new() or closed
                if closed and deadline == math.inf:
                    deadline = time.perf_counter() + self.timeout_s
                if time.perf_counter() > deadline:
                    return
                self._poll()
        except BaseException as exc:  # reported by `finish`
            self.error = exc

    def _take_new(self) -> bool:
        """Open the reply streams of requests handed over since the last poll; True once told to stop."""
        while True:
            try:
                item = self.incoming.get_nowait()
            except queue.Empty:
                return False
            if item is None:
                return True
            self.sent.append(item)
            self._open[item.reply_key] = item

    def _poll(self) -> None:
        keys = list(self._open)
        block: int | None = READ_BLOCK_MS
        if len(keys) > MAX_READ_KEYS:  # the streams take turns; none of these reads waits
            start = self._turn % len(keys)
            keys = (keys[start:] + keys[:start])[:MAX_READ_KEYS]
            self._turn += MAX_READ_KEYS
            block = None
        streams: dict[KeyT, StreamIdT] = {self.requests_key: self._wake_cursor}
        streams.update({k: self._open[k].cursor for k in keys})
        got = read_entries(self.client.redis.xread(streams, block=block))
        now = time.perf_counter()
        for raw_key, entries in got:
            key = raw_key.decode()
            if key == self.requests_key:
                self._wake_cursor = entries[-1][0]
                continue
            self._take(self._open[key], entries, now)

    def _take(self, sent: Sent, entries: list[Any], now: float) -> None:
        for entry_id, fields in entries:
            sent.cursor = entry_id
            event = self.client.check_event(sent.request_id, sent.reply_key, entry_id, fields)
            if event is None:
                continue
            if isinstance(event, TokenEvent):
                if sent.first_token_at is None:
                    sent.first_token_at = now
                continue
            try:
                sent.final = final_reply(event, sent.request_id)
            except ChatError as exc:
                sent.final = exc
            sent.final_at = now
            self.client.forget(sent.request_id)
            del self._open[sent.reply_key]
            return


def poisson_gaps(count: int, seed: int) -> list[float]:
    """Gaps before each of `count` arrivals at a rate of 1/s: 0 for the first, then exponential ones
    scaled to a mean of exactly 1 (a Poisson process given its count in the span: its arrivals are
    uniform there), so a row's rate is the rate asked, not a draw's. Divided by R, arrivals at R/s."""
    rng = random.Random(seed)
    gaps = [rng.expovariate(1.0) for _ in range(count - 1)]
    scale = len(gaps) / sum(gaps) if gaps else 1.0
    return [0.0] + [g * scale for g in gaps]


def open_loop_pass(
    session: Session, requests: list[dict[str, Any]], max_tokens: list[int], rate: float,
    gaps: list[float], timeout_s: float,
) -> dict[str, Any]:  # fmt: skip
    """Each request sent at its arrival time (`gaps` / `rate`), its streamed replies read as they come."""
    client = session.client
    client.redis.config_resetstat()  # this row's commands only
    reader = ReplyReader(client, client.names.requests, timeout_s)
    reader.start()
    arrivals = list(itertools.accumulate(g / rate for g in gaps))
    mark = session.cpu_mark()
    start = time.perf_counter()
    lag_s = 0.0
    for request, due in zip(requests, arrivals, strict=True):
        wait_s = start + due - time.perf_counter()
        if wait_s > 0:
            time.sleep(wait_s)
        request_id = new_request_id()
        sent_at = time.perf_counter()
        lag_s = max(lag_s, sent_at - start - due)
        reader.add(request_id, sent_at)
        client.submit(id=request_id, **request)
    sent = reader.finish()
    wall_s = max(s.final_at or 0.0 for s in sent) - start
    redis_stats = command_stats(client.redis)
    cpu_s = session.cpu_since(mark)
    return open_loop_row(sent, max_tokens, rate, arrivals, wall_s, lag_s) | {
        "redis_commands": redis_stats, "cpu_s": cpu_s,
    }  # fmt: skip


def open_loop_row(
    sent: list[Sent], max_tokens: list[int], rate: float, arrivals: list[float], wall_s: float, lag_s: float
) -> dict[str, Any]:
    """One open-loop row's figures; `ttft` is the worker's (from the XADD), `client_ttft` and `e2e` this
    process's (from the send to the read of the first token event, of the final reply)."""
    done = [(s, s.final) for s in sent if isinstance(s.final, Reply)]
    ttft = [r.timings.ttft_ms for _, r in done if r.timings.ttft_ms is not None]
    tpot = [r.timings.tpot_ms for _, r in done if r.timings.tpot_ms is not None]
    client_ttft = [(s.first_token_at - s.sent_at) * 1000 for s, _ in done if s.first_token_at is not None]
    e2e = [(s.final_at - s.sent_at) * 1000 for s, _ in done if s.final_at is not None]
    send_span_s = sent[-1].sent_at - sent[0].sent_at
    output_tokens = sum(r.usage.completion_tokens for _, r in done)
    row: dict[str, Any] = {
        "system": "service, open loop", "request_rate": rate,
        "offered_rate": (len(arrivals) - 1) / arrivals[-1] if arrivals[-1] else math.nan,
        "achieved_rate": (len(sent) - 1) / send_span_s if send_span_s else math.nan,
        "send_lag_max_ms": lag_s * 1000,
        "requests": len(sent), "answered": len(done), "errors": len(sent) - len(done),
        "output_tokens": output_tokens, "requested_tokens": sum(max_tokens[: len(sent)]),
        "prompt_tokens": sum(r.usage.prompt_tokens for _, r in done),
        "cached_tokens": sum(r.usage.cached_tokens for _, r in done),
        "wall_s": wall_s, "output_tok_s": output_tokens / wall_s, "answered_rate": len(done) / wall_s,
        "queue_p50_ms": statistics.median(r.timings.queue_ms for _, r in done) if done else math.nan,
    }  # fmt: skip
    for name, values in (("ttft", ttft), ("client_ttft", client_ttft), ("tpot", tpot), ("e2e", e2e)):
        row[f"{name}_p50_ms"], row[f"{name}_p99_ms"] = percentile(values, 50), percentile(values, 99)
    return row


def meets_slo(row: dict[str, Any], args: argparse.Namespace) -> bool:
    """The client's TTFT p99 and the worker's TPOT p99 within their SLOs, and every request answered."""
    return (
        row["errors"] == 0
        and row["client_ttft_p99_ms"] <= args.ttft_slo_ms
        and row["tpot_p99_ms"] <= args.tpot_slo_ms
    )


def open_loop_rows(args: argparse.Namespace, workdir: Path) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The offline service row, then the open-loop rows, all on one worker; and the goodput found."""
    tokenizer = load_default_tokenizer()
    seeds_per_row = math.ceil(args.requests / W1_SIZE)
    gaps = poisson_gaps(args.requests, args.seed)

    def draws(row: int) -> tuple[list[dict[str, Any]], list[int]]:
        return w1_requests(tokenizer, args.requests, stream=True, first_seed=row * seeds_per_row)

    with service_session(args, workdir, "worker_open_loop.txt") as session:
        offline = {"system": "service", **offline_pass(session, *draws(0), args.timeout_s)}
        capacity = offline["answered"] / offline["wall_s"]
        offline["capacity_rate"] = capacity
        print(f"offline: {capacity:.2f} requests/s, {offline['output_tok_s']:,.0f} output tok/s", flush=True)
        rows = [offline]

        def run(rate: float) -> None:
            row = open_loop_pass(session, *draws(len(rows)), rate, gaps, args.timeout_s)
            row["capacity_fraction"] = rate / capacity
            row["meets_slo"] = meets_slo(row, args)
            rows.append(row)
            print(open_loop_line(row), flush=True)

        rates = sorted({*args.request_rate, *(f * capacity for f in args.capacity_fractions)})
        for rate in rates:
            run(rate)
        for _ in range(args.goodput_search):
            bracket = goodput_bracket(rows[1:])
            if bracket is None:
                print("goodput search: no passing rate below a failing one to bisect")
                break
            run(sum(bracket) / 2)
    offline.update(worker_stopped(session.log_path))  # the worker's whole run: every row's steps
    return rows, goodput(offline, rows[1:], args)


def goodput_bracket(rows: list[dict[str, Any]]) -> tuple[float, float] | None:
    """The highest rate that met the SLOs and the lowest above it that did not; None without both."""
    passing = [r["request_rate"] for r in rows if r["meets_slo"]]
    if not passing:
        return None
    failing = [r["request_rate"] for r in rows if not r["meets_slo"] and r["request_rate"] > max(passing)]
    return (max(passing), min(failing)) if failing else None


def goodput(offline: dict[str, Any], rows: list[dict[str, Any]], args: argparse.Namespace) -> dict[str, Any]:
    """The highest tested rate that met the SLOs, and its output tok/s against the offline row's."""
    passing = [r for r in rows if r["meets_slo"]]
    best = max(passing, key=lambda r: r["request_rate"]) if passing else None
    return {
        "ttft_slo_ms": args.ttft_slo_ms, "tpot_slo_ms": args.tpot_slo_ms,
        "rate": best["request_rate"] if best else None,
        "output_tok_s": best["output_tok_s"] if best else None,
        "ratio_to_offline": best["output_tok_s"] / offline["output_tok_s"] if best else None,
    }  # fmt: skip


OPEN_LOOP_HEADER = (
    f"{'rate':>7} {'achieved':>8} {'out tok/s':>10} {'TTFT p50':>9} {'p99':>8} {'client p50':>10} "
    f"{'p99':>8} {'TPOT p50':>9} {'p99':>7} {'e2e p50':>8} {'p99':>8} {'errors':>6}"
)


def open_loop_line(r: dict[str, Any]) -> str:
    return (
        f"{r['request_rate']:>7.2f} {r['achieved_rate']:>8.2f} {r['output_tok_s']:>10,.0f} "
        f"{r['ttft_p50_ms']:>9.1f} {r['ttft_p99_ms']:>8.1f} {r['client_ttft_p50_ms']:>10.1f} "
        f"{r['client_ttft_p99_ms']:>8.1f} {r['tpot_p50_ms']:>9.2f} {r['tpot_p99_ms']:>7.2f} "
        f"{r['e2e_p50_ms']:>8.0f} {r['e2e_p99_ms']:>8.0f} {r['errors']:>6}{'' if r['meets_slo'] else '  x'}"
    )


def report_open_loop(rows: list[dict[str, Any]], found: dict[str, Any], args: argparse.Namespace) -> None:
    offline = rows[0]
    print(
        f"\nW1 open loop ({args.requests} requests a row, Poisson arrivals, seed {args.seed}), {where(args)}"
    )
    print(f"offline: {offline['capacity_rate']:.2f} requests/s, {offline['output_tok_s']:,.0f} output tok/s, "
          f"{offline['answered']}/{offline['requests']} answered")  # fmt: skip
    print("(the worker's steps and phase seconds above: its whole run, every row)")
    print("requests/s; ms; TTFT: the worker's (from the XADD), client: send to first token read; "
          "TPOT: the worker's; e2e: the client's; x: misses an SLO\n" + OPEN_LOOP_HEADER)  # fmt: skip
    for r in sorted(rows[1:], key=lambda r: r["request_rate"]):
        print(open_loop_line(r))
    slo = f"client TTFT p99 <= {found['ttft_slo_ms']:g} ms, TPOT p99 <= {found['tpot_slo_ms']:g} ms"
    if found["rate"] is None:
        print(f"\ngoodput: no rate tested meets {slo}")
    else:
        tok_s, ratio = found["output_tok_s"], found["ratio_to_offline"]
        print(
            f"\ngoodput ({slo}): {found['rate']:.2f} requests/s, {tok_s:,.0f} output tok/s, "
            f"{ratio:.1%} of offline"
        )


def plot_open_loop(rows: list[dict[str, Any]], path: Path, args: argparse.Namespace) -> None:
    """TTFT and TPOT p50/p99 of the open-loop rows (`rows[1:]`) against the request rate, the SLOs
    dotted, the offline capacity (`rows[0]`) a vertical line."""
    try:
        import matplotlib
    except ImportError:
        print(f"--plot: matplotlib is not installed; no plot written to {path}")
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    capacity = rows[0]["capacity_rate"]
    rows = sorted(rows[1:], key=lambda r: r["request_rate"])
    rates = [r["request_rate"] for r in rows]
    fig, (ttft, tpot) = plt.subplots(1, 2, figsize=(11, 4.5))
    for name, label, style in (("ttft", "worker", "-"), ("client_ttft", "client", "--")):
        for q, marker in (("p50", "o"), ("p99", "s")):
            ttft.plot(rates, [r[f"{name}_{q}_ms"] for r in rows], marker + style, label=f"{label} {q}")
    for q, marker in (("p50", "o"), ("p99", "s")):
        tpot.plot(rates, [r[f"tpot_{q}_ms"] for r in rows], marker + "-", label=q)
    for ax, slo, what in ((ttft, args.ttft_slo_ms, "TTFT"), (tpot, args.tpot_slo_ms, "TPOT")):
        ax.axhline(slo, color="grey", linestyle=":", label=f"SLO {slo:g} ms")
        ax.axvline(capacity, color="black", linestyle="-.", label=f"offline {capacity:.1f}/s")
        ax.set_ylim(bottom=0)
        ax.set_xlabel("request rate (requests/s, Poisson)")
        ax.set_ylabel(f"{what} (ms)")
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.suptitle(f"W1 open loop: {where(args)}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"plot: {path}")


def parse_cpu_list(text: str) -> list[int]:
    """taskset's list syntax: "0-3,8" -> [0, 1, 2, 3, 8]."""
    cpus: list[int] = []
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        cpus += range(int(lo), int(hi or lo) + 1)
    return cpus


def floats(text: str) -> list[float]:
    """Positive numbers separated by commas: "1,2.5" -> [1.0, 2.5]."""
    values = [float(v) for v in text.split(",") if v.strip()]
    if not values or min(values) <= 0:
        raise argparse.ArgumentTypeError(f"expected positive numbers separated by commas, got {text!r}")
    return values


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="llama-1b-random")
    p.add_argument("--device", default="cuda", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default="float16", choices=["auto", "float32", "float16", "bfloat16"])
    p.add_argument(
        "--engine", default="paged", choices=["paged", "echo"],
        help="the worker's engine; echo: no model (a fast check of the client and the loop), --skip-engine",
    )  # fmt: skip
    p.add_argument(
        "--requests", type=int, default=1000,
        help="the first N requests of W1; past 1,000, further W1 draws (seeds 1, 2, ...) follow",
    )  # fmt: skip
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-batch-tokens", type=int, default=8192)
    p.add_argument("--max-prefill-chunk-tokens", type=int, default=2048)
    p.add_argument("--kv-cache-bytes", type=int, default=None)
    p.add_argument(
        "--async-scheduling", default="auto", choices=["auto", "on", "off"],
        help="engine and worker: LLM_ASYNC_SCHEDULING (auto: the engine's default)",
    )  # fmt: skip
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
    p.add_argument(
        "--request-rate", type=floats, default=[], metavar="R[,R2...]",
        help="open loop: a row per rate (requests/s, Poisson arrivals), after the offline row, one worker",
    )  # fmt: skip
    p.add_argument(
        "--capacity-fractions", type=floats, default=[], metavar="F[,F2...]",
        help="open loop: rows at these fractions of the offline row's requests/s (0.25,0.5,0.75,1.0)",
    )  # fmt: skip
    p.add_argument("--seed", type=int, default=0, help="open loop: seed of the arrival gaps")
    p.add_argument("--ttft-slo-ms", type=float, default=500, help="goodput: client TTFT p99 at most this")
    p.add_argument("--tpot-slo-ms", type=float, default=50, help="goodput: worker TPOT p99 at most this")
    p.add_argument(
        "--goodput-search", type=int, nargs="?", const=3, default=0, metavar="N",
        help="open loop: N more rows (3 if not given) bisecting between the passing and failing rates",
    )  # fmt: skip
    p.add_argument("--plot", type=Path, help="open loop: PNG of TTFT and TPOT p50/p99 vs request rate")
    p.add_argument(
        "--replot", type=Path, metavar="JSON",
        help="draw --plot from an open-loop run's --json-out (a GPU host without matplotlib) and exit",
    )  # fmt: skip
    args = p.parse_args()
    if args.replot:
        replot(args)
        return
    if args.requests > 1000 and not args.skip_engine:
        raise SystemExit("the engine row runs W1's 1,000 requests: past 1,000, add --skip-engine")
    if args.engine == "echo" and not args.skip_engine:
        raise SystemExit("the engine row runs the paged engine: with --engine echo, add --skip-engine")
    open_loop = bool(args.request_rate or args.capacity_fractions)
    if open_loop and (args.repeat > 1 or args.metrics_compare or args.also_unstreamed):
        raise SystemExit("--request-rate/--capacity-fractions run alone: no --repeat, --metrics-compare, "
                         "--also-unstreamed")  # fmt: skip
    if not open_loop and (args.goodput_search or args.plot):
        raise SystemExit("--goodput-search and --plot need --request-rate or --capacity-fractions")
    if args.worker_cpus:
        worker_cpus = set(range(psutil.cpu_count())) - set(parse_cpu_list(args.worker_cpus))
        if not worker_cpus:
            raise SystemExit("--worker-cpus leaves no CPU for the client")
        os.sched_setaffinity(0, worker_cpus)
    if open_loop:
        run_open_loop(args)
        return
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


def run_open_loop(args: argparse.Namespace) -> None:
    """The engine row (unless --skip-engine), then the offline and open-loop service rows on one worker."""
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        rows = [] if args.skip_engine else [engine_row(args, workdir / "engine.json")]
        service, found = open_loop_rows(args, workdir)
    rows += service
    for r in rows:
        r["round"] = 1
    report(rows[: len(rows) - len(service) + 1], args)  # the engine and offline rows
    report_open_loop(service, found, args)
    if args.plot:
        plot_open_loop(service, args.plot, args)
    if args.json_out:
        config = {k: str(v) for k, v in vars(args).items()}
        args.json_out.write_text(json.dumps({"config": config, "results": rows, "goodput": found}, indent=2))


def replot(args: argparse.Namespace) -> None:
    """`--plot` from a saved open-loop run: its rows without the engine's, under its own settings."""
    if not args.plot:
        raise SystemExit("--replot needs --plot PNG")
    data = json.loads(args.replot.read_text())
    saved = data["config"]
    for key in ("model", "dtype", "device", "engine"):
        setattr(args, key, saved[key])
    args.ttft_slo_ms, args.tpot_slo_ms = float(saved["ttft_slo_ms"]), float(saved["tpot_slo_ms"])
    plot_open_loop([r for r in data["results"] if r["system"] != "engine"], args.plot, args)


def where(args: argparse.Namespace) -> str:
    return "echo engine" if args.engine == "echo" else f"{args.model} {args.dtype} on {args.device}"


def report(rows: list[dict[str, Any]], args: argparse.Namespace) -> None:
    print(f"\nW1 ({args.requests} requests), {where(args)}, round {rows[0]['round']}\n")
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
