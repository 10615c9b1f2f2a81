"""Wire contract v1: stream keys, request and reply bodies, encodings, error codes.

This module is the public contract between chatbot backends and workers; backends in
other languages implement it from `docs/protocol.md`. It imports no Redis client.

A request is one entry of the stream `<prefix>:requests` with fields
`v` (protocol version), `ct` (`msgpack` or `json`) and `body`. Each reply event is one
entry of the per-request stream `reply_to` (default `<prefix>:reply:<id>`), with fields
`ct` and `body`, encoded the way the request was.
"""

from __future__ import annotations

import json
import secrets
import time
from enum import Enum
from typing import Annotated, Any, Literal

import msgpack
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    JsonValue,
    StringConstraints,
    ValidationError,
    model_validator,
)

PROTOCOL_VERSION = 1
DEFAULT_PREFIX = "llm"
CONSUMER_GROUP = "workers"

CONTENT_TYPES = ("msgpack", "json")
ContentType = Literal["msgpack", "json"]

# Hard limits enforced before any model work; a worker may configure stricter ones.
MAX_BODY_BYTES = 256 * 1024
MAX_MESSAGES = 256
MAX_TOKENS_CAP = 4096
MAX_STOP_SEQUENCES = 8
MAX_METADATA_BYTES = 4096
# Latest absolute deadline accepted (9999-12-31, epoch ms): bounded, so it converts to seconds.
MAX_EPOCH_MS = 253_402_300_799_999
REPLY_TTL_S_DEFAULT = 3600


class ErrorCode(str, Enum):
    """Stable error codes of `error` replies; clients branch on these."""

    INVALID_REQUEST = "invalid_request"
    TOO_LONG = "too_long"
    OVERLOADED = "overloaded"
    DEADLINE_EXCEEDED = "deadline_exceeded"
    CANCELLED = "cancelled"
    INTERNAL = "internal"


def requests_stream(prefix: str = DEFAULT_PREFIX, shard: int | None = None) -> str:
    """Key of the request stream (`<prefix>:requests`, or `<prefix>:requests:<n>` when sharded)."""
    return f"{prefix}:requests" if shard is None else f"{prefix}:requests:{shard}"


def reply_stream(request_id: str, prefix: str = DEFAULT_PREFIX) -> str:
    """Default per-request reply channel."""
    return f"{prefix}:reply:{request_id}"


def dead_letter_stream(prefix: str = DEFAULT_PREFIX) -> str:
    """Where entries that cannot be processed are parked, with the reason."""
    return f"{prefix}:dead"


def cancel_stream(prefix: str = DEFAULT_PREFIX) -> str:
    """Broadcast stream of cancellations: entries with field `id`; every worker watches it."""
    return f"{prefix}:cancel"


def final_guard_key(prefix: str, request_id: str) -> str:
    """Key whose `SET NX` decides which writer publishes the one final reply of a request."""
    return f"{prefix}:final:{request_id}"


def reply_key_allowed(key: str, prefix: str = DEFAULT_PREFIX) -> bool:
    """Whether a `reply_to` stays inside the reply namespace, so no request makes a worker write elsewhere."""
    return key.startswith(f"{prefix}:reply:") and len(key) > len(prefix) + 7


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


class Timings(BaseModel):
    queue_ms: float
    ttft_ms: float | None
    tpot_ms: float | None
    total_ms: float
    worker: str


class TokenEvent(BaseModel):
    type: Literal["token"] = "token"
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


class ProtocolError(Exception):
    """An entry that violates the contract; carries the error code and, if found, the request id."""

    def __init__(
        self,
        code: ErrorCode,
        message: str,
        request_id: str | None = None,
        reply_to: str | None = None,
        content_type: ContentType = "json",
    ):
        super().__init__(message)
        self.code = code
        self.message = message
        self.request_id = request_id
        self.reply_to = reply_to
        self.content_type = content_type


def encode_body(body: dict[str, Any], content_type: ContentType) -> bytes:
    """Serialize a body dict in the given content type."""
    if content_type == "msgpack":
        return msgpack.packb(body, use_bin_type=True)
    return json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode()


def decode_body(raw: bytes, content_type: str) -> Any:
    """Parse a body; raises ValueError on malformed input."""
    if content_type == "msgpack":
        try:
            return msgpack.unpackb(
                raw,
                raw=False,
                strict_map_key=True,
                max_bin_len=4 * MAX_BODY_BYTES,
                max_str_len=4 * MAX_BODY_BYTES,
                max_array_len=MAX_MESSAGES * 4,
                max_map_len=1024,
            )
        except Exception as exc:  # msgpack raises several unrelated types
            raise ValueError(f"malformed msgpack body: {exc}") from exc
    try:
        return json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise ValueError(f"malformed JSON body: {exc}") from exc


def encode_request(request: ChatRequest, content_type: ContentType = "msgpack") -> dict[str, bytes | str]:
    """Stream-entry fields for a request."""
    body = request.model_dump(exclude_none=True, exclude_defaults=False)
    return {"v": str(PROTOCOL_VERSION), "ct": content_type, "body": encode_body(body, content_type)}


def _salvage_id(body: Any, prefix: str) -> tuple[str | None, str | None]:
    """Best-effort id and reply channel from an invalid body, so the sender can still be told."""
    if not isinstance(body, dict):
        return None, None
    rid = body.get("id")
    if not isinstance(rid, str):
        return None, None
    try:
        ChatRequest.model_validate({"id": rid, "prompt": "x"})
    except ValidationError:
        return None, None
    reply_to = body.get("reply_to")
    if not (isinstance(reply_to, str) and len(reply_to) <= 256 and reply_key_allowed(reply_to, prefix)):
        reply_to = reply_stream(rid, prefix)
    return rid, reply_to


def decode_request(
    fields: dict[bytes, bytes], prefix: str = DEFAULT_PREFIX, max_body_bytes: int = MAX_BODY_BYTES
) -> tuple[ChatRequest, ContentType]:
    """Validate a raw stream entry; raises ProtocolError with the best reply address found."""
    version = fields.get(b"v")
    raw_ct = fields.get(b"ct", b"")
    content_type: ContentType = "msgpack" if raw_ct == b"msgpack" else "json"
    body_raw = fields.get(b"body")
    body: Any = None
    # An oversized body is still parsed up to a hard cap, only to find where to send the refusal.
    if body_raw is not None and len(body_raw) <= 4 * max_body_bytes and raw_ct in (b"msgpack", b"json"):
        try:
            body = decode_body(body_raw, raw_ct.decode())
        except ValueError:
            body = None
    rid, reply_to = _salvage_id(body, prefix)

    def fail(code: ErrorCode, message: str) -> ProtocolError:
        return ProtocolError(code, message, rid, reply_to, content_type)

    if version != str(PROTOCOL_VERSION).encode():
        shown = version.decode("utf-8", "replace")[:16] if isinstance(version, bytes) else None
        raise fail(
            ErrorCode.INVALID_REQUEST, f"unsupported protocol version {shown!r}; expected {PROTOCOL_VERSION}"
        )
    if raw_ct not in (b"msgpack", b"json"):
        raise fail(ErrorCode.INVALID_REQUEST, "field `ct` must be `msgpack` or `json`")
    if body_raw is None:
        raise fail(ErrorCode.INVALID_REQUEST, "field `body` is missing")
    if len(body_raw) > max_body_bytes:
        raise fail(ErrorCode.TOO_LONG, f"body is {len(body_raw)} bytes; the limit is {max_body_bytes}")
    if body is None:
        try:
            decode_body(body_raw, raw_ct.decode())
        except ValueError as exc:
            raise fail(ErrorCode.INVALID_REQUEST, str(exc)[:300]) from None
    if not isinstance(body, dict):
        raise fail(ErrorCode.INVALID_REQUEST, "body must be a map/object")
    try:
        request = ChatRequest.model_validate(body)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ())) or "body"
        raise fail(ErrorCode.INVALID_REQUEST, f"{where}: {first.get('msg', 'invalid')}"[:300]) from None
    # e.g. nesting deeper than the validator's recursion limit, or a value no float can hold
    except (ValueError, TypeError, OverflowError, RecursionError) as exc:
        raise fail(ErrorCode.INVALID_REQUEST, f"body: {exc}"[:300]) from None
    return request, content_type


def encode_event(event: ReplyEvent, content_type: ContentType) -> dict[str, bytes | str]:
    """Reply-stream fields for an event."""
    return {"ct": content_type, "body": encode_body(event.model_dump(mode="json"), content_type)}


def decode_event(fields: dict[bytes, bytes]) -> ReplyEvent:
    """Parse a reply-stream entry into its event model."""
    ct = fields.get(b"ct", b"json").decode()
    body = decode_body(fields[b"body"], ct)
    kind = body.get("type")
    if kind == "token":
        return TokenEvent.model_validate(body)
    if kind == "done":
        return DoneEvent.model_validate(body)
    if kind == "error":
        return ErrorEvent.model_validate(body)
    raise ValueError(f"unknown reply event type {kind!r}")


def now_ms() -> int:
    """Wall-clock epoch milliseconds (the clock of `deadline_ms`)."""
    return int(time.time() * 1000)
