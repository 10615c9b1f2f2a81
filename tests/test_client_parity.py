"""The sync and async clients behave the same; the echo engine treats `stop` like the model engines."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from producer.client import AsyncChatClient, AsyncReplyStream, ChatClient, ChatError, ChatTimeout, Reply
from producer.wire.models import ErrorCode, TokenEvent

pytestmark = pytest.mark.timeout(120)

BATCH: list[dict[str, Any]] = [
    *({"prompt": f"doc {i} body", "max_tokens": 8, "stream": i % 2 == 0} for i in range(12)),
    {"messages": [{"role": "user", "content": "last one"}], "max_tokens": 1},
    {"prompt": "late", "deadline_ms": 1},
    {"prompt": "cut here STOP never", "stop": ["STOP"]},
]


def _summary(ids: list[str | ChatError], replies: dict[str, Reply | ChatError]) -> list[tuple[str, str]]:
    out = []
    for rid in ids:
        assert isinstance(rid, str)
        r = replies[rid]
        out.append((r.text, r.finish_reason) if isinstance(r, Reply) else ("error", r.code.value))
    return out


def test_async_stream_yields_tokens_then_sets_reply(start_worker, redis_url: str, prefix: str) -> None:
    start_worker("echo")

    async def main() -> tuple[list[TokenEvent], Reply | None, str | None, str | None]:
        async with AsyncChatClient(redis_url, prefix=prefix, timeout_s=60) as client:
            stream = client.stream([{"role": "user", "content": "a b c d e f g"}], max_tokens=32)
            assert isinstance(stream, AsyncReplyStream) and stream.id is None  # nothing sent yet
            tokens = [t async for t in stream]
            awaited = await client.stream(prompt="one two", max_tokens=8)  # sent now: its id is known
            sent_id = awaited.id
            assert sent_id is not None and [t.text async for t in awaited] == ["one", " two"]
            assert awaited.reply is not None and awaited.reply.id == sent_id
            return tokens, stream.reply, stream.id, sent_id

    tokens, reply, request_id, _ = asyncio.run(main())
    assert all(isinstance(t, TokenEvent) for t in tokens)
    assert [t.index for t in tokens] == list(range(7))
    assert reply is not None and reply.id == request_id and reply.finish_reason == "stop"
    assert "".join(t.text for t in tokens) == reply.text == "a b c d e f g"


def test_async_stream_raises_the_error_reply(start_worker, redis_url: str, prefix: str) -> None:
    start_worker("echo")

    async def main() -> AsyncReplyStream:
        async with AsyncChatClient(redis_url, prefix=prefix, timeout_s=60) as client:
            stream = client.stream([{"role": "user", "content": "late"}], deadline_ms=1)
            with pytest.raises(ChatError) as info:
                async for _ in stream:
                    pass
            assert info.value.code == ErrorCode.DEADLINE_EXCEEDED and info.value.request_id == stream.id
            with pytest.raises(ValueError):  # validated before anything is sent, as `ChatClient.stream`
                client.stream([{"role": "user", "content": "x"}], max_tokens=0)
            return stream

    assert asyncio.run(main()).reply is None


def test_submit_many_and_results_agree_between_clients(
    start_worker, redis_url: str, prefix: str, chat_client: ChatClient
) -> None:
    start_worker("echo")
    sync_ids = chat_client.submit_many(BATCH)
    sync = _summary(sync_ids, chat_client.results([i for i in sync_ids if isinstance(i, str)], timeout_s=60))

    async def main() -> tuple[list[str | ChatError], list[tuple[str, str]]]:
        async with AsyncChatClient(redis_url, prefix=prefix, timeout_s=60) as client:
            ids = await client.submit_many(BATCH)
            replies = await client.results([i for i in ids if isinstance(i, str)])
            return ids, _summary(ids, replies)

    async_ids, got = asyncio.run(main())
    assert len(set(async_ids) | set(sync_ids)) == 2 * len(BATCH)  # fresh ids per call
    assert got == sync == [
        *((f"doc {i} body", "stop") for i in range(12)),
        ("last", "length"),
        ("error", "deadline_exceeded"),
        ("cut here ", "stop"),
    ]


def test_submit_many_refuses_over_the_backlog_limit_on_both_clients(redis_url: str, prefix: str) -> None:
    # No worker: the group's backlog only grows, so the third request of each batch is refused.
    requests = [{"prompt": f"p{i}"} for i in range(3)]
    with ChatClient(redis_url, prefix=prefix, max_backlog_requests=2) as client:
        sync = client.submit_many(requests)

    async def main() -> list[str | ChatError]:
        async with AsyncChatClient(redis_url, prefix=prefix, max_backlog_requests=4) as client:
            return await client.submit_many(requests)

    got = asyncio.run(main())
    for out in (sync, got):
        assert [type(x) for x in out] == [str, str, ChatError]
        refused = out[2]
        assert isinstance(refused, ChatError) and refused.code == ErrorCode.OVERLOADED


def test_results_time_out_on_both_clients(redis_url: str, prefix: str) -> None:
    with ChatClient(redis_url, prefix=prefix, reply_block_ms=100) as client:
        (rid,) = client.submit_many([{"prompt": "nobody serves this"}])
        assert isinstance(rid, str)
        with pytest.raises(ChatTimeout) as info:
            client.results([rid], timeout_s=0.5)
        assert info.value.request_id == rid

    async def main() -> str:
        async with AsyncChatClient(redis_url, prefix=prefix, reply_block_ms=100) as client:
            (arid,) = await client.submit_many([{"prompt": "nobody serves this either"}])
            assert isinstance(arid, str)
            with pytest.raises(ChatTimeout) as ainfo:
                await client.results([arid], timeout_s=0.5)
            assert ainfo.value.request_id == arid
            return arid

    asyncio.run(main())


@pytest.mark.parametrize(
    ("stop", "max_tokens", "text", "finish_reason"),
    [
        (["STOP"], 16, "alpha beta ", "stop"),
        (["ta ST", "gamma"], 16, "alpha be", "stop"),  # a stop string across words, the first one found
        (["gamma"], 3, "alpha beta STOP", "length"),  # max_tokens comes first
        (["zzz"], 16, "alpha beta STOP gamma", "stop"),  # no stop string: the whole echo
    ],
)
def test_echo_honours_stop_strings(
    start_worker, chat_client: ChatClient, stop: list[str], max_tokens: int, text: str, finish_reason: str
) -> None:
    start_worker("echo")
    messages = [{"role": "user", "content": "alpha beta STOP gamma"}]
    reply = chat_client.chat(messages, max_tokens=max_tokens, stop=stop)
    assert (reply.text, reply.finish_reason) == (text, finish_reason)
    stream = chat_client.stream(messages, max_tokens=max_tokens, stop=stop)
    tokens = [t.text for t in stream]
    assert stream.reply is not None
    assert (stream.reply.text, stream.reply.finish_reason) == (text, finish_reason)
    assert "".join(tokens) == text  # no part of a stop string was ever streamed
