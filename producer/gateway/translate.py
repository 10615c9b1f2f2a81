"""OpenAI requests -> wire request parameters, and wire reply events -> OpenAI responses and stream chunks.

Requests: `chat_params` / `completion_params` give what `AsyncChatClient.prepare` takes (messages or
prompt, and the wire's `ChatRequest` fields); a wire field's error is reported under the name the
caller used (`wire_names`). Replies: a `Renderer` turns events into the JSON of `chat.completion`,
`chat.completion.chunk` or `text_completion` objects; content chunks, the bulk of a stream, are
written from a template rendered once per request from the same pydantic models (chunks with
logprobs, or of a choice other than the first, are rendered from the models).

Logprobs: a token's `token` is its text when the worker gives it, else `token_id:<id>` (as vLLM's
`return_tokens_as_token_ids` writes it), and its `bytes` then null.
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
    ChoiceLogprobs,
    ChunkChoice,
    Completion,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    Delta,
    PromptTokensDetails,
    TokenLogprob,
    TopLogprob,
    Usage,
)
from producer.gateway.settings import GatewaySettings
from producer.wire import models as wire

COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
COMPLETIONS_MAX_LOGPROBS = 5  # the legacy API's limit of `logprobs`
# Fields passed to the wire as they are, when set.
PASSED = (
    "top_p", "top_k", "seed", "priority", "n", "presence_penalty", "frequency_penalty", "repetition_penalty",
    "min_tokens", "stop_token_ids", "ignore_eos", "session",
)  # fmt: skip


def _sampling(req: ChatCompletionRequest | CompletionRequest, settings: GatewaySettings) -> dict[str, Any]:
    """The wire fields both endpoints share (unset fields are left to the wire's defaults)."""
    params: dict[str, Any] = {
        "temperature": settings.default_temperature if req.temperature is None else req.temperature,
        "stream": bool(req.stream),
    }
    for name in PASSED:
        value = getattr(req, name)
        if value is not None:
            params[name] = value
    if req.stop is not None:
        params["stop"] = [req.stop] if isinstance(req.stop, str) else req.stop
    if req.logit_bias:
        params["logit_bias"] = req.logit_bias
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
    if req.logprobs:
        params["logprobs"] = True
    if req.top_logprobs:
        if not req.logprobs:
            raise ApiError(
                400,
                "Invalid 'top_logprobs': only allowed when 'logprobs' is true.",
                code="invalid_value",
                param="top_logprobs",
            )
        params["top_logprobs"] = req.top_logprobs
    if req.response_format is not None and req.response_format != {"type": "text"}:
        params["response_format"] = req.response_format
    return params


def completion_params(req: CompletionRequest, settings: GatewaySettings) -> dict[str, Any]:
    check_common(req)
    params = _sampling(req, settings)
    params["max_tokens"] = COMPLETIONS_DEFAULT_MAX_TOKENS if req.max_tokens is None else req.max_tokens
    if req.logprobs is not None:
        if not 0 <= req.logprobs <= COMPLETIONS_MAX_LOGPROBS:
            raise ApiError(
                400,
                f"Invalid 'logprobs': an integer from 0 to {COMPLETIONS_MAX_LOGPROBS} expected.",
                code="invalid_value",
                param="logprobs",
            )
        # The sampled token's logprob always, and that many most likely tokens with theirs.
        params.update(logprobs=True, top_logprobs=req.logprobs)
    return params


def completion_prompt(req: CompletionRequest) -> str:
    return req.prompt if isinstance(req.prompt, str) else req.prompt[0]


def wire_names(req: ChatCompletionRequest | CompletionRequest) -> dict[str, str]:
    """Wire field -> the request field it came from, to name it in a 400."""
    names = {"metadata": "user", "timeout_ms": "timeout_ms"}
    if isinstance(req, ChatCompletionRequest) and req.max_completion_tokens is not None:
        names["max_tokens"] = "max_completion_tokens"
    if isinstance(req, CompletionRequest):
        names["top_logprobs"] = "logprobs"
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


def token_text(lp: wire.Logprob | wire.TopLogprob) -> str:
    return lp.token if lp.token is not None else f"token_id:{lp.token_id}"


def token_bytes(lp: wire.Logprob | wire.TopLogprob) -> list[int] | None:
    return None if lp.token is None else list(lp.token.encode())


def chat_logprobs(logprobs: list[wire.Logprob] | None) -> ChoiceLogprobs | None:
    """A chat choice's `logprobs` (`{"content": [...]}`) from the wire's."""
    if logprobs is None:
        return None
    return ChoiceLogprobs(
        content=[
            TokenLogprob(
                token=token_text(lp), logprob=lp.logprob, bytes=token_bytes(lp),
                top_logprobs=[
                    TopLogprob(token=token_text(t), logprob=t.logprob, bytes=token_bytes(t)) for t in lp.top
                ],
            )
            for lp in logprobs
        ]
    )  # fmt: skip


def completion_logprobs(logprobs: list[wire.Logprob] | None, offset: int = 0) -> CompletionLogprobs | None:
    """A completion choice's legacy `logprobs` from the wire's; `offset`: where the first token starts."""
    if logprobs is None:
        return None
    offsets: list[int] | None = []
    for lp in logprobs:
        if lp.token is None or offsets is None:
            offsets = None
            continue
        offsets.append(offset)
        offset += len(lp.token)
    return CompletionLogprobs(
        tokens=[token_text(lp) for lp in logprobs],
        token_logprobs=[lp.logprob for lp in logprobs],
        top_logprobs=[{token_text(t): t.logprob for t in lp.top} for lp in logprobs],
        text_offset=offsets,
    )


def choices_of(done: wire.DoneEvent) -> list[wire.Choice]:
    """Every choice of a final reply: its `choices` (`n` > 1), else the one it holds."""
    if done.choices is not None:
        return done.choices
    return [
        wire.Choice(
            index=0, text=done.text, finish_reason=done.finish_reason,
            completion_tokens=done.usage.completion_tokens, logprobs=done.logprobs,
        )
    ]  # fmt: skip


class Renderer:
    """The JSON of one request's response and chunks; subclasses give the object shapes.

    `n`: the choices the request asked for (each streamed chunk names its own, `index`).
    """

    prefix = ""

    def __init__(self, request_id: str, model: str, n: int = 1):
        self.id = f"{self.prefix}{request_id}"
        self.model = model
        self.n = n
        self.created = int(time.time())
        hole = json.dumps(f"content-{uuid.uuid4().hex}")
        head, found, tail = self._chunk(json.loads(hole), None).partition(hole)
        assert found, "the chunk template has no place for the content"
        self._head, self._tail = head, tail

    def content(self, text: str) -> str:
        """A chunk carrying `text` (the hot path: a template, no model built; non-ASCII escaped)."""
        return f"{self._head}{json.dumps(text)}{self._tail}"

    def piece(self, text: str, choice: int, logprobs: list[wire.Logprob] | None, offset: int) -> str:
        """A chunk carrying `text` of choice `choice`, with the logprobs of its tokens if any (`offset`:
        where the text starts in the choice's, for the completions' `text_offset`)."""
        return self._chunk(text, None, choice, logprobs, offset)

    def opening(self) -> list[str]:
        """Chunks sent before the first content."""
        return []

    def finish(self, finish_reason: str, choice: int = 0) -> str:
        return self._chunk(None, finish_reason, choice)

    def _chunk(
        self,
        text: str | None,
        finish_reason: str | None,
        choice: int = 0,
        logprobs: list[wire.Logprob] | None = None,
        offset: int = 0,
    ) -> str:
        raise NotImplementedError

    def usage(self, usage: wire.Usage) -> str:
        raise NotImplementedError

    def whole(self, done: wire.DoneEvent) -> str:
        raise NotImplementedError


class ChatRenderer(Renderer):
    prefix = "chatcmpl-"

    def _chunk(
        self,
        text: str | None,
        finish_reason: str | None,
        choice: int = 0,
        logprobs: list[wire.Logprob] | None = None,
        offset: int = 0,
    ) -> str:
        delta = Delta() if text is None else Delta(content=text)
        return self._chunk_of(delta, finish_reason, choice, logprobs)

    def _chunk_of(
        self,
        delta: Delta,
        finish_reason: str | None,
        choice: int = 0,
        logprobs: list[wire.Logprob] | None = None,
    ) -> str:
        """A chunk whose delta shows only the fields set (OpenAI sends `role` in the first one only)."""
        item = ChunkChoice(
            index=choice, delta=delta, logprobs=chat_logprobs(logprobs), finish_reason=finish_reason
        )
        chunk = ChatCompletionChunk(id=self.id, created=self.created, model=self.model, choices=[item])
        unset = {name for name in ("role", "content") if getattr(delta, name) is None}
        return chunk.model_dump_json(exclude={"usage": True, "choices": {0: {"delta": unset}}})

    def opening(self) -> list[str]:
        return [self._chunk_of(Delta(role="assistant", content=""), None, i) for i in range(self.n)]

    def finish(self, finish_reason: str, choice: int = 0) -> str:
        # OpenAI's last choice chunk: an empty delta and the finish reason.
        return self._chunk_of(Delta(), finish_reason, choice)

    def usage(self, usage: wire.Usage) -> str:
        chunk = ChatCompletionChunk(
            id=self.id, created=self.created, model=self.model, choices=[], usage=usage_of(usage)
        )
        return chunk.model_dump_json()

    def whole(self, done: wire.DoneEvent) -> str:
        choices = [
            ChatChoice(
                index=c.index, message=ChatMessageOut(content=c.text), logprobs=chat_logprobs(c.logprobs),
                finish_reason=c.finish_reason,
            )
            for c in choices_of(done)
        ]  # fmt: skip
        return ChatCompletion(
            id=self.id, created=self.created, model=self.model, choices=choices, usage=usage_of(done.usage)
        ).model_dump_json()


class CompletionRenderer(Renderer):
    prefix = "cmpl-"

    def _chunk(
        self,
        text: str | None,
        finish_reason: str | None,
        choice: int = 0,
        logprobs: list[wire.Logprob] | None = None,
        offset: int = 0,
    ) -> str:
        item = CompletionChoice(
            index=choice, text=text or "", logprobs=completion_logprobs(logprobs, offset),
            finish_reason=finish_reason,
        )  # fmt: skip
        chunk = Completion(id=self.id, created=self.created, model=self.model, choices=[item])
        return chunk.model_dump_json(exclude={"usage"})

    def usage(self, usage: wire.Usage) -> str:
        chunk = Completion(
            id=self.id, created=self.created, model=self.model, choices=[], usage=usage_of(usage)
        )
        return chunk.model_dump_json()

    def whole(self, done: wire.DoneEvent) -> str:
        choices = [
            CompletionChoice(
                index=c.index, text=c.text, logprobs=completion_logprobs(c.logprobs),
                finish_reason=c.finish_reason,
            )
            for c in choices_of(done)
        ]  # fmt: skip
        return Completion(
            id=self.id, created=self.created, model=self.model, choices=choices, usage=usage_of(done.usage)
        ).model_dump_json()
