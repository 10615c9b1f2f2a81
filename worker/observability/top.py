"""`python -m worker.top`: the workers at a glance, live in a terminal.

Reads the latest `worker_stats` record of each worker from `<prefix>:stats` (see `stats.py` for the
fields) and the consumer group (XINFO GROUPS: lag, pending; XINFO CONSUMERS: pending and idle time
per worker), and shows one row per worker and a total: requests/s, tokens/s, lag, pending,
running/waiting, KV use, prefix hit rate, step p50/p95, GPU utilisation and memory.

    python -m worker.top                      # refresh every 2 s until Ctrl-C
    python -m worker.top --once               # print one frame and exit
    python -m worker.top --redis-url redis://host:6379/0 --prefix llm --interval 5

Defaults: `REDIS_URL` (else the local address) and `LLM_PREFIX` (else `llm`), as the clients.
Workers whose latest record is older than `--max-age-s` are left out (stopped or unreachable).

The records are data, shown as such: every field is plain text (rich `Text`, never markup), with
control and format characters escaped (`\x1b`) and long values cut. Entries that cannot be read
(a field name or value that is not UTF-8, no `worker` field) are skipped and counted, as are
entries dated more than `FUTURE_ALLOWANCE_MS` (5 s of clock skew) ahead of the server's clock:
those are not read as records at all, so they neither show a worker that never stops being
current nor push real records out of the newest `SCAN_ENTRIES`. The counts are shown under
the table.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from dataclasses import dataclass, field

import redis
from rich.console import Console
from rich.live import Live
from rich.table import Table
from rich.text import Text

from producer.settings import ProducerSettings
from producer.wire.keys import CONSUMER_GROUP, StreamNames
from producer.wire.redis_factory import connect
from worker.observability.live_stats import FUTURE_ALLOWANCE_MS

SCAN_ENTRIES = 1000  # newest stats entries read per frame: enough for hundreds of workers
CELL_CHARS = 80  # a longer value is cut in its cell
MAX_READING = 1e15  # a larger (or non-finite) number in a record is no reading: shown as absent


def _text(value: object) -> str:
    """A name the server reports (group, consumer): shown even when not UTF-8."""
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _field(value: object) -> str:
    """A stats field name or value: UTF-8 text, else UnicodeDecodeError (the entry is skipped)."""
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def plain(value: str, limit: int = CELL_CHARS) -> Text:
    """`value` as the terminal is to show it: literally (no markup), control and format characters
    (escape sequences, bidi overrides) written as escapes, cut to `limit` characters."""
    shown = "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in value)
    return Text(shown if len(shown) <= limit else shown[: limit - 1] + "\u2026")


def _number(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        number = float(value)
    except ValueError:
        return None
    return number if math.isfinite(number) and abs(number) <= MAX_READING else None


@dataclass
class WorkerRow:
    """One worker's latest record, its age, and what the group says about it."""

    name: str
    age_s: float
    stats: dict[str, str]
    pending: int | None = None  # from XINFO CONSUMERS

    def num(self, name: str) -> float | None:
        return _number(self.stats.get(name))


@dataclass
class Frame:
    """Everything one screen shows."""

    rows: list[WorkerRow]
    lag: int | None = None
    pending: int | None = None
    consumers: int = 0
    taken_at: float = field(default_factory=time.time)
    unreadable: int = 0  # stats entries skipped: not UTF-8, or no worker named
    future: int = 0  # stats entries dated ahead of the server's clock (beyond the allowance)


@dataclass
class StatsScan:
    """The newest record of each worker, and what was skipped on the way."""

    rows: dict[str, WorkerRow]
    unreadable: int = 0
    future: int = 0


def latest_stats(client: redis.Redis, stream: str, now_ms: float, max_age_s: float) -> StatsScan:
    """Newest record per worker among the last `SCAN_ENTRIES` entries not dated ahead of `now_ms` (the
    server's clock) by more than `FUTURE_ALLOWANCE_MS`, no older than `max_age_s`."""
    limit = int(now_ms) + FUTURE_ALLOWANCE_MS
    scan = StatsScan({})
    scan.future = len(client.xrevrange(stream, "+", str(limit + 1), count=SCAN_ENTRIES) or [])
    for entry_id, raw in client.xrevrange(stream, str(limit), "-", count=SCAN_ENTRIES) or []:
        try:
            stats = {_field(k): _field(v) for k, v in (raw or {}).items()}
        except UnicodeDecodeError:
            scan.unreadable += 1
            continue
        name = stats.get("worker")
        if not name:
            scan.unreadable += 1
            continue
        if name in scan.rows:
            continue
        age_s = max(0.0, (now_ms - int(_text(entry_id).split("-")[0])) / 1000)
        if age_s <= max_age_s:
            scan.rows[name] = WorkerRow(name, age_s, stats)
    return scan


def read_frame(
    client: redis.Redis, names: StreamNames, group: str, max_age_s: float, streams: list[str] | None = None
) -> Frame:
    """The workers' latest records and their group's state, summed over `streams` (one per tenant;
    default: the names' request stream)."""
    seconds, micros = client.time()
    scan = latest_stats(client, names.stats, seconds * 1000 + micros / 1000, max_age_s)
    rows = scan.rows
    frame = Frame(sorted(rows.values(), key=lambda r: r.name), unreadable=scan.unreadable, future=scan.future)
    lags: list[int | None] = []
    for stream in streams or [names.requests]:
        try:
            groups = client.xinfo_groups(stream)
            consumers = client.xinfo_consumers(stream, group)
        except redis.ResponseError:  # no stream or no group yet
            continue
        for g in groups:
            if _text(g["name"]) == group:
                lags.append(None if g.get("lag") is None else int(g["lag"]))
                frame.pending = (frame.pending or 0) + int(g["pending"])
                frame.consumers = max(frame.consumers, int(g["consumers"]))
        for c in consumers:
            row = rows.get(_text(c["name"]))
            if row is not None:
                row.pending = (row.pending or 0) + int(c["pending"])
    if lags and None not in lags:
        frame.lag = sum(lag or 0 for lag in lags)
    return frame


# -- rendering ----------------------------------------------------------------------------------------
def _fmt(value: float | None, digits: int = 1, suffix: str = "") -> str:
    if value is None:
        return "-"
    return f"{value:,.{digits}f}{suffix}"


def _pct(part: float | None, whole: float | None) -> str:
    if part is None or not whole:
        return "-"
    return f"{100 * part / whole:.0f}%"


def _gib(value: float | None) -> str:
    return "-" if value is None else f"{value / 2**30:.1f}"


def _kv(row: WorkerRow) -> str:
    used, total = row.num("kv_blocks_used"), row.num("kv_blocks_total")
    if used is None or total is None:
        return "-"
    return f"{used:.0f}/{total:.0f} ({_pct(used, total)})"


def _gpu_mem(used: float | None, total: float | None) -> str:
    if used is None or total is None:
        return "-"
    return f"{_gib(used)}/{_gib(total)} GiB"


def _sum(rows: list[WorkerRow], name: str) -> float | None:
    values = [v for v in (r.num(name) for r in rows) if v is not None]
    return sum(values) if values else None


def _skipped(frame: Frame) -> Text | None:
    """The caption counting the stats entries not shown, if any."""
    parts = []
    if frame.unreadable:
        parts.append(f"{frame.unreadable} unreadable (not UTF-8, or no worker)")
    if frame.future:
        more = "+" if frame.future >= SCAN_ENTRIES else ""
        parts.append(f"{frame.future}{more} dated ahead of the server's clock")
    return Text("stats entries skipped: " + ", ".join(parts)) if parts else None


def render(frame: Frame, prefix: str) -> Table:
    table = Table(
        title=plain(
            f"llm workers  prefix={prefix}  lag={_fmt(frame.lag, 0)}  pending={_fmt(frame.pending, 0)}  "
            f"consumers={frame.consumers}  {time.strftime('%H:%M:%S', time.localtime(frame.taken_at))}",
            limit=400,
        ),
        title_justify="left",
        caption=_skipped(frame),
        caption_justify="left",
    )
    columns = ["worker", "age s", "req/s", "tok/s", "lag", "pending", "run/wait", "KV blocks",
               "prefix hit", "step p50 ms", "step p95 ms", "GPU util", "GPU mem"]  # fmt: skip
    for i, name in enumerate(columns):
        table.add_column(name, justify="left" if i == 0 else "right", no_wrap=True)
    for r in frame.rows:
        pending = r.pending if r.pending is not None else r.num("pending")
        _add_row(
            table, r.name, _fmt(r.age_s), _fmt(r.num("requests_per_s"), 2), _fmt(r.num("tokens_per_s"), 1),
            _fmt(r.num("lag"), 0), _fmt(pending, 0),
            f"{_fmt(r.num('running'), 0)}/{_fmt(r.num('waiting'), 0)}", _kv(r),
            _fmt(r.num("prefix_hit_rate"), 3), _fmt(r.num("step_p50_ms"), 2), _fmt(r.num("step_p95_ms"), 2),
            _fmt(r.num("gpu_util_pct"), 0, "%"),
            _gpu_mem(r.num("gpu_mem_used_bytes"), r.num("gpu_mem_total_bytes")),
        )  # fmt: skip
    rows = frame.rows
    if rows:
        hits = [h for h in (r.num("prefix_hit_rate") for r in rows) if h is not None]
        utils = [u for u in (r.num("gpu_util_pct") for r in rows) if u is not None]
        used, total = _sum(rows, "kv_blocks_used"), _sum(rows, "kv_blocks_total")
        table.add_section()
        _add_row(
            table, f"total ({len(rows)})", "", _fmt(_sum(rows, "requests_per_s"), 2),
            _fmt(_sum(rows, "tokens_per_s"), 1), _fmt(frame.lag, 0), _fmt(frame.pending, 0),
            f"{_fmt(_sum(rows, 'running'), 0)}/{_fmt(_sum(rows, 'waiting'), 0)}",
            "-" if used is None or total is None else f"{used:.0f}/{total:.0f} ({_pct(used, total)})",
            _fmt(sum(hits) / len(hits), 3) if hits else "-",
            _fmt(max((r.num("step_p50_ms") or 0.0) for r in rows), 2) + " max",
            _fmt(max((r.num("step_p95_ms") or 0.0) for r in rows), 2) + " max",
            _fmt(sum(utils) / len(utils), 0, "%") if utils else "-",
            _gpu_mem(_sum(rows, "gpu_mem_used_bytes"), _sum(rows, "gpu_mem_total_bytes")),
        )  # fmt: skip
    return table


def _add_row(table: Table, *cells: str) -> None:
    """One row, every cell plain text: a worker's name and fields are data, never markup."""
    table.add_row(*(plain(cell) for cell in cells))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m worker.top", description="Live view of the workers' stats.")
    p.add_argument("--redis-url", help="default: REDIS_URL, else redis://127.0.0.1:6379/0")
    p.add_argument("--prefix", help="key prefix (default: LLM_PREFIX, else llm)")
    p.add_argument("--group", default=CONSUMER_GROUP, help="consumer group (default: %(default)s)")
    p.add_argument(
        "--tenants",
        default=os.environ.get("LLM_TENANTS", ""),
        help="comma-separated tenants whose streams to sum (default: LLM_TENANTS, else the single stream)",
    )
    p.add_argument("--interval", type=float, default=2.0, help="seconds between refreshes (default: 2)")
    p.add_argument(
        "--max-age-s", type=float, default=60.0, help="hide workers silent this long (default: 60)"
    )
    p.add_argument("--once", action="store_true", help="print one frame and exit")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    settings = ProducerSettings()
    url = args.redis_url or settings.redis_url
    prefix = args.prefix or settings.prefix
    names = StreamNames.for_prefix(prefix)
    tenants: list[str | None] = [t.strip() for t in args.tenants.split(",") if t.strip()]
    # Tenants' streams, else the shards' (LLM_STREAM_SHARDS, LLM_REDIS_CLUSTER), else the single one.
    spaces = StreamNames.layout(prefix, tenants or [None], settings.stream_shards, settings.redis_cluster)
    streams = [n.requests for n in spaces]
    client = connect(url, settings.redis_cluster, socket_timeout=10, socket_connect_timeout=5)
    # Piped output (tests, `watch`, logs) gets a wide table instead of the 80-column default.
    console = Console(width=None if sys.stdout.isatty() else 200)

    def frame() -> Table:
        return render(read_frame(client, names, args.group, args.max_age_s, streams), prefix)

    try:
        if args.once:
            console.print(frame())
            return 0
        with Live(frame(), console=console, auto_refresh=False) as live:
            while True:
                time.sleep(args.interval)
                live.update(frame(), refresh=True)
    except KeyboardInterrupt:
        return 0
    except redis.RedisError as exc:
        console.print(Text.assemble(("Redis error:", "red"), " ", plain(f"{type(exc).__name__}: {exc}", 500)))
        return 1
    finally:
        client.close()


if __name__ == "__main__":
    sys.exit(main())
