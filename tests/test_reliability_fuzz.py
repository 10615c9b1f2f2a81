"""Fuzz: 10,000 hostile stream entries interleaved with valid requests; the worker never dies.

Every fuzzed entry is accounted for: one with a usable request id gets exactly one final
reply on its (default or permitted) reply channel; the rest land in `<prefix>:dead`.
"""

from __future__ import annotations

import json
import random
import time
import urllib.request
from typing import Any

import msgpack
import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from producer.client import ChatClient
from producer.wire.codec import ProtocolError, decode_request
from producer.wire.keys import reply_key_allowed, reply_stream
from worker.local_redis.server import free_port

pytestmark = [pytest.mark.timeout(400), pytest.mark.slow]

HYPOTHESIS_ENTRIES = 3_000
RANDOM_ENTRIES = 7_000
VALID_REQUESTS = 200

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats() | st.text(max_size=40),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
messages = st.lists(
    st.fixed_dictionaries(
        {
            "role": st.sampled_from(["user", "system", "assistant", "tool", "root", ""]),
            "content": st.text(max_size=60),
        },
        optional={"name": json_values},
    ),
    max_size=4,
)
bodies = st.fixed_dictionaries(
    {},
    optional={
        "messages": messages | json_values,
        "prompt": st.text(max_size=80) | json_values,
        "max_tokens": st.integers(-5, 10_000) | json_values,
        "temperature": st.floats() | json_values,
        "top_p": st.floats(),
        "stop": st.lists(st.text(max_size=80), max_size=12) | json_values,
        "stream": json_values,
        "priority": st.sampled_from(["interactive", "batch", "urgent"]),
        "deadline_ms": st.integers(-(2**40), 2**45),
        "reply_to": st.text(max_size=300) | st.just("llm:requests") | st.just("other:key"),
        "metadata": json_values,
        "junk": json_values,
        # The sampling extras: huge numbers, wrong types, foreign keys, schemas of any shape.
        "n": st.integers(-(2**63), 2**63 - 1) | json_values,
        "logprobs": json_values,
        "top_logprobs": st.integers(-5, 50) | json_values,
        "presence_penalty": st.floats() | json_values,
        "repetition_penalty": st.floats() | json_values,
        "logit_bias": st.dictionaries(st.text(max_size=12), st.floats() | json_values, max_size=5)
        | json_values,
        "min_tokens": st.integers(-(2**63), 2**63 - 1),
        "stop_token_ids": st.lists(st.integers(-(2**63), 2**63 - 1), max_size=5) | json_values,
        "ignore_eos": json_values,
        # The affinity key: any text (control, non-ASCII, past its 128 characters) or any other type.
        "session": st.text(max_size=200) | st.just("s" * 5000) | json_values,
        "response_format": st.fixed_dictionaries(
            {"type": st.sampled_from(["text", "json_object", "json_schema", "regex", "xml"])},
            optional={"json_schema": json_values, "regex": st.text(max_size=40) | json_values},
        ) | json_values,
    },
)
entries = st.fixed_dictionaries(
    {
        "body": bodies,
        "with_id": st.booleans(),
        "encoding": st.sampled_from(["json", "msgpack", "raw"]),
        "raw": st.binary(max_size=200),
        "v": st.sampled_from([b"1", b"2", b"", b"\xff\xfe", b"1.0", None]),
        "ct": st.sampled_from([b"json", b"msgpack", b"xml", b"", b"\xc3\x28", None]),
        "extra": st.dictionaries(st.binary(min_size=1, max_size=10), st.binary(max_size=50), max_size=3),
    }
)


def build_fields(spec: dict[str, Any], rid: str | None) -> dict[bytes, bytes]:
    body = dict(spec["body"])
    if rid is not None:
        body["id"] = rid
    if spec["encoding"] == "json":
        raw = json.dumps(body).encode()
    elif spec["encoding"] == "msgpack":
        raw = msgpack.packb(body)
    else:
        raw = spec["raw"]
    fields: dict[bytes, bytes] = dict(spec["extra"])
    if spec["v"] is not None:
        fields[b"v"] = spec["v"]
    if spec["ct"] is not None:
        fields[b"ct"] = spec["ct"]
    fields[b"body"] = raw
    return fields


def random_fields(rng: random.Random, n: int) -> dict[bytes, bytes]:
    """Random bytes in every shape: garbage, huge, invalid UTF-8, deep nesting, half-valid envelopes."""
    kind = rng.randrange(6)
    if kind == 0:
        return {
            rng.randbytes(rng.randint(1, 20)): rng.randbytes(rng.randint(0, 300))
            for _ in range(rng.randint(1, 5))
        }
    if kind == 1:
        return {
            b"v": b"1",
            b"ct": rng.choice([b"json", b"msgpack"]),
            b"body": rng.randbytes(rng.randint(0, 2000)),
        }
    if kind == 2:
        depth = rng.randint(100, 100_000)
        return {b"v": b"1", b"ct": b"json", b"body": b"[" * depth + b"]" * rng.choice([0, depth])}
    if kind == 3:
        size = rng.choice([300_000, 1_100_000]) if n % 1000 == 0 else rng.randint(0, 5000)
        return {b"v": b"1", b"ct": b"json", b"body": b'{"prompt":"' + b"\xff" * size + b'"}'}
    if kind == 4:
        return {b"v": b"1", b"ct": b"msgpack", b"body": bytes([0xDC, 0xFF, 0xFF]) + rng.randbytes(50)}
    return {b"v": rng.randbytes(3), b"body": rng.randbytes(rng.randint(0, 100))}


ANONYMOUS = "valid, id generated by the worker"


def expected_reply_key(fields: dict[bytes, bytes], prefix: str) -> str | None:
    """Where the worker must answer this entry, None when it must dead-letter it, or ANONYMOUS."""
    try:
        request, _ = decode_request(fields, prefix)
    except ProtocolError as exc:
        return exc.reply_to if exc.request_id else None
    if not request.id.startswith("fz"):
        return ANONYMOUS  # a valid body without `id`: the worker answers on a channel named by its own id
    key = request.reply_key(prefix)
    return key if reply_key_allowed(key, prefix) else reply_stream(request.id, prefix)


def test_fuzzed_entries_never_kill_the_worker(
    start_worker, redis_client: redis.Redis, chat_client: ChatClient, prefix: str
) -> None:
    stream = f"{prefix}:requests"
    metrics_port = free_port()
    worker = start_worker("echo", read_count=256, metrics_port=metrics_port)
    fuzz: list[dict[bytes, bytes]] = []

    @settings(
        max_examples=HYPOTHESIS_ENTRIES,
        database=None,
        derandomize=True,
        deadline=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(entries)
    def collect(spec: dict[str, Any]) -> None:
        rid = f"fz{len(fuzz)}" if spec["with_id"] else None
        fuzz.append(build_fields(spec, rid))

    collect()
    rng = random.Random(20240501)
    fuzz += [random_fields(rng, i) for i in range(RANDOM_ENTRIES)]
    rng.shuffle(fuzz)
    valid: dict[str, str] = {}
    entry_ids: list[bytes] = []
    step = len(fuzz) // VALID_REQUESTS
    for start in range(0, len(fuzz), step):
        pipe = redis_client.pipeline(transaction=False)
        for fields in fuzz[start : start + step]:
            pipe.xadd(stream, fields)
        entry_ids += pipe.execute()
        text = f"valid {start}"
        valid[
            chat_client.submit(
                [{"role": "user", "content": text}],
                max_tokens=8,
                content_type=rng.choice(["json", "msgpack"]),
            )
        ] = text
    for rid, text in valid.items():
        assert chat_client.result(rid, timeout_s=120).text == text
    deadline = time.monotonic() + 120
    while redis_client.xpending(stream, "workers")["pending"] or redis_client.xinfo_groups(stream)[0]["lag"]:
        assert time.monotonic() < deadline, "the worker stopped consuming"
        time.sleep(0.2)
    answered_keys: list[str] = []
    to_dead: set[bytes] = set()
    anonymous = 0
    for entry_id, fields in zip(entry_ids, fuzz, strict=True):
        key = expected_reply_key(fields, prefix)
        if key is None:
            to_dead.add(entry_id)
        elif key == ANONYMOUS:
            anonymous += 1
        else:
            answered_keys.append(key)
    pipe = redis_client.pipeline(transaction=False)
    for key in answered_keys:
        pipe.xrange(key)
    finals_per_key = []
    for entries_ in pipe.execute():
        bodies_ = [
            msgpack.unpackb(f[b"body"]) if f[b"ct"] == b"msgpack" else json.loads(f[b"body"])
            for _, f in entries_
        ]
        finals_per_key.append(sum(b["type"] != "token" for b in bodies_))
    dead = {f[b"entry"] for _, f in redis_client.xrange(f"{prefix}:dead")}
    crashes = int(worker.proc.poll() is not None)
    print(
        f"\nFUZZ entries={len(fuzz)} valid_requests={len(valid)} answered_with_id={len(answered_keys)} "
        f"valid_without_id={anonymous} dead_lettered={len(dead)} unanswered={finals_per_key.count(0)} "
        f"duplicate_finals={sum(n > 1 for n in finals_per_key)} crashes={crashes} "
        f"undecodable={len(worker.events('request_undecodable'))}"
    )
    assert crashes == 0
    assert all(n == 1 for n in finals_per_key)
    assert dead == to_dead
    assert not redis_client.exists("other:key") and redis_client.xlen(stream) > 0
    # The metrics saw the same run, and no value from an entry became a label: the only tenant is `none`.
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as resp:
        samples = {
            line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
            for line in resp.read().decode().splitlines()
            if line.startswith("llm_")
        }
    assert samples["llm_dead_letters_total"] == len(dead)
    requests = {name: v for name, v in samples.items() if name.startswith("llm_requests_total{")}
    assert sum(requests.values()) >= len(valid)
    assert all(name.endswith('tenant="none"}') for name in requests)
