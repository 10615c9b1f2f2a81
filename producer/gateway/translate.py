"""OpenAI requests -> wire request parameters, and wire reply events -> OpenAI responses and stream chunks.

Requests: `chat_params` / `completion_params` give what `AsyncChatClient.prepare` takes (messages or
prompt, and the wire's `ChatRequest` fields); a wire field's error is reported under the name the
caller used (`WIRE_NAMES`). Replies: a `Renderer` turns events into the JSON of `chat.completion`,
`chat.completion.chunk` or `text_completion` objects; content chunks, the bulk of a stream, are
written from a template rendered once per request from the same pydantic models.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

from producer.gateway.errors import ApiError
from producer.gateway.openai_schema import (
    ChatChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatMessageOut,
    ChunkChoice,
    Completion,
    CompletionChoice,
    CompletionRequest,
    Delta,
    PromptTokensDetails,
    Usage,
)
from producer.gateway.settings import GatewaySettings
from producer.wire import models as wire

COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions


def _sampling(req: ChatCompletionRequest | CompletionRequest, settings: GatewaySettings) -> dict[str, Any]:
    """The wire fields both endpoints share (unset fields are left to the wire's defaults)."""
    params: dict[str, Any] = {
        "temperature": settings.default_temperature if req.temperature is None else req.temperature,
        "stream": bool(req.stream),
    }
    if req.top_p is not None:
        params["top_p"] = req.top_p
    if req.top_k is not None:
        params["top_k"] = req.top_k
    if req.seed is not None:
        params["seed"] = req.seed
    if req.stop is not None:
        params["stop"] = [req.stop] if isinstance(req.stop, str) else req.stop
    if req.priority is not None:
        params["priority"] = req.priority
    if req.user is not None:
        params["metadata"] = {"user": req.user}
    return params


def check_common(req: ChatCompletionRequest | CompletionRequest) -> None:
    """400s that do not depend on the wire: later-work fields, stream_options without stream."""
    unsupported = req.unsupported()
    if unsupported is not None:
        raise ApiError(
            400,
            f"Unsupported parameter: '{unsupported}' is not supported by this server yet.",
            code="unsupported_parameter",
            param=unsupported,
        )
    if req.stream_options is not None and not req.stream:
        raise ApiError(
            400,
            "Invalid 'stream_options': only allowed when 'stream' is true.",
            code="invalid_value",
            param="stream_options",
        )


def chat_params(req: ChatCompletionRequest, settings: GatewaySettings) -> dict[str, Any]:
    check_common(req)
    params = _sampling(req, settings)
    if (
        req.max_tokens is not None
        and req.max_completion_tokens is not None
        and req.max_tokens != req.max_completion_tokens
    ):
        raise ApiError(
            400,
            "Invalid 'max_tokens': give max_tokens or max_completion_tokens, or both equal.",
            code="invalid_value",
            param="max_tokens",
        )
    limit = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    params["max_tokens"] = settings.default_max_tokens if limit is None else limit
    return params


def completion_params(req: CompletionRequest, settings: GatewaySettings) -> dict[str, Any]:
    check_common(req)
    params = _sampling(req, settings)
    params["max_tokens"] = COMPLETIONS_DEFAULT_MAX_TOKENS if req.max_tokens is None else req.max_tokens
    return params


def completion_prompt(req: CompletionRequest) -> str:
    return req.prompt if isinstance(req.prompt, str) else req.prompt[0]


def wire_names(req: ChatCompletionRequest | CompletionRequest) -> dict[str, str]:
    """Wire field -> the request field it came from, to name it in a 400."""
    names = {"metadata": "user", "timeout_ms": "timeout_ms"}
    if isinstance(req, ChatCompletionRequest) and req.max_completion_tokens is not None:
        names["max_tokens"] = "max_completion_tokens"
    return names


def usage_of(usage: wire.Usage) -> Usage:
    return Usage(
        prompt_tokens=usage.prompt_tokens,
        completion_tokens=usage.completion_tokens,
        total_tokens=usage.prompt_tokens + usage.completion_tokens,
        prompt_tokens_details=PromptTokensDetails(cached_tokens=usage.cached_tokens),
    )


def sse(data: str) -> bytes:
    return f"data: {data}\n\n".encode()


DONE = sse("[DONE]")


class Renderer:
    """The JSON of one request's response and chunks; subclasses give the object shapes."""

    prefix = ""

    def __init__(self, request_id: str, model: str):
        self.id = f"{self.prefix}{request_id}"
        self.model = model
        self.created = int(time.time())
        hole = json.dumps(f"content-{uuid.uuid4().hex}")
        head, found, tail = self._chunk(json.loads(hole), None).partition(hole)
        assert found, "the chunk template has no place for the content"
        self._head, self._tail = head, tail

    def content(self, text: str) -> str:
        """A chunk carrying `text` (the hot path: a template, no model built; non-ASCII escaped)."""
        return f"{self._head}{json.dumps(text)}{self._tail}"

    def opening(self) -> list[str]:
        """Chunks sent before the first content."""
        return []

    def finish(self, finish_reason: str) -> str:
        return self._chunk(None, finish_reason)

    def _chunk(self, text: str | None, finish_reason: str | None) -> str:
        raise NotImplementedError

    def usage(self, usage: wire.Usage) -> str:
        raise NotImplementedError

    def whole(self, done: wire.DoneEvent) -> str:
        raise NotImplementedError


class ChatRenderer(Renderer):
    prefix = "chatcmpl-"

    def _chunk(self, text: str | None, finish_reason: str | None) -> str:
        delta = Delta() if text is None else Delta(content=text)
        return self._chunk_of(delta, finish_reason)

    def _chunk_of(self, delta: Delta, finish_reason: str | None) -> str:
        """A chunk whose delta shows only the fields set (OpenAI sends `role` in the first one only)."""
        choice = ChunkChoice(delta=delta, finish_reason=finish_reason)
        chunk = ChatCompletionChunk(id=self.id, created=self.created, model=self.model, choices=[choice])
        unset = {name for name in ("role", "content") if getattr(delta, name) is None}
        return chunk.model_dump_json(exclude={"usage": True, "choices": {0: {"delta": unset}}})

    def opening(self) -> list[str]:
        return [self._chunk_of(Delta(role="assistant", content=""), None)]

    def finish(self, finish_reason: str) -> str:
        # OpenAI's last choice chunk: an empty delta and the finish reason.
        return self._chunk_of(Delta(), finish_reason)

    def usage(self, usage: wire.Usage) -> str:
        chunk = ChatCompletionChunk(
            id=self.id, created=self.created, model=self.model, choices=[], usage=usage_of(usage)
        )
        return chunk.model_dump_json()

    def whole(self, done: wire.DoneEvent) -> str:
        choice = ChatChoice(message=ChatMessageOut(content=done.text), finish_reason=done.finish_reason)
        return ChatCompletion(
            id=self.id, created=self.created, model=self.model, choices=[choice], usage=usage_of(done.usage)
        ).model_dump_json()


class CompletionRenderer(Renderer):
    prefix = "cmpl-"

    def _chunk(self, text: str | None, finish_reason: str | None) -> str:
        choice = CompletionChoice(text=text or "", finish_reason=finish_reason)
        chunk = Completion(id=self.id, created=self.created, model=self.model, choices=[choice])
        return chunk.model_dump_json(exclude={"usage"})

    def usage(self, usage: wire.Usage) -> str:
        chunk = Completion(
            id=self.id, created=self.created, model=self.model, choices=[], usage=usage_of(usage)
        )
        return chunk.model_dump_json()

    def whole(self, done: wire.DoneEvent) -> str:
        choice = CompletionChoice(text=done.text, finish_reason=done.finish_reason)
        return Completion(
            id=self.id, created=self.created, model=self.model, choices=[choice], usage=usage_of(done.usage)
        ).model_dump_json()
