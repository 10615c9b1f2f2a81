"""What hostile cancels and dead letters cost: Redis bytes, TTLs, and a shared worker's memory.

A tenant can append anything to its own cancel stream and request stream. Each such entry must
cost about its own bytes: a cancel of an id that is never sent leaves nothing but its entry, a
cancel of a queued request is answered with a refusal's short TTL, entries of any size on a cancel
stream do not grow a worker's memory, and a dead letter stays within `dead_letter_max_bytes`
however large or oddly shaped the entry it parks.
"""

from __future__ import annotations

import hashlib
import random
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from hypothesis import given, settings
from hypothesis import strategies as st

from producer.client import ChatClient, ChatError
from producer.wire.keys import StreamNames
from producer.wire.models import ErrorCode
from worker.replies.dead_letter import (
    MAX_FIELD_NAME_BYTES,
    MAX_FIELDS_COPIED,
    dead_letter_fields,
    entry_digest,
    stored_bytes,
)

pytestmark = pytest.mark.timeout(180)

CANCELS = 5000
REFUSAL_TTL_S = 60


def ask(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def long_text(n: int = 300) -> str:
    return " ".join(f"w{i}" for i in range(n))


@pytest.fixture()
def alice(redis_url: str, prefix: str) -> Iterator[ChatClient]:
    client = ChatClient(redis_url, prefix=prefix, tenant="alice", timeout_s=60)
    yield client
    client.close()


def used_memory(r: redis.Redis) -> int:
    time.sleep(0.2)
    return int(r.info("memory")["used_memory"])


def keys_like(r: redis.Redis, pattern: str) -> list[bytes]:
    return list(r.scan_iter(match=pattern, count=1000))


def wait_cancelled(client: ChatClient, request_id: str) -> None:
    with pytest.raises(ChatError) as info:
        client.result(request_id, timeout_s=60)
    assert info.value.code == ErrorCode.CANCELLED


def test_a_cancel_costs_its_own_bytes_and_a_queued_one_expires_like_a_refusal(
    start_worker, redis_client: redis.Redis, alice: ChatClient, prefix: str
) -> None:
    names = StreamNames.for_prefix(prefix, tenant="alice")
    worker = start_worker("echo", tenants="alice", echo_token_delay_ms=50, refusal_ttl_s=REFUSAL_TTL_S)
    assert alice.chat(ask("warm up"), max_tokens=2).text == "warm up"
    running = alice.submit(ask(long_text()), max_tokens=300)
    before = used_memory(redis_client)
    pipe = redis_client.pipeline(transaction=False)
    for i in range(CANCELS):  # what `alice.cancel` sends, for ids no one ever sent
        pipe.xadd(names.cancel, {"id": f"nobody-{i:06d}", "ct": "msgpack"}, maxlen=10_000, approximate=True)
    pipe.execute()
    alice.cancel(running)
    wait_cancelled(alice, running)  # read after the 5,000 before it: the worker has seen them all
    per_cancel = (used_memory(redis_client) - before) / CANCELS
    print(f"{per_cancel:.0f} bytes per cancel; cancel stream {redis_client.memory_usage(names.cancel)} bytes")
    assert per_cancel < 300, f"{per_cancel:.0f} bytes per cancel of an unknown id"
    assert not keys_like(redis_client, f"{names.root}:final:nobody-*")
    assert not keys_like(redis_client, f"{names.root}:reply:nobody-*")
    # Served requests are unaffected, and the running one was cancelled by the worker holding it.
    assert [e["id"] for e in worker.events("request_cancelled")] == [running]
    assert alice.chat(ask("still served"), max_tokens=3).text == "still served"

    # A request cancelled while queued (no worker up): a worker started later answers it `cancelled`,
    # with the short TTL of a refusal, and never runs it.
    worker.stop()
    queued = alice.submit(ask("never run"), max_tokens=4)
    alice.cancel(queued)
    later = start_worker("echo", tenants="alice", refusal_ttl_s=REFUSAL_TTL_S)
    wait_cancelled(alice, queued)
    for key in (names.reply(queued), names.final_guard(queued)):
        assert 0 < redis_client.ttl(key) <= REFUSAL_TTL_S, key
    assert not [e for e in later.events("request_done") if e["id"] == queued]
    assert [e["code"] for e in later.events("request_rejected") if e["id"] == queued] == ["cancelled"]


def test_a_shared_clients_cancel_expires_like_a_refusal(
    start_worker, redis_client: redis.Redis, chat_client: ChatClient, prefix: str
) -> None:
    names = StreamNames.for_prefix(prefix)
    for request_id in ("never-sent", chat_client.submit(ask("queued, no worker"), max_tokens=4)):
        assert chat_client.cancel(request_id) is True
        for key in (names.reply(request_id), names.final_guard(request_id)):
            assert 0 < redis_client.ttl(key) <= chat_client.settings.reply_ttl_s <= REFUSAL_TTL_S, key


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def test_huge_cancel_entries_cost_a_shared_worker_no_memory(
    start_worker, redis_url: str, redis_client: redis.Redis, alice: ChatClient, prefix: str
) -> None:
    """40 entries of 10 MB on one tenant's cancel stream: skipped inside Redis, never read."""
    names = StreamNames.for_prefix(prefix, tenant="alice")
    worker = start_worker("echo", tenants="alice,bob", echo_token_delay_ms=20)
    bob = ChatClient(redis_url, prefix=prefix, tenant="bob", timeout_s=60)
    try:
        assert bob.chat(ask("warm up"), max_tokens=2).text == "warm up"
        start_rss = rss_bytes(worker.proc.pid)
        big = b"x" * (10 * 1024 * 1024)
        shapes = [{"id": big}, {"id": b"r1", "reply_to": big}, {"id": b"r2", "pad": big}]
        for i in range(40):
            redis_client.xadd(names.cancel, shapes[i % len(shapes)])
            if i % 10 == 9:  # the worker keeps serving the other tenant meanwhile
                assert bob.chat(ask(f"bob {i}"), max_tokens=3).text == f"bob {i}"
        running = alice.submit(ask(long_text()), max_tokens=300)
        time.sleep(0.3)
        assert alice.cancel(running)
        wait_cancelled(alice, running)  # a normal cancel after them still works
        grown = rss_bytes(worker.proc.pid) - start_rss
        print(f"worker RSS grew {grown / 2**20:.1f} MiB")
        assert grown < 48 * 2**20, f"worker RSS grew {grown / 2**20:.0f} MiB"
        dropped = worker.events("cancels_dropped")
        assert sum(e["entries"] for e in dropped) == 40
        assert len(dropped) < 40, "one line per poll, not per entry"
        assert [e["id"] for e in worker.events("request_cancelled")] == [running]
    finally:
        bob.close()
        redis_client.delete(names.cancel)  # 400 MB the session's server need not keep


# -- dead letters ---------------------------------------------------------------------------------------


def identifies(parked: dict[bytes, bytes], original: dict[bytes, bytes]) -> None:
    """An operator can match the dead letter to the entry: its whole size and hash, and per field copied,
    the value itself or a prefix with the value's hash and length."""
    size, digest = entry_digest(original)
    assert parked[b"entry_bytes"] == str(size).encode()
    assert parked[b"entry_sha256"] == digest.encode()
    assert parked[b"fields"] == str(len(original)).encode()
    first: dict[bytes, bytes] = {}
    for name, value in list(original.items())[:MAX_FIELDS_COPIED]:
        first.setdefault(name[:MAX_FIELD_NAME_BYTES], value)
    cut = len(original) > MAX_FIELDS_COPIED or any(len(n) > MAX_FIELD_NAME_BYTES for n in original)
    for short, value in first.items():
        copied = parked.get(b"f:" + short)
        if copied is None:
            cut = True
        elif b"h:" + short in parked:
            cut = True
            assert value.startswith(copied)
            assert parked[b"h:" + short] == hashlib.sha256(value).hexdigest().encode()
            assert parked[b"n:" + short] == str(len(value)).encode()
        else:
            assert copied == value
    assert parked[b"truncated"] == (b"1" if cut else b"0")


names_st = st.binary(min_size=1, max_size=120).map(lambda b: b"x" + b)  # never `id`, `ct` or `body`
values_st = st.one_of(st.binary(max_size=64), st.integers(0, 300_000).map(lambda n: b"v" * n))


@settings(max_examples=200, deadline=None)
@given(
    fields=st.dictionaries(names_st, values_st, max_size=50),
    max_field_bytes=st.integers(64, 20_000),
    max_bytes=st.integers(2048, 40_000),
)
def test_a_dead_letter_stays_within_its_byte_bound(
    fields: dict[bytes, bytes], max_field_bytes: int, max_bytes: int
) -> None:
    parked = dead_letter_fields(b"1-0", fields, "r" * 1000, 1, "c" * 300, max_field_bytes, max_bytes)
    assert stored_bytes(parked) <= max_bytes
    identifies(parked, fields)


def hostile_entries(n: int, seed: int = 7) -> list[dict[bytes, bytes]]:
    """Id-less entries of many shapes: huge fields, many fields, long names, binary, empty values."""
    rnd = random.Random(seed)
    shapes = [
        lambda: {b"x": b"\xff" * rnd.randint(100_000, 1_500_000)},
        lambda: {
            f"k{i}".encode(): bytes(rnd.randbytes(rnd.randint(0, 5000))) for i in range(rnd.randint(1, 60))
        },
        lambda: {b"n" * rnd.randint(65, 400): b"v" * rnd.randint(0, 200_000) for _ in range(1)},
        lambda: {f"f{i}".encode(): b"" for i in range(40)},
        lambda: {b"body": b"\x00not json" * rnd.randint(1, 30_000)},
        lambda: {b"pad": b"p" * 4096, b"more": b"m" * 4097, b"tail": b"t"},
    ]
    return [rnd.choice(shapes)() for _ in range(n)]


def test_dead_letters_are_bounded_in_bytes_and_count_and_still_identify_their_entry(
    start_worker, redis_client: redis.Redis, prefix: str
) -> None:
    names = StreamNames.for_prefix(prefix)
    max_bytes, max_entries = 4096, 100
    entries = hostile_entries(300)
    start_worker("echo", dead_letter_max_bytes=max_bytes, dead_letter_max_entries=max_entries)
    by_id = {}
    for fields in entries:
        by_id[redis_client.xadd(names.requests, fields)] = fields  # type: ignore[arg-type]
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        group = redis_client.xinfo_groups(names.requests)[0]
        if group["lag"] == 0 and group["pending"] == 0:
            break
        time.sleep(0.2)
    else:
        raise AssertionError(f"the worker did not park every entry: {group}")
    dead = redis_client.xrange(names.dead_letter)
    assert len(dead) < len(entries), "the dead-letter stream is not trimmed"
    assert len(dead) <= 2 * max_entries  # MAXLEN ~ trims whole nodes of 100 entries
    for _, parked in dead:
        assert stored_bytes(parked) <= max_bytes
        identifies(parked, by_id[parked[b"entry"]])
    usage = redis_client.memory_usage(names.dead_letter)
    assert usage is not None and usage < len(dead) * (max_bytes + 512)
