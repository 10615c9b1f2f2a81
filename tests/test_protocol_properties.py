"""Every entry shape either decodes to a request the worker can serve or is refused with a code.

The real decoding path (`decode_request`) and the arithmetic the worker does on a decoded request
(deadline in seconds, reply key, metadata size) are fed generated msgpack and JSON bodies of every
shape: huge integers, NaN, bytes keys and values, deep lists, wrong types in every field.
"""

from __future__ import annotations

import json
import time
from typing import Any

import msgpack
from hypothesis import given, settings
from hypothesis import strategies as st

from producer.wire.codec import ProtocolError, decode_request
from producer.wire.models import ChatRequest, now_ms

PREFIX = "llm"

scalars = (
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20) | st.binary(max_size=20)
)
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4)
    | st.dictionaries(st.text(max_size=6) | st.binary(max_size=6) | st.integers(), inner, max_size=4),
    max_leaves=16,
)
# Every field of the request model, so a field added to the wire is garbled here too.
FIELDS = list(ChatRequest.model_fields)
# A valid request with at most two fields replaced by anything, so that most bodies are served
# and the fields' edge values (not only their refusals) reach the worker's arithmetic.
garbled = st.dictionaries(st.sampled_from(FIELDS), values, max_size=2)
deadlines = st.integers(0, 2**64) | st.integers(10**300, 10**400) | st.integers(-(2**64), -1)
bodies = st.builds(
    lambda extra, deadline: {"prompt": "hi", "max_tokens": 4, **extra, **deadline},
    garbled,
    st.just({}) | deadlines.map(lambda d: {"deadline_ms": d}),
)


def encode(body: dict[str, Any], ct: str) -> bytes | None:
    try:
        if ct == "msgpack":
            return msgpack.packb(body)
        return json.dumps(body).encode()
    except (TypeError, ValueError, OverflowError):
        return None  # not representable in this encoding: no client can send it


def served_arithmetic(request: ChatRequest) -> None:
    """What the worker computes from an accepted request before it reaches the engine."""
    deadline = request.deadline_epoch_ms(now_ms())
    if deadline is not None:
        time.monotonic() + (deadline - now_ms()) / 1000
    assert isinstance(request.reply_key(PREFIX), str)
    json.dumps(request.metadata)
    json.dumps(request.model_dump(mode="json"))


@settings(max_examples=400, deadline=None)
@given(body=bodies, ct=st.sampled_from(["msgpack", "json"]))
def test_any_body_is_served_or_refused_with_a_code(body: dict[str, Any], ct: str) -> None:
    raw = encode(body, ct)
    if raw is None:
        return
    try:
        request, _ = decode_request({b"v": b"1", b"ct": ct.encode(), b"body": raw}, PREFIX)
    except ProtocolError as exc:
        assert exc.code.value in {"invalid_request", "too_long"}
        return
    served_arithmetic(request)


def test_the_entries_that_stopped_workers_are_refused_or_served() -> None:
    huge = json.dumps({"id": "a", "prompt": "hi", "deadline_ms": int("9" * 320)}).encode()
    try:
        decode_request({b"v": b"1", b"ct": b"json", b"body": huge}, PREFIX)
        raise AssertionError("a 320-digit deadline must be refused")
    except ProtocolError as exc:
        assert exc.request_id == "a" and "deadline_ms" in exc.message
    nested_bytes_key = msgpack.packb({"id": "b", "prompt": "hi", "metadata": {"m": {b"k": b"v"}}})
    try:
        request, _ = decode_request({b"v": b"1", b"ct": b"msgpack", b"body": nested_bytes_key}, PREFIX)
    except ProtocolError as exc:
        assert exc.request_id == "b"
    else:
        served_arithmetic(request)
