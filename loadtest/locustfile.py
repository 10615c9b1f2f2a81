"""Locust load test over Redis, not HTTP: chat users that follow workload W1 of the design.

    REDIS_URL=redis://127.0.0.1:6379/0 locust -f loadtest/locustfile.py --headless -u 5 -r 5 -t 15s

Each task sends one streamed chat request with `ChatClient` (XADD to `<prefix>:requests`),
reads its reply stream, and reports one Locust request, `chat` (type `redis`): submit to the
final reply; its response length is the number of completion tokens. So Locust's request
count, RPS and failure ratio count chats, and nothing else.

Two latencies per chat are samples, not requests, and are kept apart (`LATENCIES`, Locust's
own `RequestStats`, so the same percentiles):

- `ttft`: submit to the first token event, as the caller sees it (queueing included);
- `tpot`: mean time per output token after the first (only for replies of 2+ tokens).

They are written next to Locust's report when the run ends: `<--csv prefix>_latency.csv`
(one row per sample name: count, median, 90/95/99th percentile, max, average, in ms) and a
table appended to the `--html` report; in a distributed run the workers send theirs to the
master with their stats (`report_to_master` / `worker_report`).

With `--llm-stream false` requests ask for the final reply only (`stream: false`) and only
`chat` is reported.

An `error` reply fails `chat` with the service's error code as the failure (`overloaded`,
`too_long`, ...), so Locust's failure table counts codes; a client timeout fails it with
`timeout`. Service-side timings (queue_ms, ttft_ms from XADD) are in the workers' logs.

Workload W1, reproducible from `--seed`: one system prompt of `--system-tokens` words shared
by every request (a prefix the engine caches), user turns log-uniform between
`--user-tokens-min` and `--user-tokens-max` words, `max_tokens` uniform in
[`--max-tokens-min`, `--max-tokens-max`], greedy decoding with a per-request seed. A word is
one token for the echo engine and about 1.3 for a BPE tokenizer. User k (in spawn order)
draws from its own generator seeded with (seed, k), so a rerun sends the same requests.

Redis comes from the environment, as for every client (`REDIS_URL`, `LLM_TENANT` for a
tenant's namespace, `LLM_REDIS_CLUSTER` and `LLM_STREAM_SHARDS` for a cluster and shards); the key
prefix from `--llm-prefix` or `LLM_PREFIX`. Every option below
also reads the variable named in its help.
`loadtest/run_locust.py` (`make loadtest`) runs this file headless against a local echo worker
and writes its CSV and HTML report.
"""

from __future__ import annotations

import csv
import html
import itertools
import math
import random
import time
from functools import lru_cache
from typing import Any

import gevent
from locust import User, between, events, task
from locust.env import Environment
from locust.runners import WorkerRunner
from locust.stats import CSV_STATS_INTERVAL_SEC, RequestStats, StatsEntry

from producer.client import ChatClient, ChatError, ChatTimeout, Reply

# A fixed vocabulary keeps prompts plain text in any tokenizer, with no rare-token effects.
_VOCABULARY = (
    "the a of to and in is it that for on with as was at by be this from or have an are not but "
    "what all were when we there can more if no out so said up its about into than them only other "
    "time new some could these two may first then do any like my now over such our man me even most "
    "made after also did many before must through back years where much your way well down should "
    "because each just those people how too little state good very make world still own see men work "
    "long get here between both life being under never day same another know while last might us great "
    "old year off come since against go came right used take three"
)
WORDS = tuple(_VOCABULARY.split())

_user_numbers = itertools.count()

# Latency samples of a chat, not requests: kept out of Locust's request stats.
LATENCY_SAMPLES = ("ttft", "tpot")
LATENCIES = RequestStats(use_response_times_cache=False)
PERCENTILES = (0.5, 0.9, 0.95, 0.99)
LATENCY_COLUMNS = ["Type", "Name", "Sample Count", "Median (ms)", "90% (ms)", "95% (ms)", "99% (ms)",
                   "Max (ms)", "Average (ms)"]  # fmt: skip


def latency_rows() -> list[list[str]]:
    """One row per latency sample name (`LATENCY_COLUMNS`), times in ms."""
    rows = []
    for entry in sorted(LATENCIES.entries.values(), key=lambda e: (e.method or "", e.name)):
        if not entry.num_requests:
            continue
        percentiles = [f"{entry.get_response_time_percentile(p):.0f}" for p in PERCENTILES]
        rows.append([entry.method or "", entry.name, str(entry.num_requests), *percentiles,
                     f"{entry.max_response_time:.0f}", f"{entry.avg_response_time:.1f}"])  # fmt: skip
    return rows


def latency_html(rows: list[list[str]]) -> str:
    """The latency table as a section of Locust's HTML report (plain HTML, after its app)."""
    head = "".join(f"<th style='padding:2px 10px'>{html.escape(c)}</th>" for c in LATENCY_COLUMNS)
    body = "".join(
        "<tr>" + "".join(f"<td style='padding:2px 10px'>{html.escape(c)}</td>" for c in row) + "</tr>"
        for row in rows
    )
    return (
        "<section id='llm-latency' style='font-family:sans-serif;margin:24px'>"
        "<h2>Latency samples (not requests)</h2><p>Time to first token (ttft) and per output token after "
        "the first (tpot), one sample per streamed chat, and the other timings of a chat; the request "
        "statistics above count chats only.</p>"
        f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></section>"
    )


@events.report_to_master.add_listener
def _send_latencies(client_id: str, data: dict[str, Any], **_: Any) -> None:
    """A distributed worker's samples since its last report, to the master (then cleared here)."""
    data["llm_latency"] = [e.serialize() for e in LATENCIES.entries.values() if e.num_requests]
    LATENCIES.clear_all()


@events.worker_report.add_listener
def _take_latencies(client_id: str, data: dict[str, Any], **_: Any) -> None:
    for serialized in data.get("llm_latency", []):
        entry = StatsEntry.unserialize(serialized, LATENCIES)
        LATENCIES.get(entry.name, entry.method or "").extend(entry)


@events.quit.add_listener
def _write_latencies(exit_code: int, **_: Any) -> None:
    """At the end of a run: `<csv prefix>_latency.csv`, and the table appended to the HTML report."""
    environment = _environment[0] if _environment else None
    if environment is None or isinstance(environment.runner, WorkerRunner):
        return
    options, rows = environment.parsed_options, latency_rows()
    if getattr(options, "csv_prefix", None):
        with open(f"{options.csv_prefix}_latency.csv", "w", newline="") as f:
            csv.writer(f).writerows([LATENCY_COLUMNS, *rows])
    html_file = getattr(options, "html_file", None)
    if html_file:
        try:
            with open(html_file, encoding="utf-8") as f:
                report = f.read()
        except FileNotFoundError:
            return
        at = report.rfind("</body>")
        at = at if at >= 0 else len(report)
        with open(html_file, "w", encoding="utf-8") as f:
            f.write(report[:at] + latency_html(rows) + report[at:])


@events.test_stop.add_listener
def _let_the_csv_catch_up(environment: Environment, **_: Any) -> None:
    """Locust's CSV writer runs once a second until shutdown, which follows the users' stop within
    a fraction of one: the chats that ended while the users stopped would be missing from
    `<csv prefix>_stats.csv` (not from the HTML report or the printed stats). One more write."""
    if getattr(environment.parsed_options, "csv_prefix", None) and not isinstance(
        environment.runner, WorkerRunner
    ):
        gevent.sleep(CSV_STATS_INTERVAL_SEC + 0.2)


_environment: list[Environment] = []


@events.init.add_listener
def _keep_environment(environment: Environment, **_: Any) -> None:
    _environment[:] = [environment]


def _flag(value: str | bool) -> bool:
    """A true/false option value (command line or environment)."""
    if isinstance(value, bool):
        return value
    if value.lower() in ("1", "true", "yes", "on"):
        return True
    if value.lower() in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"not true/false: {value!r}")


@events.init_command_line_parser.add_listener
def _add_options(parser: Any) -> None:
    group = parser.add_argument_group("llm-stream-serve workload (W1)")
    group.add_argument(
        "--seed", type=int, default=0, env_var="LOADTEST_SEED", help="Workload seed (LOADTEST_SEED)."
    )
    group.add_argument(
        "--system-tokens",
        type=int,
        default=256,
        env_var="LOADTEST_SYSTEM_TOKENS",
        help="Words of the shared system prompt (LOADTEST_SYSTEM_TOKENS).",
    )
    group.add_argument(
        "--user-tokens-min",
        type=int,
        default=16,
        env_var="LOADTEST_USER_TOKENS_MIN",
        help="Shortest user turn, words (LOADTEST_USER_TOKENS_MIN).",
    )
    group.add_argument(
        "--user-tokens-max",
        type=int,
        default=512,
        env_var="LOADTEST_USER_TOKENS_MAX",
        help="Longest user turn, words (LOADTEST_USER_TOKENS_MAX).",
    )
    group.add_argument(
        "--max-tokens-min",
        type=int,
        default=32,
        env_var="LOADTEST_MAX_TOKENS_MIN",
        help="Smallest max_tokens (LOADTEST_MAX_TOKENS_MIN).",
    )
    group.add_argument(
        "--max-tokens-max",
        type=int,
        default=256,
        env_var="LOADTEST_MAX_TOKENS_MAX",
        help="Largest max_tokens (LOADTEST_MAX_TOKENS_MAX).",
    )
    group.add_argument(
        "--priority",
        choices=["interactive", "batch"],
        default="interactive",
        env_var="LOADTEST_PRIORITY",
        help="Request priority (LOADTEST_PRIORITY).",
    )
    group.add_argument(
        "--request-timeout-s",
        type=float,
        default=120.0,
        env_var="LOADTEST_REQUEST_TIMEOUT_S",
        help="Client wait for a final reply (LOADTEST_REQUEST_TIMEOUT_S).",
    )
    group.add_argument(
        "--llm-prefix",
        default=None,
        env_var="LLM_PREFIX",
        help="Key prefix of the service's streams (LLM_PREFIX; default llm).",
    )
    group.add_argument(
        "--llm-max-tokens",
        type=int,
        default=None,
        env_var="LOADTEST_LLM_MAX_TOKENS",
        help="max_tokens of every request, instead of the uniform --max-tokens-min/max draw "
        "(LOADTEST_LLM_MAX_TOKENS).",
    )
    group.add_argument(
        "--llm-stream",
        type=_flag,
        default=True,
        metavar="true|false",
        env_var="LOADTEST_LLM_STREAM",
        help="Stream tokens (ttft, tpot and chat) or ask for the final reply only (chat); "
        "default true (LOADTEST_LLM_STREAM).",
    )


def words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


@lru_cache(maxsize=4)
def system_prompt(seed: int, n_words: int) -> str:
    """The system prompt every request shares, the same for every user of a run."""
    return words(random.Random(f"system:{seed}"), n_words)


class ChatWorkload:
    """The W1 request sequence of one user: a plain generator over plain data."""

    def __init__(self, options: Any, user_number: int):
        self.options = options
        self.rng = random.Random(f"user:{options.seed}:{user_number}")
        self.system = system_prompt(options.seed, options.system_tokens)

    def next_request(self) -> dict[str, Any]:
        o = self.options
        lo, hi = math.log(o.user_tokens_min), math.log(o.user_tokens_max)
        user_words = round(math.exp(self.rng.uniform(lo, hi)))
        max_tokens = self.rng.randint(o.max_tokens_min, o.max_tokens_max)  # drawn either way: same requests
        return {
            "messages": [
                {"role": "system", "content": self.system},
                {"role": "user", "content": words(self.rng, user_words)},
            ],
            "max_tokens": o.llm_max_tokens or max_tokens,
            "temperature": 0.0,
            "seed": self.rng.randrange(2**31),
            "priority": o.priority,
            "stream": o.llm_stream,
        }


class ServiceError(Exception):
    """A failed chat, named by its stable code only, so Locust groups failures by code."""

    def __init__(self, code: str):
        super().__init__(code)


class ChatSlot:
    """What the Redis user here and the HTTP user (`locustfile_openai.py`) share: one user's slice of
    W1 and its options, and the events it reports (`request_type` tells the two apart)."""

    request_type = "redis"
    environment: Environment

    def join_workload(self, environment: Environment) -> Any:
        """Take this user's request sequence and options; the parsed options."""
        options = environment.parsed_options
        assert options is not None, "run through the locust command line"
        self.workload = ChatWorkload(options, next(_user_numbers))
        self.timeout_s: float = options.request_timeout_s
        self.stream: bool = options.llm_stream
        return options

    def _fire(self, name: str, ms: float, length: int = 0, exception: Exception | None = None) -> None:
        """Report a request (`chat`), or a latency sample (`LATENCY_SAMPLES`), which is no request."""
        if name in LATENCY_SAMPLES and exception is None:
            LATENCIES.log_request(self.request_type, name, round(ms), length)
            return
        self.environment.events.request.fire(
            request_type=self.request_type, name=name, response_time=ms, response_length=length,
            exception=exception, context={},
        )  # fmt: skip

    def _fire_done(self, start: float, first_token_at: float | None, tokens: int) -> None:
        """`tpot` (replies of 2+ tokens after a first token) and `chat`, for a chat that ended well."""
        end = time.perf_counter()
        if first_token_at is not None and tokens > 1:
            self._fire("tpot", (end - first_token_at) * 1000 / (tokens - 1))
        self._fire("chat", (end - start) * 1000, length=tokens)


class ChatUser(ChatSlot, User):
    """One chatbot conversation slot: send a request, stream the reply, think, repeat."""

    wait_time = between(0.1, 1.0)

    def __init__(self, environment: Environment):
        super().__init__(environment)
        options = self.join_workload(environment)
        # REDIS_URL from the environment (ProducerSettings); the prefix from --llm-prefix or LLM_PREFIX.
        prefix = {"prefix": options.llm_prefix} if options.llm_prefix else {}
        self.client = ChatClient(timeout_s=self.timeout_s, **prefix)

    def on_stop(self) -> None:
        self.client.close()

    @task
    def chat(self) -> None:
        request = self.workload.next_request()
        messages = request.pop("messages")
        start = time.perf_counter()
        first_token_at: float | None = None
        reply: Reply | None = None
        try:
            if self.stream:
                stream = self.client.stream(messages, timeout_s=self.timeout_s, **request)
                for _ in stream:
                    if first_token_at is None:
                        first_token_at = time.perf_counter()
                        self._fire("ttft", (first_token_at - start) * 1000)
                reply = stream.reply
            else:
                reply = self.client.chat(messages, timeout_s=self.timeout_s, **request)
        except ChatError as exc:
            self._fire("chat", (time.perf_counter() - start) * 1000, exception=ServiceError(exc.code.value))
            return
        except ChatTimeout:
            self._fire("chat", (time.perf_counter() - start) * 1000, exception=ServiceError("timeout"))
            return
        if reply is None:
            self._fire("chat", (time.perf_counter() - start) * 1000, exception=ServiceError("no_final_reply"))
            return
        self._fire_done(start, first_token_at, reply.usage.completion_tokens)
