"""The OpenAI-compatible gateway against the client library: the same requests, in the same run.

Each round starts one stack on a fresh prefix: echo workers (`python -m worker --engine echo`) and one
gateway process (`python -m producer.gateway`), on the Redis of REDIS_URL (else a private server).
Then this process sends the same requests twice, alternating which path goes first each round:

  direct   `AsyncChatClient` (the client library over Redis, as a Python chatbot would use it);
  gateway  HTTP to the gateway (aiohttp, one keep-alive connection per concurrent caller), which
           sends them with the same library.

Two cases, each with its own stack:

  nonstream  `--concurrency` callers in a closed loop, `--requests` chat completions in all, no
             streaming, echo workers at full speed: requests/s, latency p50/p99, and the CPU time
             the gateway process spent per request (psutil). On a machine with fewer cores than
             busy processes the gateway shares its core, so `1e6 / cpu µs per request` (what one
             fully busy core would serve) is printed beside the measured rate.
  stream     `--streams` concurrent streamed requests in a closed loop for `--duration-s` seconds,
             each streaming `--stream-words` tokens from an echo worker paced at `--token-delay-ms`
             per step (so the worker, not the CPU, sets the pace): time to first token p50/p99 of
             each path, and what the gateway adds (gateway minus direct, at p50 and at p99). Direct
             TTFT runs from the call to the first token event; the gateway's from the POST to the
             first content chunk of the server-sent events.

    python loadtest/gateway_bench.py --rounds 3 --json-out docs/bench/cpu_gateway.json

Goals (issue: the gateway): one gateway process >= 1,500 non-streamed chat completions/s, and
<= 2 ms p50 added TTFT with 100 concurrent streams.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import aiohttp  # noqa: E402
import httpx  # noqa: E402
import psutil  # noqa: E402
import uvloop  # noqa: E402

from producer.client import AsyncChatClient  # noqa: E402
from producer.wire.models import TokenEvent  # noqa: E402
from worker.local_redis.server import EmbeddedRedis, free_port  # noqa: E402

MODEL = "echo"


def _words(n: int) -> str:
    return " ".join(f"w{i}" for i in range(n))


@dataclass
class Stack:
    """Echo workers and one gateway serving `prefix`; their CPU time read with psutil."""

    url: str
    prefix: str
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    gateway: subprocess.Popen[bytes] | None = None
    base: str = ""
    log_dir: Path | None = None

    def start(self, workers: int, token_delay_ms: float, gateway_env: dict[str, str]) -> Stack:
        env = {k: v for k, v in os.environ.items() if not k.startswith("LLM_")}
        env.update(REDIS_URL=self.url, LLM_PREFIX=self.prefix, LLM_LOG_LEVEL="warning", PYTHONUNBUFFERED="1")
        worker_env = {
            **env,
            "LLM_ENGINE": "echo",
            "LLM_MAX_NUM_SEQS": "256",
            "LLM_MAX_WAIT_MS": "0",
            "LLM_ECHO_TOKEN_DELAY_MS": str(token_delay_ms),
            "LLM_STATS_INTERVAL_S": "0.5",
        }
        for i in range(workers):
            self.procs.append(
                subprocess.Popen(
                    [sys.executable, "-m", "worker"],
                    cwd=ROOT,
                    stdout=subprocess.DEVNULL,
                    env={**worker_env, "LLM_CONSUMER_NAME": f"bench-{i}"},
                )
            )
        port = free_port()
        self.base = f"http://127.0.0.1:{port}"
        log_path = self.log_dir / f"{self.prefix}.gateway.log" if self.log_dir else Path(os.devnull)
        with open(log_path, "wb") as log:
            self.gateway = subprocess.Popen(
                [sys.executable, "-m", "producer.gateway", "--port", str(port)],
                cwd=ROOT,
                stdout=log,
                env={
                    **env,
                    "LLM_GATEWAY_DEFAULT_MODEL": MODEL,
                    "LLM_GATEWAY_STATS_REFRESH_S": "0.5",
                    **gateway_env,
                },
            )
        self._wait_ready()
        return self

    def _wait_ready(self, timeout_s: float = 120.0) -> None:
        """Until the gateway answers /ready with every worker live (their first stats are in)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for p in [*self.procs, self.gateway]:
                if p is not None and p.poll() is not None:
                    raise RuntimeError(f"{p.args} exited with {p.returncode}")
            try:
                got = httpx.get(f"{self.base}/ready", timeout=2)
                if got.status_code == 200 and got.json()["workers"] >= len(self.procs):
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise TimeoutError("the gateway did not become ready")

    def cpu_s(self) -> dict[str, float]:
        """CPU seconds so far of the gateway, the workers (summed) and this process."""

        def of(pid: int) -> float:
            t = psutil.Process(pid).cpu_times()
            return float(t.user + t.system)

        assert self.gateway is not None
        return {
            "gateway": of(self.gateway.pid),
            "workers": sum(of(p.pid) for p in self.procs),
            "client": of(os.getpid()),
        }

    def stop(self) -> None:
        for p in [self.gateway, *self.procs]:
            if p is not None and p.poll() is None:
                p.terminate()
        for p in [self.gateway, *self.procs]:
            if p is not None:
                try:
                    p.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    p.kill()


def _setting(text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not name.startswith("LLM_"):
        raise argparse.ArgumentTypeError(f"{text!r}: LLM_NAME=VALUE expected")
    return name, value


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def _closed_loop(callers: int, one: Callable[[], Awaitable[float]], *, warmup: int = 0,
                       total: int | None = None, duration_s: float | None = None,
                       stagger_s: float = 0.0) -> tuple[list[float], float]:  # fmt: skip
    """`callers` tasks each calling `one()` (which returns its measured ms) over and over, the i-th
    starting after `stagger_s * i / callers`; the first `warmup` calls are not measured (connections,
    scripts, the start), then `total` calls, or those started within `duration_s`, are. The
    measurements and their seconds."""
    started = 0
    out: list[float] = []
    t0 = stop_at = 0.0
    measuring = asyncio.Event()

    def more() -> bool:
        if total is not None:
            return started < warmup + total
        return not measuring.is_set() or time.perf_counter() < stop_at

    async def caller(i: int) -> None:
        nonlocal started, t0, stop_at
        await asyncio.sleep(stagger_s * i / callers)
        while more():
            started += 1
            measured = started > warmup
            if started == warmup + 1:
                t0 = time.perf_counter()
                stop_at = t0 + (duration_s or 0.0)
                measuring.set()
            ms = await one()
            if measured:
                out.append(ms)

    await asyncio.gather(*(caller(i) for i in range(callers)))
    return out, time.perf_counter() - t0


async def direct_nonstream(stack: Stack, total: int, callers: int, prompt: str) -> tuple[list[float], float]:
    client = AsyncChatClient(stack.url, prefix=stack.prefix, timeout_s=60)
    messages = [{"role": "user", "content": prompt}]

    async def one() -> float:
        t0 = time.perf_counter()
        reply = await client.chat(messages, max_tokens=16, stream=False)
        assert reply.text
        return (time.perf_counter() - t0) * 1000

    try:
        return await _closed_loop(callers, one, warmup=callers * 4, total=total)
    finally:
        await client.aclose()


async def gateway_nonstream(stack: Stack, total: int, callers: int, prompt: str) -> tuple[list[float], float]:
    body = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": prompt}], "max_tokens": 16})
    headers = {"Content-Type": "application/json"}
    url = f"{stack.base}/v1/chat/completions"
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=callers)) as session:

        async def one() -> float:
            t0 = time.perf_counter()
            async with session.post(url, data=body, headers=headers) as resp:
                got = await resp.read()
                if resp.status != 200:
                    raise RuntimeError(f"HTTP {resp.status}: {got[:300]!r}")
            return (time.perf_counter() - t0) * 1000

        return await _closed_loop(callers, one, warmup=callers * 4, total=total)


def _lengths(words: int) -> Iterator[int]:
    """Each stream's length, from words/2 to words (the same sequence for both paths): streams of one
    length that start together would end together, and the callers would arrive in bursts forever."""
    rng = random.Random(0)
    while True:
        yield rng.randint(max(1, words // 2), words)


async def direct_stream(
    stack: Stack, streams: int, duration_s: float, words: int, step_s: float
) -> tuple[list[float], float]:
    client = AsyncChatClient(stack.url, prefix=stack.prefix, timeout_s=60)
    messages = [{"role": "user", "content": _words(words)}]
    lengths = _lengths(words)

    async def one() -> float:
        t0 = time.perf_counter()
        ttft = None
        async for event in client.stream(messages, max_tokens=next(lengths)):
            if ttft is None and isinstance(event, TokenEvent) and event.text:
                ttft = (time.perf_counter() - t0) * 1000
        assert ttft is not None
        return ttft

    try:
        return await _closed_loop(
            streams, one, warmup=streams * 3, duration_s=duration_s, stagger_s=step_s * words
        )
    finally:
        await client.aclose()


async def gateway_stream(
    stack: Stack, streams: int, duration_s: float, words: int, step_s: float
) -> tuple[list[float], float]:
    messages = [{"role": "user", "content": _words(words)}]
    headers = {"Content-Type": "application/json"}
    url = f"{stack.base}/v1/chat/completions"
    lengths = _lengths(words)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=streams)) as session:

        async def one() -> float:
            body = json.dumps(
                {"model": MODEL, "messages": messages, "max_tokens": next(lengths), "stream": True}
            )
            t0 = time.perf_counter()
            ttft = None
            async with session.post(url, data=body, headers=headers) as resp:
                if resp.status != 200:
                    raise RuntimeError(f"HTTP {resp.status}: {(await resp.read())[:300]!r}")
                async for line in resp.content:
                    if ttft is None and line.startswith(b"data: {"):
                        choice = json.loads(line[6:])["choices"][0]
                        if choice["delta"].get("content"):
                            ttft = (time.perf_counter() - t0) * 1000
                    elif line.startswith(b"data: [DONE]"):
                        break
            assert ttft is not None
            return ttft

        return await _closed_loop(
            streams, one, warmup=streams * 3, duration_s=duration_s, stagger_s=step_s * words
        )


Runner = Callable[[Stack], Awaitable[tuple[list[float], float]]]


def run_case(url: str, args: argparse.Namespace, token_delay_ms: float, paths: dict[str, Runner],
             order: list[str]) -> dict[str, dict[str, Any]]:  # fmt: skip
    """One stack; each path in `order` run once on it; per path its measurements and CPU seconds."""
    stack = Stack(url, f"gwbench-{uuid.uuid4().hex[:6]}", log_dir=args.log_dir).start(
        args.workers, token_delay_ms, dict(args.gateway_env)
    )
    out: dict[str, dict[str, Any]] = {}
    try:
        for name in order:
            cpu0 = stack.cpu_s()
            values, elapsed = uvloop.run(paths[name](stack))
            cpu1 = stack.cpu_s()
            out[name] = {
                "values_ms": values,
                "seconds": elapsed,
                "cpu_s": {k: cpu1[k] - cpu0[k] for k in cpu0},
            }
    finally:
        stack.stop()
    return out


def summarise_nonstream(run: dict[str, Any]) -> dict[str, float]:
    n = len(run["values_ms"])
    return {
        "requests": n,
        "req_per_s": n / run["seconds"],
        "p50_ms": _pct(run["values_ms"], 0.50),
        "p99_ms": _pct(run["values_ms"], 0.99),
        "gateway_cpu_us_per_req": run["cpu_s"]["gateway"] / n * 1e6,
        "worker_cpu_us_per_req": run["cpu_s"]["workers"] / n * 1e6,
        "client_cpu_us_per_req": run["cpu_s"]["client"] / n * 1e6,
    }


def summarise_stream(run: dict[str, Any]) -> dict[str, float]:
    n = len(run["values_ms"])
    return {
        "requests": n,
        "req_per_s": n / run["seconds"],
        "ttft_p50_ms": _pct(run["values_ms"], 0.50),
        "ttft_p99_ms": _pct(run["values_ms"], 0.99),
        "gateway_cpu_share": run["cpu_s"]["gateway"] / run["seconds"],
        "client_cpu_share": run["cpu_s"]["client"] / run["seconds"],
        "worker_cpu_share": run["cpu_s"]["workers"] / run["seconds"],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3, help="stacks per case; the order of the paths alternates")
    p.add_argument("--workers", type=int, default=1, help="echo workers behind the gateway")
    p.add_argument("--requests", type=int, default=6000, help="nonstream: requests per path per round")
    p.add_argument("--concurrency", type=int, default=64, help="nonstream: concurrent callers")
    p.add_argument("--streams", type=int, default=100, help="stream: concurrent streams")
    p.add_argument("--duration-s", type=float, default=10.0, help="stream: seconds per path per round")
    p.add_argument(
        "--stream-words", type=int, default=32, help="stream: most tokens a stream gets (half to all)"
    )
    p.add_argument("--token-delay-ms", type=float, default=20.0, help="stream: the echo worker's step pace")
    p.add_argument("--cases", nargs="+", choices=["nonstream", "stream"], default=["nonstream", "stream"])
    p.add_argument("--gateway-env", nargs="*", type=_setting, default=[], metavar="LLM_GATEWAY_X=V",
                   help="settings of the gateway process (a sweep)")  # fmt: skip
    p.add_argument("--log-dir", type=Path, help="write each gateway's JSON log lines there")
    p.add_argument("--json-out", type=Path)
    args = p.parse_args()

    short, step_s = _words(6), args.token_delay_ms / 1000
    nonstream: dict[str, Runner] = {
        "direct": lambda s: direct_nonstream(s, args.requests, args.concurrency, short),
        "gateway": lambda s: gateway_nonstream(s, args.requests, args.concurrency, short),
    }
    stream: dict[str, Runner] = {
        "direct": lambda s: direct_stream(s, args.streams, args.duration_s, args.stream_words, step_s),
        "gateway": lambda s: gateway_stream(s, args.streams, args.duration_s, args.stream_words, step_s),
    }
    rounds: dict[str, list[dict[str, dict[str, float]]]] = {"nonstream": [], "stream": []}
    with ExitStack() as stack:
        url = os.environ.get("REDIS_URL") or stack.enter_context(EmbeddedRedis()).url
        for r in range(args.rounds):
            order = ["direct", "gateway"] if r % 2 == 0 else ["gateway", "direct"]
            if "nonstream" in args.cases:
                got = run_case(url, args, 0.0, nonstream, order)
                rounds["nonstream"].append({k: summarise_nonstream(v) for k, v in got.items()})
            if "stream" in args.cases:
                got = run_case(url, args, args.token_delay_ms, stream, order)
                rounds["stream"].append({k: summarise_stream(v) for k, v in got.items()})

    def median(case: str, path: str, key: str) -> float:
        return statistics.median(r[path][key] for r in rounds[case])

    print(f"\ngateway vs client library, {platform.machine()}, {os.cpu_count()} cores, {args.workers} echo "
          f"worker(s), medians of {args.rounds} rounds")  # fmt: skip
    summary: dict[str, Any] = {}
    if rounds["nonstream"]:
        print(f"\nnon-streamed, {args.concurrency} concurrent callers, {args.requests} requests per path")
        print(f"{'path':<8} {'req/s':>7} {'p50 ms':>7} {'p99 ms':>7} {'gateway cpu µs/req':>19} "
              f"{'one-core ceiling req/s':>23}")  # fmt: skip
        for path in ("direct", "gateway"):
            cpu = median("nonstream", path, "gateway_cpu_us_per_req")
            ceiling = f"{1e6 / cpu:>23.0f}" if path == "gateway" else f"{'':>23}"
            print(f"{path:<8} {median('nonstream', path, 'req_per_s'):>7.0f} "
                  f"{median('nonstream', path, 'p50_ms'):>7.1f} {median('nonstream', path, 'p99_ms'):>7.1f} "
                  f"{cpu if path == 'gateway' else 0:>19.0f} {ceiling}")  # fmt: skip
        gw_cpu = median("nonstream", "gateway", "gateway_cpu_us_per_req")
        summary["nonstream"] = {
            "gateway_req_per_s": median("nonstream", "gateway", "req_per_s"),
            "direct_req_per_s": median("nonstream", "direct", "req_per_s"),
            "gateway_cpu_us_per_req": gw_cpu,
            "gateway_one_core_ceiling_req_per_s": 1e6 / gw_cpu,
        }
    if rounds["stream"]:
        print(f"\nstreamed, {args.streams} concurrent streams of {args.stream_words} tokens, echo step "
              f"{args.token_delay_ms:g} ms, {args.duration_s:g} s per path per round")  # fmt: skip
        print(f"{'path':<8} {'req/s':>7} {'TTFT p50 ms':>12} {'TTFT p99 ms':>12} {'cpu: gateway':>13} "
              f"{'worker':>7} {'client':>7}")  # fmt: skip
        for path in ("direct", "gateway"):
            print(f"{path:<8} {median('stream', path, 'req_per_s'):>7.0f} "
                  f"{median('stream', path, 'ttft_p50_ms'):>12.2f} "
                  f"{median('stream', path, 'ttft_p99_ms'):>12.2f} "
                  f"{median('stream', path, 'gateway_cpu_share'):>13.0%} "
                  f"{median('stream', path, 'worker_cpu_share'):>7.0%} "
                  f"{median('stream', path, 'client_cpu_share'):>7.0%}")  # fmt: skip
        added = [r["gateway"]["ttft_p50_ms"] - r["direct"]["ttft_p50_ms"] for r in rounds["stream"]]
        added99 = [r["gateway"]["ttft_p99_ms"] - r["direct"]["ttft_p99_ms"] for r in rounds["stream"]]
        print(f"added by the gateway: p50 {statistics.median(added):+.2f} ms, "
              f"p99 {statistics.median(added99):+.2f} ms "
              f"(per round: p50 {', '.join(f'{a:+.2f}' for a in added)})")  # fmt: skip
        summary["stream"] = {"added_ttft_p50_ms": statistics.median(added),
                             "added_ttft_p99_ms": statistics.median(added99)}  # fmt: skip
    if args.json_out:
        out = {"machine": platform.machine(), "cores": os.cpu_count(), "summary": summary,
               "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
               "rounds": rounds}  # fmt: skip
        args.json_out.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
