"""`python -m worker.top` at the terminal sizes people have, and its queue numbers against a real group.

- Layout: frames of every shape (hypothesis: 1-6 workers, pod-like, short, long and non-ASCII names,
  readings present or absent, large numbers) rendered at 80x24 and 120x40 keep each worker's name
  (whole, or cut in the middle with both ends), its req/s, tok/s and pending, and the header's
  backlog, within the width; with up to 6 workers the frame fits in 24 rows.
- Lag and pending: sequences of XADD / XREADGROUP / XACK / XDEL / XTRIM on a real stream, then a
  frame: lag is the entries no consumer has read (or unknown, shown `?`, never 0), pending and each
  worker's own pending are the server's, and a worker's stale record cannot override them.
- A wrong `--prefix` says so and names the prefixes that do have a stats stream.
"""

from __future__ import annotations

import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from rich.cells import cell_len
from rich.console import Console

from producer.wire.keys import CONSUMER_GROUP, StreamNames
from worker.local_redis.server import EmbeddedRedis
from worker.observability import top

ROOT = Path(__file__).resolve().parents[1]
SIZES = [(80, 24), (120, 40)]

POD = st.builds(
    lambda rs, pod: f"llm-worker-{rs}-{pod}",
    st.text("0123456789abcdef", min_size=9, max_size=10),
    st.text("bcdfghjklmnpqrstvwxz2456789", min_size=5, max_size=5),
)
NAMES = st.one_of(
    POD,
    st.text("abcdefghijklmnopqrstuvwxyz0123456789-", min_size=1, max_size=12),
    st.text("abcdefghijklmnopqrstuvwxyz0123456789-", min_size=40, max_size=90),
    st.text(st.characters(whitelist_categories=("Lu", "Ll", "Lo", "Nd")), min_size=1, max_size=30),
)
READING = st.one_of(st.none(), st.floats(0, 1e7, allow_nan=False).map(lambda x: f"{x:.3f}"))
RECORD = st.fixed_dictionaries(
    {"requests_per_s": READING, "tokens_per_s": READING},
    optional={
        "running": st.integers(0, 512).map(str), "waiting": st.integers(0, 100_000).map(str),
        "kv_blocks_used": st.integers(0, 10**6).map(str), "kv_blocks_total": st.integers(1, 10**6).map(str),
        "prefix_hit_rate": READING, "step_p50_ms": READING, "step_p95_ms": READING,
        "gpu_util_pct": READING, "gpu_mem_used_bytes": st.just(str(70 * 2**30)),
        "gpu_mem_total_bytes": st.just(str(80 * 2**30)),
    },
)  # fmt: skip
WORKERS = st.lists(
    st.tuples(NAMES, RECORD, st.one_of(st.none(), st.integers(0, 10**6))),
    min_size=1, max_size=6, unique_by=lambda w: w[0],
)  # fmt: skip


def _frame(workers: list, lag: int | None, others: int) -> top.Frame:
    rows = [
        top.WorkerRow(name, 1.5, {k: v for k, v in record.items() if v is not None}, pending)
        for name, record, pending in sorted(workers)
    ]
    pending = sum(r.pending or 0 for r in rows) + others
    return top.Frame(rows, lag=lag, pending=pending, consumers=len(rows), streams=1, groups=1)


def _screen(frame: top.Frame, width: int, height: int) -> list[str]:
    console = Console(width=width, height=height, record=True, file=open("/dev/null", "w"))  # noqa: SIM115
    console.print(top.View(frame, "llm", 60.0))
    return console.export_text().splitlines()


def _shown(name: str, line: str) -> bool:
    """The row's first cell is the name whole, or cut in the middle with 6+ terminal cells of each end (a
    wide character, CJK say, takes two)."""
    escaped, cell = top.plain(name).plain, line.split()[0]
    head, _, tail = cell.partition("\u2026")
    if not tail:
        return cell == escaped
    ends = cell_len(head) >= 6 and cell_len(tail) >= 6
    return ends and escaped.startswith(head) and escaped.endswith(tail)


@pytest.mark.parametrize("width, height", SIZES)
@settings(max_examples=25, deadline=None)
@given(workers=WORKERS, lag=st.one_of(st.none(), st.integers(0, 10**6)), others=st.integers(0, 500))
def test_any_frame_fits_the_terminal_and_keeps_names_and_key_numbers(
    width: int, height: int, workers: list, lag: int | None, others: int
) -> None:
    frame = _frame(workers, lag, others)
    lines = _screen(frame, width, height)
    assert all(len(line.rstrip()) <= width for line in lines), "\n".join(lines)
    assert len(lines) <= height, "\n".join(lines)
    text = "\n".join(lines)
    assert f"pending {top._fmt(frame.pending, 0)}" in text
    assert f"lag {'?' if lag is None else top._fmt(lag, 0)}" in text
    rules = [i for i, line in enumerate(lines) if line.startswith("\u2500")]
    body = lines[rules[0] + 1 : rules[1]]
    assert len(body) == len(frame.rows), text
    for row in frame.rows:
        line = next((line for line in body if _shown(row.name, line)), None)
        assert line is not None, (row.name, text)
        cells = line.split()
        for value in (row.num("requests_per_s"), row.num("tokens_per_s")):
            assert (top._fmt(value, 2) in cells) or (top._fmt(value, 1) in cells), (value, line)
        assert top._fmt(row.pending, 0) in cells, line
    total = next(line for line in lines if f"total ({len(frame.rows)})" in line)
    assert top._fmt(frame.pending, 0) in total.split()


@pytest.mark.parametrize("width, height", SIZES)
def test_the_reported_fleet_at_the_usual_sizes(width: int, height: int) -> None:
    """Three pods of one Deployment, every reading present: every row's name keeps its pod suffix,
    the headers are whole words, and the wider terminal shows more columns."""
    record = {"requests_per_s": "6.12", "tokens_per_s": "1234.5", "running": "12", "waiting": "40",
              "kv_blocks_used": "1500", "kv_blocks_total": "2048", "prefix_hit_rate": "0.812",
              "step_p50_ms": "12.34", "step_p95_ms": "25.67", "gpu_util_pct": "93",
              "gpu_mem_used_bytes": str(70 * 2**30), "gpu_mem_total_bytes": str(80 * 2**30)}  # fmt: skip
    workers = [(f"llm-worker-7c9f8d6b5-{pod}", record, 96) for pod in ("x2k4z", "q8m2n", "b7c1d")]
    lines = _screen(_frame(workers, 0, 1), width, height)
    text = "\n".join(lines)
    assert "\u2026" not in text.split("────")[0], text  # no header cut
    for pod in ("x2k4z", "q8m2n", "b7c1d"):
        assert any(pod in line and "6.12" in line and "1,234.5" in line for line in lines), text
    assert "backlog 289 = lag 0" in text and "1 pending held by consumers without a current record" in text
    assert ("step p95 ms" in text) and (("GPU util" in text) == (width >= 120)), text
    assert all(len(line.rstrip()) <= width for line in lines)


def test_a_narrow_layout_drops_columns_in_order() -> None:
    layouts = top.layouts()
    assert layouts[0] == top.WIDE and layouts[-1] == ["req/s", "tok/s", "pending"]
    assert all(set(layouts[i + 1]) - set(layouts[i]) <= {"KV"} for i in range(len(layouts) - 1))


@given(name=NAMES, limit=st.integers(3, 40))
def test_middle_cut_keeps_both_ends_within_the_limit(name: str, limit: int) -> None:
    from rich.cells import cell_len

    cut = top.middle_cut(name, limit)
    assert cell_len(cut) <= max(limit, 1) and (cut == name or "\u2026" in cut)
    if cut != name and limit >= 8:
        head, _, tail = cut.partition("\u2026")
        assert name.startswith(head) and name.endswith(tail) and tail


# -- lag and pending against a real group -------------------------------------------------------------
OPS = st.lists(
    st.one_of(
        st.tuples(st.just("add"), st.integers(1, 8)),
        st.tuples(st.just("read"), st.sampled_from(["w-a", "w-b", "gone"]), st.integers(1, 6)),
        st.tuples(st.just("ack"), st.integers(0, 5)),
        st.tuples(st.just("del"), st.integers(0, 30)),
        st.tuples(st.just("trim"), st.integers(0, 5)),
        st.tuples(st.just("maxlen"), st.integers(0, 5)),
    ),
    max_size=12,
)


def _apply(client: redis.Redis, stream: str, op: tuple) -> None:
    kind = op[0]
    if kind == "add":
        for i in range(op[1]):
            client.xadd(stream, {"n": str(i)})
    elif kind == "read":
        client.xreadgroup(CONSUMER_GROUP, op[1], {stream: ">"}, count=op[2])
    elif kind == "ack":
        pending = client.xpending_range(stream, CONSUMER_GROUP, "-", "+", count=op[1])
        if pending:
            client.xack(stream, CONSUMER_GROUP, *[p["message_id"] for p in pending])
    elif kind == "del":
        entries = client.xrange(stream)
        if entries:
            client.xdel(stream, entries[op[1] % len(entries)][0])
    elif kind == "trim":  # the oldest acknowledged entries, as the workers' trimming does
        entries = client.xrange(stream, count=op[1] + 1)
        group = client.xinfo_groups(stream)[0]
        pending = client.xpending(stream, CONSUMER_GROUP)
        needed = [_key(group["last-delivered-id"])] + ([_key(pending["min"])] if pending["pending"] else [])
        if len(entries) > op[1]:
            ms, seq = min([_key(entries[op[1]][0]), *needed])
            client.xtrim(stream, minid=f"{ms}-{seq}", approximate=False)
    else:  # by hand, unread entries included
        client.xtrim(stream, maxlen=op[1], approximate=False)


def _key(entry_id: bytes) -> tuple[int, int]:
    ms, _, seq = entry_id.decode().partition("-")
    return int(ms), int(seq)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=OPS)
def test_lag_and_pending_are_the_servers_and_rows_agree_with_the_header(
    redis_client: redis.Redis, prefix: str, ops: list
) -> None:
    names = StreamNames.for_prefix(f"{prefix}{uuid.uuid4().hex[:6]}")
    try:
        redis_client.xgroup_create(names.requests, CONSUMER_GROUP, id="0", mkstream=True)
        for op in ops:
            _apply(redis_client, names.requests, op)
        # Stale records that repeat an old group-wide lag and pending: never shown as the worker's own.
        for worker in ("w-a", "w-b", "idle"):
            redis_client.xadd(names.stats, {"worker": worker, "lag": "235", "pending": "289"})
        frame = top.read_frame(redis_client, names, CONSUMER_GROUP, max_age_s=60)

        group = redis_client.xinfo_groups(names.requests)[0]
        unread = len(redis_client.xrange(names.requests, "(" + group["last-delivered-id"].decode(), "+"))
        summary = redis_client.xpending(names.requests, CONSUMER_GROUP)
        consumers = redis_client.xinfo_consumers(names.requests, CONSUMER_GROUP)
        mine = {c["name"].decode(): c["pending"] for c in consumers}
        by_hand = any(op[0] == "maxlen" for op in ops)
        if by_hand:  # the server may count trimmed unread entries: capped at the length
            assert frame.lag is None or unread <= frame.lag <= redis_client.xlen(names.requests)
        else:
            assert frame.lag in (unread, None) and frame.lag == group["lag"]
        assert frame.pending == summary["pending"] and frame.groups == 1
        rows = {r.name: r.pending for r in frame.rows}
        assert rows == {"w-a": mine.get("w-a"), "w-b": mine.get("w-b"), "idle": None}
        assert frame.other_pending == mine.get("gone", 0)
        if not by_hand:
            assert frame.backlog == (None if frame.lag is None else unread + summary["pending"])

        text = " ".join(" ".join(_screen(frame, 80, 24)).split())
        assert f"lag {'?' if frame.lag is None else frame.lag} (not read)" in text
        assert "235" not in text and "289" not in text.replace(f"pending {frame.pending}", "")
        if frame.lag is None:
            assert "lag ?: the server does not know it" in text
    finally:
        redis_client.delete(names.requests, names.stats)


# -- why a frame is empty -----------------------------------------------------------------------------
def _top_once(redis_url: str, prefix: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "worker.top", "--once", "--redis-url", redis_url, "--prefix", prefix],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def test_a_wrong_prefix_says_so_and_names_the_prefixes_there(prefix: str) -> None:
    # A private server: the hint SCANs at most HINT_SCAN_CALLS x HINT_SCAN_COUNT keys, and a shared
    # server that earlier tests filled may hold the real prefix's stats beyond that.
    with EmbeddedRedis() as server:
        client = redis.Redis.from_url(server.url)
        client.xadd(StreamNames.for_prefix(prefix).stats, {"worker": "w1", "requests_per_s": "1"})
        for decoy in ("other-app", "zz" + prefix[2:]):
            client.xadd(StreamNames.for_prefix(decoy).stats, {"worker": "w9"})
        result = _top_once(server.url, prefix + "-typo")
        assert result.returncode == 0, result.stderr[-3000:]
        assert f"nothing under prefix '{prefix}-typo'" in result.stdout, result.stdout
        hint = next(line for line in result.stdout.splitlines() if "prefixes with a stats stream" in line)
        listed = [p.strip() for p in hint.split(": ", 1)[1].split(",")]
        assert listed[0] == prefix and set(listed) == {prefix, "other-app", "zz" + prefix[2:]}, result.stdout
        assert "in part of the keyspace" not in hint, hint  # three keys: the SCAN went through them all
        assert "total (" not in result.stdout
        right = _top_once(server.url, prefix)
        assert "w1" in right.stdout and "nothing under prefix" not in right.stdout, right.stdout
        client.close()


@pytest.mark.parametrize("setup, says", [
    ("old record", "no worker has written {p}:stats in the last 60 s"),
    ("no stats", "no stats stream {p}:stats"),
    ("nothing", "nothing under prefix '{p}'"),
])  # fmt: skip
def test_an_empty_frame_says_why(redis_client: redis.Redis, prefix: str, setup: str, says: str) -> None:
    names = StreamNames.for_prefix(prefix)
    if setup == "old record":
        seconds, _ = redis_client.time()
        redis_client.xadd(names.stats, {"worker": "w1"}, id=f"{(seconds - 3600) * 1000}-0")
    if setup == "no stats":
        redis_client.xgroup_create(names.requests, CONSUMER_GROUP, id="0", mkstream=True)
    try:
        frame = top.read_frame(redis_client, names, CONSUMER_GROUP, max_age_s=60)
        console = Console(width=80, record=True, file=open("/dev/null", "w"))  # noqa: SIM115
        console.print(top.View(frame, prefix, 60.0))
        text = console.export_text()
        assert says.format(p=prefix) in " ".join(text.split()), text
        assert (frame.prefixes is not None) == (setup == "nothing")
    finally:
        redis_client.delete(names.stats, names.requests)
