"""The gateway's pure parts, in process: keys file, error mapping, chunk templates."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from producer.gateway.api_keys import KeyRing, KeysFileError, hash_key, with_credentials
from producer.gateway.errors import WIRE_ERRORS, from_wire, param_path
from producer.gateway.openai_schema import (
    ChatCompletionChunk,
    ChunkChoice,
    Completion,
    CompletionChoice,
    Delta,
)
from producer.gateway.translate import ChatRenderer, CompletionRenderer
from producer.wire.models import ErrorCode


def entry(key: str, tenant: str = "alice", **creds: str) -> dict:
    return {
        "key_sha256": hash_key(key),
        "tenant": tenant,
        **(creds or {"redis_user": "u", "redis_password": "p"}),
    }


def test_every_wire_error_code_has_an_http_status() -> None:
    expected = {
        ErrorCode.INVALID_REQUEST: 400, ErrorCode.TOO_LONG: 400, ErrorCode.OVERLOADED: 429,
        ErrorCode.DEADLINE_EXCEEDED: 504, ErrorCode.CANCELLED: 500, ErrorCode.INTERNAL: 500,
    }  # fmt: skip
    assert {code: WIRE_ERRORS[code][0] for code in ErrorCode} == expected
    too_long = from_wire(ErrorCode.TOO_LONG, "prompt of 5000 tokens", 1)
    assert (too_long.status, too_long.code, too_long.headers) == (400, "context_length_exceeded", {})
    assert from_wire(ErrorCode.OVERLOADED, "busy", 3).headers == {"Retry-After": "3"}
    assert set(too_long.body()["error"]) == {"message", "type", "param", "code"}


def test_param_paths_are_written_as_openai_writes_them() -> None:
    assert param_path(("messages", 0, "content", 2, "text")) == "messages[0].content[2].text"
    assert param_path(("stop", 1)) == "stop[1]"
    assert param_path(()) is None


@pytest.mark.parametrize("form", ["jsonl", "array", "object"])
def test_a_keys_file_in_each_form_maps_keys_to_tenants(tmp_path: Path, form: str) -> None:
    entries = [
        entry("sk-a1"),
        entry("sk-a2"),
        entry("sk-b", "bob", redis_url="redis://bob:pw@redis:6379/0"),
    ]
    path = tmp_path / "keys"
    if form == "jsonl":
        path.write_text("# keys\n\n" + "\n".join(json.dumps(e) for e in entries))
    else:
        path.write_text(json.dumps(entries if form == "array" else {"keys": entries}))
    ring = KeyRing.load(path)
    assert sorted(ring.tenants) == ["alice", "bob"]
    assert ring.lookup("sk-a2").tenant == "alice"  # type: ignore[union-attr]
    assert ring.lookup("sk-b").tenant == "bob"  # type: ignore[union-attr]
    assert ring.lookup("sk-a") is None and ring.lookup("") is None
    assert ring.tenants["alice"].url("redis://gw:secret@redis:6380/2") == "redis://u:p@redis:6380/2"
    assert ring.tenants["bob"].url("redis://ignored") == "redis://bob:pw@redis:6379/0"


@pytest.mark.parametrize(
    ("entries", "problem"),
    [
        ([{"key_sha256": "abc", "tenant": "alice", "redis_user": "u", "redis_password": "p"}], "key_sha256"),
        ([entry("k", "no spaces")], "tenant"),
        ([entry("k", redis_user="u")], "redis_user and redis_password"),
        ([entry("k", redis_url="http://x")], "redis_url"),
        ([{**entry("k"), "extra": 1}], "unknown field"),
        ([entry("k"), entry("k")], "same key_sha256"),
        ([entry("k1"), entry("k2", redis_user="other", redis_password="p")], "different Redis credentials"),
        ([], "no key"),
    ],
)
def test_a_bad_keys_file_says_what_is_wrong(tmp_path: Path, entries: list, problem: str) -> None:
    path = tmp_path / "keys.json"
    path.write_text(json.dumps(entries))
    with pytest.raises(KeysFileError, match=problem):
        KeyRing.load(path)


def test_credentials_replace_those_of_the_url() -> None:
    assert (
        with_credentials("redis://127.0.0.1:6379/0", "a@b", "p:w") == "redis://a%40b:p%3Aw@127.0.0.1:6379/0"
    )
    assert with_credentials("rediss://old:pw@h/1", "new", "x") == "rediss://new:x@h/1"


def test_the_content_chunk_template_renders_what_the_model_does() -> None:
    chat = ChatRenderer("rid-1", "echo")
    for text in ("plain", 'quote " and \\ backslash', "ünïcödé ✓", "\n\t", ""):
        model = ChatCompletionChunk(
            id="chatcmpl-rid-1",
            created=chat.created,
            model="echo",
            choices=[ChunkChoice(delta=Delta(content=text))],
        )
        expected = json.loads(
            model.model_dump_json(exclude={"usage": True, "choices": {0: {"delta": {"role"}}}})
        )
        assert json.loads(chat.content(text)) == expected
    completion = CompletionRenderer("rid-2", "echo")
    model_c = Completion(
        id="cmpl-rid-2", created=completion.created, model="echo", choices=[CompletionChoice(text="x")]
    )
    assert json.loads(completion.content("x")) == json.loads(model_c.model_dump_json(exclude={"usage"}))
    assert json.loads(chat.finish("stop"))["choices"][0] == {
        "index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"
    }  # fmt: skip


def test_a_long_outage_logs_its_read_retries_once_per_interval() -> None:
    """Every retry of a reply read is counted; the log gets the first at once, not one line per retry."""
    import asyncio

    import redis.asyncio as aioredis
    from redis.asyncio.retry import Retry
    from redis.backoff import NoBackoff
    from structlog.testing import capture_logs

    from producer.gateway.reply_mux import RETRY_LOG_EVERY_S, ReplyMux
    from worker.local_redis.server import free_port

    async def run() -> tuple[ReplyMux, list[dict]]:
        # Nothing listens there; no retries inside redis-py, so each failed read reaches the multiplexer.
        dead = aioredis.Redis(port=free_port(), socket_connect_timeout=0.2, retry=Retry(NoBackoff(), 0))
        mux = ReplyMux(
            dead, lambda *a: None, block_ms=100, max_reads=2, backoff_initial_ms=5, backoff_max_ms=5
        )
        with capture_logs() as logs:
            mux.open("a", "p:reply:a")
            await asyncio.sleep(0.6)
            await mux.aclose()
        return mux, logs

    mux, logs = asyncio.run(run())
    retries = [e for e in logs if e["event"] == "gateway_reply_read_retry"]
    assert RETRY_LOG_EVERY_S > 0.6 and mux.reads >= 5, mux.reads  # many failed reads...
    assert len(retries) == 1 and retries[0]["retries"] == 1  # ...one line: the outage's first retry
