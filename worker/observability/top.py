"""`python -m worker.top`: the workers at a glance, live in a terminal.

Reads the latest `worker_stats` record of each worker from `<prefix>:stats` (see `stats.py` for the
fields) and the consumer group's state on the request streams, and shows one row per worker and a
total: requests/s, tokens/s, pending, running/waiting, KV use, prefix hit rate, owned shards (with
shard ownership, `worker/loop/shard_ownership.py`), step p50/p95, GPU utilisation and memory.

    python -m worker.top                      # refresh every 2 s until Ctrl-C
    python -m worker.top --once               # print one frame and exit
    python -m worker.top --redis-url redis://host:6379/0 --prefix llm --interval 5

Defaults: `REDIS_URL` (else the local address) and `LLM_PREFIX` (else `llm`), as the clients.
Workers whose latest record is older than `--max-age-s` are left out (stopped or unreachable).

The queue numbers are read live, every frame, from the server, never from the workers' records
(which are up to `LLM_STATS_INTERVAL_S` old and repeat the whole group's numbers in every row):

- `lag`: entries of the request streams no worker has read yet (XINFO GROUPS `lag`, summed over
  the streams). The server counts it from `entries-read`; after entries are deleted (XDEL, or a
  trim past an unread entry) or when the group was created at `$` it may not know the count, and
  then lag is shown as `?` (unknown), never as 0. A trim that removes unread entries (the workers'
  own trimming never does; `XTRIM MAXLEN` by hand may) leaves the server counting them: lag is
  capped at the stream's length.
- `pending`: entries a worker has read and not yet acknowledged (XINFO GROUPS `pending`): the
  requests it runs, has waiting in its queue, or holds while it is dead and not yet reclaimed.
  Workers read eagerly (up to `LLM_READ_COUNT` a call, while they have room), so under load the
  queue shows up here, not in `lag`. A worker's row shows its own pending (XINFO CONSUMERS); what
  consumers without a current record hold is counted under the table; the total is the group's.
- `backlog` = lag + pending: what the producers' admission limit counts (`producer/wire/backlog.py`).
- `oldest`: age of the oldest pending entry (XPENDING), by its id's time.

The table fits the terminal: at 80 columns the low-priority columns (owned shards, GPU memory, step
p50, prefix hit, age, ...) go first and the KV column shows its percentage only; the worker name, requests/s,
tokens/s and pending always stay, and a name too long for its column is cut in the middle, so
the pod's distinguishing suffix stays visible.

A frame with no worker says why: no stats stream under the prefix (and, when no request stream is
there either, the prefixes that have one, from a bounded SCAN), or no record newer than
`--max-age-s`.

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
import difflib
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import redis
from rich import box
from rich.cells import cell_len
from rich.console import Console, ConsoleOptions, RenderResult
from rich.live import Live
from rich.measure import Measurement
from rich.table import Table
from rich.text import Text

from producer.settings import ProducerSettings
from producer.wire.keys import CONSUMER_GROUP, StreamNames
from producer.wire.redis_factory import connect
from worker.observability.live_stats import FUTURE_ALLOWANCE_MS

SCAN_ENTRIES = 1000  # newest stats entries read per frame: enough for hundreds of workers
CELL_CHARS = 80  # a longer value is cut in its cell
MAX_READING = 1e15  # a larger (or non-finite) number in a record is no reading: shown as absent
HINT_SCAN_CALLS = 10  # SCAN calls (of HINT_SCAN_COUNT keys each) looking for other prefixes' stats
HINT_SCAN_COUNT = 1000
HINT_PREFIXES = 8  # prefixes named in the hint
NAME_MIN_CHARS = 16  # a worker's name is cut no shorter than this (a pod name's suffix stays)


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


def middle_cut(value: str, limit: int) -> str:
    """`value` cut to `limit` terminal cells in the middle (`llm-wor…9f-x2k4z`): both ends stay."""
    if cell_len(value) <= limit:
        return value
    room = max(0, limit - 1)
    head, tail = "", ""
    for c in value:  # the head takes half the room, the tail the rest
        if cell_len(head + c) > room // 2:
            break
        head += c
    for c in reversed(value):
        if cell_len(tail + c) > room - cell_len(head):
            break
        tail = c + tail
    return head + "\u2026" + tail


def _number(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        number = float(value)
    except ValueError:
        return None
    return number if math.isfinite(number) and abs(number) <= MAX_READING else None


def _id_ms(entry_id: object) -> int:
    return int(_text(entry_id).split("-")[0])


@dataclass
class WorkerRow:
    """One worker's latest record, its age, and what the group says about it."""

    name: str
    age_s: float
    stats: dict[str, str]
    pending: int | None = None  # its own pending entries (XINFO CONSUMERS); None: not a consumer

    def num(self, name: str) -> float | None:
        return _number(self.stats.get(name))


@dataclass
class Frame:
    """Everything one screen shows. `lag`, `pending` and `oldest_pending_s` are the group's, read live
    and summed over the request streams (see the module's doc); None where no stream has the group,
    and `lag` also where the server does not know it for one of them."""

    rows: list[WorkerRow]
    lag: int | None = None
    pending: int | None = None
    consumers: int = 0
    taken_at: float = field(default_factory=time.time)
    unreadable: int = 0  # stats entries skipped: not UTF-8, or no worker named
    future: int = 0  # stats entries dated ahead of the server's clock (beyond the allowance)
    streams: int = 0  # request streams that exist
    groups: int = 0  # of those, the ones with the group
    oldest_pending_s: float | None = None
    stats_found: bool = True  # whether `<prefix>:stats` exists
    prefixes: list[str] | None = None  # prefixes with a stats stream, the likeliest first; None: not looked
    prefixes_complete: bool = True  # the SCAN for them went through the whole keyspace

    @property
    def backlog(self) -> int | None:
        """lag + pending, where both are known."""
        return None if self.lag is None or self.pending is None else self.lag + self.pending

    @property
    def other_pending(self) -> int:
        """Pending entries held by consumers that have no row (stopped workers, not yet reclaimed)."""
        return max(0, (self.pending or 0) - sum(r.pending or 0 for r in self.rows))


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
        age_s = max(0.0, (now_ms - _id_ms(entry_id)) / 1000)
        if age_s <= max_age_s:
            scan.rows[name] = WorkerRow(name, age_s, stats)
    return scan


def _group_state(client: redis.Redis, stream: str, group: str, frame: Frame, now_ms: float) -> int | None:
    """Add `group`'s state on `stream` to `frame` (pending, consumers, oldest pending, each row's own
    pending); returns the stream's lag (None: unknown). Raises ResponseError when the stream or the
    group is not there."""
    info = next((g for g in client.xinfo_groups(stream) if _text(g["name"]) == group), None)
    frame.streams += 1
    if info is None:
        raise redis.ResponseError(f"NOGROUP no group {group} on {stream}")
    pending = int(info["pending"])
    consumers = client.xinfo_consumers(stream, group)
    oldest = client.xpending(stream, group).get("min") if pending else None
    frame.groups += 1
    frame.pending = (frame.pending or 0) + pending
    frame.consumers = max(frame.consumers, int(info["consumers"]))
    if oldest:
        age_s = max(0.0, (now_ms - _id_ms(oldest)) / 1000)
        frame.oldest_pending_s = max(frame.oldest_pending_s or 0.0, age_s)
    rows = {r.name: r for r in frame.rows}
    for c in consumers:
        row = rows.get(_text(c["name"]))
        if row is not None:
            row.pending = (row.pending or 0) + int(c["pending"])
    lag = info.get("lag")
    # A trim past unread entries (XTRIM MAXLEN by hand) leaves the server counting them: never more
    # than the stream holds.
    return None if lag is None else min(int(lag), int(client.xlen(stream)))


def stats_prefixes(client: redis.Redis, near: str) -> tuple[list[str], bool]:
    """Prefixes that have a stats stream (`<prefix>:stats`), the most like `near` first, from at most
    `HINT_SCAN_CALLS` SCAN calls (TYPE stream); and whether the SCAN went through the whole keyspace."""
    found: set[str] = set()
    cursor, complete = 0, False
    for _ in range(HINT_SCAN_CALLS):
        cursor, keys = client.scan(cursor, match="*:stats", count=HINT_SCAN_COUNT, _type="stream")
        found.update(_text(k)[: -len(":stats")] for k in keys)
        if not cursor:
            complete = True
            break
    similarity = {p: difflib.SequenceMatcher(None, near, p).ratio() for p in found}
    return sorted(found, key=lambda p: (-similarity[p], p)), complete


def read_frame(
    client: redis.Redis, names: StreamNames, group: str, max_age_s: float, streams: list[str] | None = None
) -> Frame:
    """The workers' latest records and their group's state, summed over `streams` (one per tenant;
    default: the names' request stream). With no worker to show, also what is there to say why."""
    seconds, micros = client.time()
    now_ms = seconds * 1000 + micros / 1000
    scan = latest_stats(client, names.stats, now_ms, max_age_s)
    rows = sorted(scan.rows.values(), key=lambda r: r.name)
    frame = Frame(rows, unreadable=scan.unreadable, future=scan.future)
    lags: list[int | None] = []
    for stream in streams or [names.requests]:
        try:
            lags.append(_group_state(client, stream, group, frame, now_ms))
        except redis.ResponseError:  # no stream (or not a stream), or no group yet
            continue
    if lags and None not in lags:
        frame.lag = sum(lag or 0 for lag in lags)
    if not frame.rows:
        frame.stats_found = bool(client.exists(names.stats))
        if not frame.stats_found and not frame.streams and isinstance(client, redis.Redis):
            frame.prefixes, frame.prefixes_complete = stats_prefixes(client, names.prefix)
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


def _blocks(used: float | None, total: float | None) -> str:
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


def _mean(rows: list[WorkerRow], name: str) -> float | None:
    values = [v for v in (r.num(name) for r in rows) if v is not None]
    return sum(values) / len(values) if values else None


def _max(rows: list[WorkerRow], name: str) -> float | None:
    values = [v for v in (r.num(name) for r in rows) if v is not None]
    return max(values) if values else None


def _lag(frame: Frame) -> str:
    """The group's lag: a number, `?` where the server does not know it, `-` where there is no group."""
    if frame.lag is None:
        return "?" if frame.groups else "-"
    return _fmt(frame.lag, 0)


@dataclass(frozen=True)
class Column:
    """One column: its header, a worker's cell and the total's cell."""

    header: str
    cell: Callable[[WorkerRow], str]
    total: Callable[[Frame], str]


def _run_wait(running: float | None, waiting: float | None) -> str:
    return f"{_fmt(running, 0)}/{_fmt(waiting, 0)}"


COLUMNS: dict[str, Column] = {
    "age": Column("age s", lambda r: _fmt(r.age_s), lambda f: ""),
    "req/s": Column(
        "req/s", lambda r: _fmt(r.num("requests_per_s"), 2), lambda f: _fmt(_sum(f.rows, "requests_per_s"), 2)
    ),
    "tok/s": Column(
        "tok/s", lambda r: _fmt(r.num("tokens_per_s"), 1), lambda f: _fmt(_sum(f.rows, "tokens_per_s"), 1)
    ),
    "pending": Column("pending", lambda r: _fmt(r.pending, 0), lambda f: _fmt(f.pending, 0)),
    "run/wait": Column(
        "run/wait",
        lambda r: _run_wait(r.num("running"), r.num("waiting")),
        lambda f: _run_wait(_sum(f.rows, "running"), _sum(f.rows, "waiting")),
    ),
    "KV blocks": Column(
        "KV blocks",
        lambda r: _blocks(r.num("kv_blocks_used"), r.num("kv_blocks_total")),
        lambda f: _blocks(_sum(f.rows, "kv_blocks_used"), _sum(f.rows, "kv_blocks_total")),
    ),
    "KV": Column(
        "KV",
        lambda r: _pct(r.num("kv_blocks_used"), r.num("kv_blocks_total")),
        lambda f: _pct(_sum(f.rows, "kv_blocks_used"), _sum(f.rows, "kv_blocks_total")),
    ),
    "prefix hit": Column(
        "prefix hit",
        lambda r: _fmt(r.num("prefix_hit_rate"), 3),
        lambda f: _fmt(_mean(f.rows, "prefix_hit_rate"), 3),
    ),
    "shards": Column(
        "shards", lambda r: _fmt(r.num("owned_shards"), 0), lambda f: _fmt(_sum(f.rows, "owned_shards"), 0)
    ),
    "step p50": Column(
        "step p50 ms",
        lambda r: _fmt(r.num("step_p50_ms"), 2),
        lambda f: _fmt(_max(f.rows, "step_p50_ms"), 2, " max"),
    ),
    "step p95": Column(
        "step p95 ms",
        lambda r: _fmt(r.num("step_p95_ms"), 2),
        lambda f: _fmt(_max(f.rows, "step_p95_ms"), 2, " max"),
    ),
    "GPU util": Column(
        "GPU util",
        lambda r: _fmt(r.num("gpu_util_pct"), 0, "%"),
        lambda f: _fmt(_mean(f.rows, "gpu_util_pct"), 0, "%"),
    ),
    "GPU mem": Column(
        "GPU mem",
        lambda r: _gpu_mem(r.num("gpu_mem_used_bytes"), r.num("gpu_mem_total_bytes")),
        lambda f: _gpu_mem(_sum(f.rows, "gpu_mem_used_bytes"), _sum(f.rows, "gpu_mem_total_bytes")),
    ),
}  # fmt: skip
# Every column, in order, and how the table narrows: each step replaces a column (a narrower one) or
# drops it, until the table fits. The worker's name, req/s, tok/s and pending always stay.
WIDE = ["age", "req/s", "tok/s", "pending", "run/wait", "KV blocks", "prefix hit", "shards", "step p50",
        "step p95", "GPU util", "GPU mem"]  # fmt: skip
NARROWING: list[tuple[str, str | None]] = [
    ("shards", None), ("KV blocks", "KV"), ("GPU mem", None), ("step p50", None), ("prefix hit", None),
    ("age", None), ("GPU util", None), ("step p95", None), ("KV", None), ("run/wait", None),
]  # fmt: skip


def layouts() -> list[list[str]]:
    """The column sets from the widest to the narrowest."""
    shown, out = list(WIDE), [list(WIDE)]
    for old, new in NARROWING:
        at = shown.index(old)
        shown = shown[:at] + ([new] if new else []) + shown[at + 1 :]
        out.append(shown)
    return out


def _header(frame: Frame, prefix: str) -> Text:
    """Two lines over the table: where, and the group's live backlog."""
    when = time.strftime("%H:%M:%S", time.localtime(frame.taken_at))
    first = f"llm workers  prefix={prefix}  consumers={frame.consumers}  {when}"
    backlog = "-" if frame.groups == 0 else ("?" if frame.backlog is None else _fmt(frame.backlog, 0))
    pending = _fmt(frame.pending, 0)
    second = f"backlog {backlog} = lag {_lag(frame)} (not read) + pending {pending} (read, not acked)"
    if frame.oldest_pending_s is not None:
        second += f"  oldest {_fmt(frame.oldest_pending_s)} s"
    return Text.assemble(plain(first, limit=400), "\n", plain(second, limit=400))


def _notes(frame: Frame, prefix: str, max_age_s: float | None) -> Text | None:
    """The lines under the table: what is not shown, and why there is no worker to show."""
    lines = []
    if frame.unreadable or frame.future:
        parts = []
        if frame.unreadable:
            parts.append(f"{frame.unreadable} unreadable (not UTF-8, or no worker)")
        if frame.future:
            more = "+" if frame.future >= SCAN_ENTRIES else ""
            parts.append(f"{frame.future}{more} dated ahead of the server's clock")
        lines.append("stats entries skipped: " + ", ".join(parts))
    if frame.other_pending and frame.rows:
        lines.append(f"{frame.other_pending} pending held by consumers without a current record")
    if frame.lag is None and frame.groups:
        lines.append("lag ?: the server does not know it (entries were deleted or trimmed unread)")
    if not frame.rows:
        lines += _why_empty(frame, prefix, max_age_s)
    return Text("\n").join(plain(line, limit=400) for line in lines) if lines else None


def _why_empty(frame: Frame, prefix: str, max_age_s: float | None) -> list[str]:
    if frame.stats_found:
        age = f"{max_age_s:g} s" if max_age_s is not None else "--max-age-s"
        return [f"no worker has written {prefix}:stats in the last {age} (--max-age-s)"]
    if frame.streams:
        return [f"no stats stream {prefix}:stats: workers not started, or stats off (LLM_STATS_INTERVAL_S=0)"]
    lines = [f"nothing under prefix {prefix!r}: no {prefix}:stats and no request stream (wrong --prefix?)"]
    if frame.prefixes is not None:
        more = ", ..." if len(frame.prefixes) > HINT_PREFIXES else ""
        shown = ", ".join(frame.prefixes[:HINT_PREFIXES]) + more
        where = "" if frame.prefixes_complete else " (in part of the keyspace)"
        if frame.prefixes:
            lines.append(f"prefixes with a stats stream{where}: {shown}")
        else:
            lines.append(f"no stats stream under any prefix{where}")
    return lines


def _table(frame: Frame, prefix: str, keys: list[str], name_chars: int, max_age_s: float | None) -> Table:
    columns = [COLUMNS[key] for key in keys]
    table = Table(
        title=_header(frame, prefix), title_justify="left", caption=_notes(frame, prefix, max_age_s),
        caption_justify="left", box=box.SIMPLE, show_edge=False, show_footer=bool(frame.rows),
    )  # fmt: skip
    table.add_column("worker", footer=plain(f"total ({len(frame.rows)})"), no_wrap=True, overflow="ellipsis")
    for column in columns:
        table.add_column(column.header, footer=plain(column.total(frame)), justify="right", no_wrap=True)
    for r in frame.rows:
        name = plain(middle_cut(plain(r.name).plain, name_chars), limit=name_chars)
        table.add_row(name, *(plain(column.cell(r)) for column in columns))
    return table


def render(
    frame: Frame, prefix: str, width: int | None = None, console: Console | None = None,
    max_age_s: float | None = None,
) -> Table:  # fmt: skip
    """The frame as a table: every column when `width` is None, else the widest layout that fits in
    `width` columns (measured with `console`), names cut to the room left."""
    longest = max((cell_len(plain(r.name).plain) for r in frame.rows), default=0)
    if width is None:
        return _table(frame, prefix, WIDE, CELL_CHARS, max_age_s)
    console = console or Console(width=width)
    options = console.options.update_width(10 * width)  # the natural width, not one clamped to `width`
    short = min(longest, NAME_MIN_CHARS) if longest else NAME_MIN_CHARS
    candidates = layouts()
    for keys in candidates:
        table = _table(frame, prefix, keys, short, max_age_s)
        needed = Measurement.get(console, options, table).maximum
        if needed <= width or keys is candidates[-1]:
            room = short + max(0, width - needed)
            return _table(frame, prefix, keys, max(short, min(longest, room, CELL_CHARS)), max_age_s)
    raise AssertionError("unreachable")


@dataclass
class View:
    """A frame that lays itself out for the width it is given (a resized terminal included)."""

    frame: Frame
    prefix: str
    max_age_s: float | None = None

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        yield render(self.frame, self.prefix, options.max_width, console, self.max_age_s)


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

    def frame() -> View:
        return View(read_frame(client, names, args.group, args.max_age_s, streams), prefix, args.max_age_s)

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
