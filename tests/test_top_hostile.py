"""`python -m worker.top` against stats entries nobody should have written: it shows every field as plain
text, skips and counts what it cannot read, ignores entries dated ahead of the clock, and stays up.

Entries of every shape (hypothesis: names and values with rich markup, escape sequences, bidi
controls, bytes that are not UTF-8, huge and non-finite numbers, no `worker`; ids in the past, a
little ahead, far ahead, the largest id) go into a real stream; then a frame is read and rendered.
"""

from __future__ import annotations

import io
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from rich.console import Console
from rich.text import Text

from producer.wire.keys import CONSUMER_GROUP, StreamNames
from worker.observability import top
from worker.observability.live_stats import FUTURE_ALLOWANCE_MS

ROOT = Path(__file__).resolve().parents[1]
MAX_ID = "18446744073709551615-18446744073709551615"
MARKUP = ["[/]", "[bold red]x", "[link=http://evil.example]click[/link]", "\x1b]8;;http://e.example\x07z\x1b]8;;\x07",
          "\x1b[2J\x1b[H", "a\rb", ":smile:", "\u202eevil", "[[/]]", "\\[x]", "x" * 300]  # fmt: skip
TEXT = st.text(st.characters(blacklist_categories=("Cs",)), max_size=12)
NOT_UTF8 = st.sampled_from([b"\xff", b"\xc3", b"w\xfe\xfe", b"\xed\xa0\x80", b"ok\x80"])
FIELD_NAMES = st.sampled_from(["requests_per_s", "tokens_per_s", "kv_blocks_used", "kv_blocks_total",
                               "gpu_util_pct", "step_p95_ms", "pending", "running"])  # fmt: skip
NUMBERS = st.sampled_from(["1.5", "nan", "inf", "-inf", "1e308", "1e400", "-0", "12", "1e16", "0x10", ""])
VALUES = st.one_of(NUMBERS, TEXT, st.sampled_from(MARKUP), NOT_UTF8)
WHEN = st.sampled_from(["past", "now", "within the allowance", "ahead", "far ahead"])
ENTRY = st.tuples(
    st.one_of(st.none(), TEXT, st.sampled_from(MARKUP), NOT_UTF8),  # the `worker` field (None: absent)
    st.dictionaries(st.one_of(FIELD_NAMES, TEXT, NOT_UTF8), VALUES, max_size=5),
    WHEN,
)


def _utf8(value: str | bytes) -> bool:
    try:
        value.decode("utf-8") if isinstance(value, bytes) else value.encode("utf-8")
    except UnicodeError:
        return False
    return True


def _add_entries(client: redis.Redis, stream: str, entries: list, max_id: bool) -> tuple[int, list[tuple]]:
    """XADD the entries with ids by their `when` (in id order); returns the server's now and, per entry in
    id order, (ms, fields)."""
    seconds, micros = client.time()
    now = seconds * 1000 + micros // 1000
    offsets = {"past": -30_000, "now": -1, "within the allowance": FUTURE_ALLOWANCE_MS // 2,
               "ahead": FUTURE_ALLOWANCE_MS + 60_000, "far ahead": 10**12}  # fmt: skip
    added = []
    for seq, (worker, fields, when) in sorted(enumerate(entries), key=lambda e: (offsets[e[1][2]], e[0])):
        body: dict = dict(fields)
        if worker is not None:
            body["worker"] = worker
        body = body or {"x": "1"}
        ms = now + offsets[when]
        client.xadd(stream, body, id=f"{ms}-{seq + 1}")
        added.append((ms, body))
    if max_id:
        client.xadd(stream, {"worker": "max"}, id=MAX_ID)
        added.append((2**64 - 1, {"worker": "max"}))
    return now, added


def _expected(added: list[tuple], limit: int) -> tuple[set[str], int, int]:
    """(worker names shown, unreadable entries, entries ahead) for entries `added` in id order."""
    names, unreadable, future = set(), 0, 0
    for ms, body in added:
        if ms > limit:
            future += 1
            continue
        worker = body.get("worker")
        text = {
            (k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v)
            for k, v in body.items()
            if _utf8(k) and _utf8(v)
        }
        if len(text) < len(body) or not worker or not text.get("worker"):
            unreadable += 1
        else:
            names.add(text["worker"])
    return names, unreadable, future


def _rendered(frame: top.Frame) -> str:
    out = io.StringIO()
    Console(file=out, force_terminal=True, color_system="truecolor", width=250).print(
        top.render(frame, "p[b]")
    )
    return out.getvalue()


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(entries=st.lists(ENTRY, max_size=12), max_id=st.booleans())
def test_any_stats_entries_render_as_plain_text_or_are_skipped_and_counted(
    redis_client: redis.Redis, prefix: str, entries: list, max_id: bool
) -> None:
    names = StreamNames.for_prefix(f"{prefix}{uuid.uuid4().hex[:6]}")
    try:
        now, added = _add_entries(redis_client, names.stats, entries, max_id)
        frame = top.read_frame(redis_client, names, CONSUMER_GROUP, max_age_s=1e9)
        shown, unreadable, future = _expected(added, now + FUTURE_ALLOWANCE_MS)
        assert {r.name for r in frame.rows} == shown
        assert (frame.unreadable, frame.future) == (unreadable, future)
        output = _rendered(frame)
        table = top.render(frame, "p")
        cells = list(table.columns[0].cells)[: len(frame.rows)]
        assert all(isinstance(c, Text) for column in table.columns for c in column.cells)
        for row, cell in zip(frame.rows, cells, strict=True):
            assert cell.plain == top.plain(row.name).plain  # the name itself, escaped, never parsed
            assert cell.plain.isprintable() and len(cell.plain) <= top.CELL_CHARS
        for injected in ("\x1b]8;", "\x1b[2J", "\x07", "\u202e", "\r"):
            assert injected not in output
        if future or unreadable:
            assert "stats entries skipped" in output
    finally:
        redis_client.delete(names.stats)


# -- the reported entries, through the command line -------------------------------------------------------
def _top_once(redis_url: str, prefix: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "worker.top", "--once", "--redis-url", redis_url, "--prefix", prefix],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip


@pytest.mark.parametrize(
    "fields, shown",
    [
        ({"worker": "bad[/]"}, "bad[/]"),
        ({"worker": "[link=http://evil.example]click[/link]"}, "[link=http://evil.example]click[/link]"),
        ({"worker": "[bold red]loud"}, "[bold red]loud"),
        ({"worker": "esc\x1b[2Jcleared"}, "esc\\x1b[2Jcleared"),
        ({"worker": "w", "model": "m[/]", "requests_per_s": "[/]"}, "w"),
        ({"worker": b"not-utf8-\xff"}, None),
        ({"worker": "w2", "requests_per_s": b"\xfe"}, None),
        ({"worker": "w3", b"\xfe\xff": "1"}, None),
        ({"requests_per_s": "1"}, None),
    ],
)
def test_top_shows_a_reported_entry_literally_or_counts_it(
    redis_url: str, redis_client: redis.Redis, prefix: str, fields: dict, shown: str | None
) -> None:
    """Each entry that killed `--once` (MarkupError, UnicodeDecodeError) or rendered as markup, next to a
    good record: exit 0, the good worker shown, the entry shown literally or counted as unreadable."""
    stats = StreamNames.for_prefix(prefix).stats
    redis_client.xadd(stats, {"worker": "good-worker", "requests_per_s": "2.5"})
    redis_client.xadd(stats, fields)
    result = _top_once(redis_url, prefix)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "good-worker" in result.stdout and "Traceback" not in result.stderr
    if shown is None:
        assert "stats entries skipped: 1 unreadable" in result.stdout, result.stdout
    else:
        assert shown in result.stdout, result.stdout
        assert "total (2)" in result.stdout


@pytest.mark.parametrize("entry_id", [MAX_ID, "18446744073709551615-0", "future"])
def test_top_ignores_an_entry_dated_ahead_of_the_clock(
    redis_url: str, redis_client: redis.Redis, prefix: str, entry_id: str
) -> None:
    """A ghost worker (its entry id's time ahead of now) is not shown, and the good one is not pushed out."""
    stats = StreamNames.for_prefix(prefix).stats
    redis_client.xadd(stats, {"worker": "good-worker"})
    if entry_id == "future":
        seconds, _ = redis_client.time()
        entry_id = f"{(seconds + 3600) * 1000}-0"
    redis_client.xadd(stats, {"worker": "ghost"}, id=entry_id)
    result = _top_once(redis_url, prefix)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "good-worker" in result.stdout and "ghost" not in result.stdout
    assert "1 dated ahead of the server's clock" in result.stdout and "total (1)" in result.stdout


def test_live_mode_stays_up_on_hostile_entries(
    redis_url: str, redis_client: redis.Redis, prefix: str, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    """The live loop (no `--once`) renders frame after frame over the same hostile entries, then quits on
    Ctrl-C with status 0."""
    stats = StreamNames.for_prefix(prefix).stats
    redis_client.xadd(stats, {"worker": "good-worker"})
    for fields in ({"worker": "bad[/]"}, {"worker": b"\xff"}, {b"\xfe": b"\xff", "worker": "x"}):
        redis_client.xadd(stats, fields)
    redis_client.xadd(stats, {"worker": "ghost"}, id=MAX_ID)
    frames = []

    def sleep(_: float) -> None:
        frames.append(1)
        if len(frames) > 3:
            raise KeyboardInterrupt

    monkeypatch.setattr(top.time, "sleep", sleep)
    assert top.main(["--redis-url", redis_url, "--prefix", prefix, "--interval", "0.01"]) == 0
    out = capsys.readouterr().out
    assert len(frames) == 4 and "bad[/]" in out and "ghost" not in out
    assert "2 unreadable" in out and "1 dated ahead" in out
