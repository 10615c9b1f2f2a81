"""Request and reply bodies of wire contract v1, and the stable error codes.

A request body is a `ChatRequest`; each reply event is a `TokenEvent`, a `DoneEvent` or
an `ErrorEvent`. How they travel (stream fields, encodings, versions) is `codec.py`;
where they travel is `keys.py`. No Redis client is imported here.
"""

from __future__ import annotations

import json
import secrets
import time
from enum import Enum
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, JsonValue, StrictInt, StringConstraints, model_validator

from producer.wire.keys import DEFAULT_PREFIX, reply_stream
from producer.wire.limits import (
    MAX_BODY_BYTES,
    MAX_EPOCH_MS,
    MAX_KV_BUDGET_TOKENS,
    MAX_MESSAGES,
    MAX_METADATA_BYTES,
    MAX_STOP_SEQUENCES,
    MAX_TOKENS_CAP,
)


class ErrorCode(str, Enum):
    """Stable error codes of `error` replies; clients branch on these."""

    INVALID_REQUEST = "invalid_request"
    TOO_LONG = "too_long"
    OVERLOADED = "overloaded"
    DEADLINE_EXCEEDED = "deadline_exceeded"
    CANCELLED = "cancelled"
    INTERNAL = "internal"


def new_request_id() -> str:
    """An unguessable 128-bit id, hex encoded; it also names the reply channel."""
    return secrets.token_hex(16)


RequestId = Annotated[str, StringConstraints(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.:\-]+$")]
Role = Literal["system", "user", "assistant", "tool"]


class ChatMessage(BaseModel):
    """One OpenAI-style chat message."""

    model_config = ConfigDict(extra="forbid")

    role: Role
    content: Annotated[str, StringConstraints(max_length=MAX_BODY_BYTES)]


class ChatRequest(BaseModel):
    """Body of a request entry, version 1."""

    model_config = ConfigDict(extra="forbid")

    id: RequestId = Field(default_factory=new_request_id)
    messages: list[ChatMessage] | None = Field(default=None, min_length=1, max_length=MAX_MESSAGES)
    prompt: Annotated[str, StringConstraints(min_length=1, max_length=MAX_BODY_BYTES)] | None = None
    max_tokens: int = Field(default=256, ge=1, le=MAX_TOKENS_CAP)
    temperature: float = Field(default=0.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=0, ge=0, le=1000)
    stop: list[Annotated[str, StringConstraints(min_length=1, max_length=64)]] = Field(
        default_factory=list, max_length=MAX_STOP_SEQUENCES
    )
    seed: int | None = Field(default=None, ge=0, le=2**63 - 1)
    stream: bool = True
    priority: Literal["interactive", "batch"] = "interactive"
    deadline_ms: int | None = Field(default=None, ge=0, le=MAX_EPOCH_MS)
    timeout_ms: int | None = Field(default=None, ge=1, le=24 * 3600 * 1000)
    tenant: Annotated[str, StringConstraints(max_length=64)] = "default"
    metadata: dict[str, JsonValue] = Field(default_factory=dict)  # JSON-shaped: str keys, no bytes
    reply_to: Annotated[str, StringConstraints(min_length=1, max_length=256)] | None = None
    # KV pruning budget in tokens (0 = no pruning; absent = the worker's LLM_KV_BUDGET_TOKENS). A worker
    # also rejects a positive budget below its sink tokens plus one KV block.
    kv_budget_tokens: StrictInt | None = Field(default=None, ge=0, le=MAX_KV_BUDGET_TOKENS)

    @model_validator(mode="after")
    def _check(self) -> ChatRequest:
        if (self.messages is None) == (self.prompt is None):
            raise ValueError("exactly one of `messages` or `prompt` is required")
        try:
            size = len(json.dumps(self.metadata, default=str))
        except (TypeError, ValueError, RecursionError) as exc:
            raise ValueError(f"metadata is not JSON-serialisable: {exc}"[:200]) from None
        if size > MAX_METADATA_BYTES:
            raise ValueError(f"metadata exceeds {MAX_METADATA_BYTES} bytes")
        return self

    def reply_key(self, prefix: str = DEFAULT_PREFIX) -> str:
        """The reply channel this request's events go to."""
        return self.reply_to or reply_stream(self.id, prefix)

    def deadline_epoch_ms(self, received_epoch_ms: int) -> int | None:
        """Absolute deadline: `deadline_ms`, else receipt time + `timeout_ms`, else none."""
        if self.deadline_ms is not None:
            return self.deadline_ms
        if self.timeout_ms is not None:
            return received_epoch_ms + self.timeout_ms
        return None


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0
    # KV cache: its format ("" from engines without one), the most tokens the request held at once,
    # and the tokens KV pruning evicted.
    kv_dtype: str = ""
    kv_peak_tokens: int = 0
    kv_evicted_tokens: int = 0


class Timings(BaseModel):
    queue_ms: float
    ttft_ms: float | None
    tpot_ms: float | None
    total_ms: float
    worker: str


class TokenEvent(BaseModel):
    type: Literal["token"] = "token"
    # The request id. Optional only so events of older workers still decode; clients accept a token
    # event only when it names their request.
    id: str | None = None
    index: int
    text: str
    token_ids: list[int]
    # Which worker run produced it: after a reclaim two runs may write; clients keep the attempt of `done`.
    attempt: str


class DoneEvent(BaseModel):
    type: Literal["done"] = "done"
    id: str
    text: str
    finish_reason: str
    usage: Usage
    timings: Timings
    attempt: str


class ErrorEvent(BaseModel):
    type: Literal["error"] = "error"
    id: str | None
    code: ErrorCode
    message: str
    attempt: str = ""


ReplyEvent = TokenEvent | DoneEvent | ErrorEvent


def now_ms() -> int:
    """Wall-clock epoch milliseconds (the clock of `deadline_ms`)."""
    return int(time.time() * 1000)
