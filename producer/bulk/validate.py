"""A document's chat request, checked as a worker checks it: what `submit` refuses before enqueuing
and what a running job turns into that document's own error instead of failing.

`check_document` builds the request a job sends for the document (system = instruction, user =
document, the job's parameters), encodes it as the client does and validates the entry with the
worker's own `decode_request` (the contract's body limit, the request model's limits). The
worker's prompt-token limit depends on its tokenizer and is not checked here: a document over it
fails alone at run time with `too_long`.
"""

from __future__ import annotations

from typing import Any

import pydantic

from producer.client import build_request
from producer.wire.codec import ContentType, ProtocolError, decode_request, encode_request
from producer.wire.limits import MAX_BODY_BYTES
from producer.wire.models import ErrorCode

Problem = tuple[str, str]  # (code, message)


def request_params(
    *,
    max_tokens: int,
    temperature: float,
    seed: int | None,
    tenant: str,
    request_timeout_s: float,
) -> dict[str, Any]:
    """The chat parameters of every request of a job."""
    params: dict[str, Any] = {
        "max_tokens": max_tokens,
        "temperature": temperature,
        "stream": False,
        "priority": "batch",
        "tenant": tenant,
        "timeout_ms": int(request_timeout_s * 1000),
    }
    if seed is not None:
        params["seed"] = seed
    return params


def document_messages(instruction: str, document: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": instruction}, {"role": "user", "content": document}]


def problem_of(exc: BaseException) -> Problem:
    """The stable code and a short message (never the document's text) for a request that cannot be built."""
    if isinstance(exc, pydantic.ValidationError):
        errors = exc.errors(include_input=False, include_url=False)
        first = errors[0] if errors else {"loc": (), "msg": "invalid", "type": ""}
        where = ".".join(str(p) for p in first.get("loc", ())) or "request"
        code = ErrorCode.TOO_LONG if first.get("type") == "string_too_long" else ErrorCode.INVALID_REQUEST
        return code.value, f"{where}: {first.get('msg', 'invalid')}"[:300]
    if isinstance(exc, UnicodeError):
        where = f" at character {exc.start}" if isinstance(exc, UnicodeEncodeError) else ""
        return ErrorCode.INVALID_REQUEST.value, f"the text is not valid Unicode (a lone surrogate{where})"
    if isinstance(exc, RecursionError):
        return ErrorCode.INVALID_REQUEST.value, "the request is nested too deep"
    return ErrorCode.INVALID_REQUEST.value, f"{type(exc).__name__}: {exc}"[:300]


def check_document(
    document: Any,
    instruction: str,
    params: dict[str, Any],
    *,
    content_type: ContentType = "msgpack",
    max_body_bytes: int = MAX_BODY_BYTES,
) -> Problem | None:
    """Why a worker would refuse this document's request (code, message), or None."""
    try:
        request = build_request(document_messages(instruction, document), None, params)
        fields = encode_request(request, content_type)
    except (ValueError, TypeError, RecursionError) as exc:  # pydantic's ValidationError and UnicodeError too
        return problem_of(exc)
    raw = {k.encode(): v if isinstance(v, bytes) else v.encode() for k, v in fields.items()}
    try:
        decode_request(raw, max_body_bytes=max_body_bytes)
    except ProtocolError as exc:
        return exc.code.value, exc.message
    return None
