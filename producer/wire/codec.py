"""Stream entries of wire contract v1: envelopes, body encodings, and validation on receipt.

A request is one entry of the stream `<prefix>:requests` with fields `v` (protocol
version), `ct` (`msgpack` or `json`) and `body`. Each reply event is one entry of the
request's reply stream with fields `ct` and `body`, encoded the way the request was, and `sig`
when the deployment signs replies (`signing.py`).
Decoding is bounded (sizes, container lengths, nesting) and turns every malformed entry
into a `ProtocolError` that says where to send the refusal, when an id can be found.
"""

from __future__ import annotations

import json
from typing import Any, Literal

import msgpack
from pydantic import ValidationError

from producer.wire.keys import DEFAULT_PREFIX, reply_key_allowed, reply_stream
from producer.wire.limits import MAX_BODY_BYTES, MAX_MESSAGES
from producer.wire.models import ChatRequest, DoneEvent, ErrorCode, ErrorEvent, ReplyEvent, TokenEvent
from producer.wire.signing import SIGNATURE_FIELD, sign

PROTOCOL_VERSION = 1

CONTENT_TYPES = ("msgpack", "json")
ContentType = Literal["msgpack", "json"]


class ProtocolError(Exception):
    """An entry that violates the contract; carries the error code and, if found, the request id (and the
    body field at fault, `param`, when one is)."""

    def __init__(
        self,
        code: ErrorCode,
        message: str,
        request_id: str | None = None,
        reply_to: str | None = None,
        content_type: ContentType = "json",
        param: str | None = None,
    ):
        super().__init__(message)
        self.code = code
        self.message = message
        self.request_id = request_id
        self.reply_to = reply_to
        self.content_type = content_type
        self.param = param


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

    def fail(code: ErrorCode, message: str, param: str | None = None) -> ProtocolError:
        return ProtocolError(code, message, rid, reply_to, content_type, param)

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
        loc = first.get("loc", ())
        where = ".".join(str(p) for p in loc) or "body"
        field = loc[0] if loc and loc[0] in ChatRequest.model_fields else None
        message = f"{where}: {first.get('msg', 'invalid')}"[:300]
        raise fail(ErrorCode.INVALID_REQUEST, message, field if isinstance(field, str) else None) from None
    # e.g. nesting deeper than the validator's recursion limit, or a value no float can hold
    except (ValueError, TypeError, OverflowError, RecursionError) as exc:
        raise fail(ErrorCode.INVALID_REQUEST, f"body: {exc}"[:300]) from None
    return request, content_type


def encode_event(
    event: ReplyEvent,
    content_type: ContentType,
    reply_key: str | None = None,
    signing_key: bytes | None = None,
) -> dict[str, bytes | str]:
    """Reply-stream fields for an event; with a signing key (and the stream it goes to) also `sig`."""
    return event_fields(
        encode_body(event.model_dump(mode="json"), content_type), content_type, reply_key, signing_key
    )


def event_fields(
    body: bytes, content_type: ContentType, reply_key: str | None, signing_key: bytes | None
) -> dict[str, bytes | str]:
    """Reply-stream fields for an encoded event body: `ct`, `body` and, when signing, `sig`."""
    fields: dict[str, bytes | str] = {"ct": content_type, "body": body}
    if signing_key is not None:
        if reply_key is None:
            raise ValueError("a signed event needs the reply key it is written to")
        fields[SIGNATURE_FIELD] = sign(signing_key, reply_key, content_type, body)
    return fields


def decode_event(fields: dict[bytes, bytes]) -> ReplyEvent:
    """Parse a reply-stream entry into its event model; ValueError (pydantic's included) if malformed."""
    ct = fields.get(b"ct", b"json").decode("utf-8", "replace")
    raw = fields.get(b"body")
    if raw is None:
        raise ValueError("reply entry has no `body`")
    body = decode_body(raw, ct)
    if not isinstance(body, dict):
        raise ValueError("reply body must be a map/object")
    kind = body.get("type")
    if kind == "token":
        return TokenEvent.model_validate(body)
    if kind == "done":
        return DoneEvent.model_validate(body)
    if kind == "error":
        return ErrorEvent.model_validate(body)
    raise ValueError(f"unknown reply event type {kind!r}")
