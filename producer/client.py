"""What a chatbot backend imports: `ChatClient` (sync) and `AsyncChatClient` (asyncio).

    client = ChatClient()                       # REDIS_URL or redis://127.0.0.1:6379/0
    reply = client.chat([{"role": "user", "content": "Hi"}], max_tokens=32)
    for tok in client.stream([...]): print(tok.text, end="")

Requests go to the stream `<prefix>:requests`; replies are read from the request's
own reply stream, from its beginning, so a late or reconnecting reader loses nothing.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import redis
import redis.asyncio as aioredis

from producer.protocol import (
    ChatRequest,
    ContentType,
    DoneEvent,
    ErrorCode,
    ErrorEvent,
    ReplyEvent,
    Timings,
    TokenEvent,
    Usage,
    decode_event,
    encode_request,
    requests_stream,
)
from producer.settings import ProducerSettings


class ChatError(Exception):
    """The service answered with an `error` reply; `code` is one of `ErrorCode`."""

    def __init__(self, code: ErrorCode | str, message: str, request_id: str | None = None):
        super().__init__(f"{code}: {message}")
        self.code = ErrorCode(code) if not isinstance(code, ErrorCode) else code
        self.message = message
        self.request_id = request_id


class ChatTimeout(TimeoutError):
    """No final reply arrived within the client's timeout."""

    def __init__(self, request_id: str, timeout_s: float):
        super().__init__(f"no reply to request {request_id} within {timeout_s:.1f} s")
        self.request_id = request_id
        self.timeout_s = timeout_s


@dataclass(frozen=True)
class Reply:
    """The final answer to one request."""

    id: str
    text: str
    finish_reason: str
    usage: Usage
    timings: Timings
    attempt: str

    @classmethod
    def from_event(cls, event: DoneEvent) -> Reply:
        return cls(event.id, event.text, event.finish_reason, event.usage, event.timings, event.attempt)


def build_request(messages: list[dict[str, str]] | None, prompt: str | None, params: dict[str, Any]) -> ChatRequest:
    """Validate a request locally before sending, so a bad call fails at the caller."""
    body: dict[str, Any] = dict(params)
    if messages is not None:
        body["messages"] = messages
    if prompt is not None:
        body["prompt"] = prompt
    return ChatRequest.model_validate(body)


def final_reply(event: ReplyEvent, request_id: str) -> Reply | None:
    """Turn a final event into a Reply, or raise its error; None for token events."""
    if isinstance(event, DoneEvent):
        return Reply.from_event(event)
    if isinstance(event, ErrorEvent):
        raise ChatError(event.code, event.message, request_id)
    return None


class ReplyStream:
    """Iterates a request's token events; `.reply` holds the final reply once iteration ends."""

    def __init__(self, client: ChatClient, request_id: str, timeout_s: float):
        self.id = request_id
        self.reply: Reply | None = None
        self._events = client.events(request_id, timeout_s=timeout_s)

    def __iter__(self) -> Iterator[TokenEvent]:
        for event in self._events:
            if isinstance(event, TokenEvent):
                yield event
                continue
            self.reply = final_reply(event, self.id)
            return


class ChatClient:
    """Synchronous client of the service."""

    def __init__(self, redis_url: str | None = None, *, client: redis.Redis | None = None,
                 settings: ProducerSettings | None = None, **overrides: Any):
        self.settings = settings or ProducerSettings(**({"redis_url": redis_url} if redis_url else {}), **overrides)
        self.redis = client or redis.Redis.from_url(
            self.settings.redis_url, socket_timeout=self.settings.reply_block_ms / 1000 + 10, socket_connect_timeout=5
        )
        self.stream_key = requests_stream(self.settings.prefix)
        self._reply_keys: dict[str, str] = {}

    def submit(self, messages: list[dict[str, str]] | None = None, *, prompt: str | None = None,
               content_type: ContentType | None = None, **params: Any) -> str:
        """Enqueue a request; returns its id (its replies go to `<prefix>:reply:<id>` unless `reply_to`)."""
        request = build_request(messages, prompt, params)
        self.redis.xadd(self.stream_key, encode_request(request, content_type or self.settings.content_type))  # type: ignore[arg-type]
        self._reply_keys[request.id] = request.reply_key(self.settings.prefix)
        return request.id

    def events(self, request_id: str, *, timeout_s: float | None = None, last_id: str = "0") -> Iterator[ReplyEvent]:
        """All reply events of a request, in order, until (and including) its final event."""
        key = self._reply_keys.get(request_id) or f"{self.settings.prefix}:reply:{request_id}"
        timeout_s = timeout_s or self.settings.timeout_s
        deadline = time.monotonic() + timeout_s
        while True:
            left_ms = int((deadline - time.monotonic()) * 1000)
            if left_ms <= 0:
                raise ChatTimeout(request_id, timeout_s)
            got = self.redis.xread({key: last_id}, block=min(left_ms, self.settings.reply_block_ms), count=256)
            for _, entries in got or []:
                for entry_id, fields in entries:
                    last_id = entry_id
                    event = decode_event(fields)
                    yield event
                    if not isinstance(event, TokenEvent):
                        self._reply_keys.pop(request_id, None)
                        return

    def result(self, request_id: str, *, timeout_s: float | None = None) -> Reply:
        """Wait for the final reply of a submitted request."""
        for event in self.events(request_id, timeout_s=timeout_s):
            reply = final_reply(event, request_id)
            if reply is not None:
                return reply
        raise ChatError(ErrorCode.INTERNAL, "reply stream ended without a final event", request_id)

    def chat(self, messages: list[dict[str, str]] | None = None, *, timeout_s: float | None = None,
             **params: Any) -> Reply:
        """Send a request and wait for its reply."""
        return self.result(self.submit(messages, **params), timeout_s=timeout_s)

    def stream(self, messages: list[dict[str, str]] | None = None, *, timeout_s: float | None = None,
               **params: Any) -> ReplyStream:
        """Send a request; iterate the result for token events, then read `.reply`."""
        params.setdefault("stream", True)
        return ReplyStream(self, self.submit(messages, **params), timeout_s or self.settings.timeout_s)

    def close(self) -> None:
        self.redis.close()

    def __enter__(self) -> ChatClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncChatClient:
    """asyncio twin of `ChatClient` (redis.asyncio)."""

    def __init__(self, redis_url: str | None = None, *, client: aioredis.Redis | None = None,
                 settings: ProducerSettings | None = None, **overrides: Any):
        self.settings = settings or ProducerSettings(**({"redis_url": redis_url} if redis_url else {}), **overrides)
        self.redis = client or aioredis.Redis.from_url(
            self.settings.redis_url, socket_timeout=self.settings.reply_block_ms / 1000 + 10, socket_connect_timeout=5
        )
        self.stream_key = requests_stream(self.settings.prefix)
        self._reply_keys: dict[str, str] = {}

    async def submit(self, messages: list[dict[str, str]] | None = None, *, prompt: str | None = None,
                     content_type: ContentType | None = None, **params: Any) -> str:
        request = build_request(messages, prompt, params)
        await self.redis.xadd(self.stream_key, encode_request(request, content_type or self.settings.content_type))  # type: ignore[arg-type]
        self._reply_keys[request.id] = request.reply_key(self.settings.prefix)
        return request.id

    async def events(self, request_id: str, *, timeout_s: float | None = None,
                     last_id: str = "0") -> AsyncIterator[ReplyEvent]:
        key = self._reply_keys.get(request_id) or f"{self.settings.prefix}:reply:{request_id}"
        timeout_s = timeout_s or self.settings.timeout_s
        deadline = time.monotonic() + timeout_s
        while True:
            left_ms = int((deadline - time.monotonic()) * 1000)
            if left_ms <= 0:
                raise ChatTimeout(request_id, timeout_s)
            got = await self.redis.xread({key: last_id}, block=min(left_ms, self.settings.reply_block_ms), count=256)
            for _, entries in got or []:
                for entry_id, fields in entries:
                    last_id = entry_id
                    event = decode_event(fields)
                    yield event
                    if not isinstance(event, TokenEvent):
                        self._reply_keys.pop(request_id, None)
                        return

    async def result(self, request_id: str, *, timeout_s: float | None = None) -> Reply:
        async for event in self.events(request_id, timeout_s=timeout_s):
            reply = final_reply(event, request_id)
            if reply is not None:
                return reply
        raise ChatError(ErrorCode.INTERNAL, "reply stream ended without a final event", request_id)

    async def chat(self, messages: list[dict[str, str]] | None = None, *, timeout_s: float | None = None,
                   **params: Any) -> Reply:
        return await self.result(await self.submit(messages, **params), timeout_s=timeout_s)

    async def stream(self, messages: list[dict[str, str]] | None = None, *, timeout_s: float | None = None,
                     **params: Any) -> AsyncIterator[TokenEvent | Reply]:
        """Yield token events, then the final `Reply` as the last item."""
        params.setdefault("stream", True)
        request_id = await self.submit(messages, **params)
        async for event in self.events(request_id, timeout_s=timeout_s):
            if isinstance(event, TokenEvent):
                yield event
            else:
                reply = final_reply(event, request_id)
                assert reply is not None
                yield reply

    async def aclose(self) -> None:
        await self.redis.aclose()

    async def __aenter__(self) -> AsyncChatClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
