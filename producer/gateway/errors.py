"""OpenAI-shaped errors: `{"error": {"message", "type", "param", "code"}}`, and where each comes from.

Every refusal of the gateway is an `ApiError` (status, type, code, param, message); the wire's error
codes map to HTTP statuses in `WIRE_ERRORS`, and validation errors (pydantic's, of the OpenAI shapes
or of the wire's `ChatRequest`) become 400s naming the offending field (`param`), written the way
OpenAI writes paths (`messages[0].content`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from pydantic import ValidationError

from producer.wire.models import ErrorCode

INVALID = "invalid_request_error"
_MAX_MESSAGE = 500


class ApiError(Exception):
    """A request the gateway answers with an error status and an OpenAI error body."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = INVALID,
        code: str | None = None,
        param: str | None = None,
        headers: Mapping[str, str] | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message[:_MAX_MESSAGE]
        self.type = type
        self.code = code
        self.param = param
        self.headers = dict(headers or {})

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def error_body(message: str, type: str, code: str | None, param: str | None = None) -> dict[str, Any]:
    return ApiError(0, message, type=type, code=code, param=param).body()


# Wire error code -> (HTTP status, OpenAI type, code).
WIRE_ERRORS: dict[ErrorCode, tuple[int, str, str]] = {
    ErrorCode.INVALID_REQUEST: (400, INVALID, "invalid_request"),
    ErrorCode.TOO_LONG: (400, INVALID, "context_length_exceeded"),
    ErrorCode.OVERLOADED: (429, "rate_limit_error", "overloaded"),
    ErrorCode.DEADLINE_EXCEEDED: (504, "timeout_error", "deadline_exceeded"),
    ErrorCode.CANCELLED: (500, "api_error", "cancelled"),
    ErrorCode.INTERNAL: (500, "api_error", "internal_error"),
}


# Every `code` the gateway answers with: its own refusals, `WIRE_ERRORS`' and `_code`'s, /ready's
# `not_ready`. A closed set, so `llm_gateway_errors_total{code}` stays bounded (others count as `other`);
# tests/gateway/test_gateway_metrics.py checks that every code in this package is in it.
CODES = frozenset(
    {
        *(name for _, _, name in WIRE_ERRORS.values()),
        "timeout",
        "service_unavailable",
        "not_ready",
        "invalid_json",
        "invalid_type",
        "invalid_value",
        "missing_required_parameter",
        "unknown_parameter",
        "unsupported_parameter",
        "invalid_api_key",
        "model_not_found",
        "not_found",
        "method_not_allowed",
        "http_error",
        "duplicate_request_id",
        "request_too_large",
    }
)


def from_wire(code: ErrorCode, message: str, retry_after_s: int, param: str | None = None) -> ApiError:
    """The HTTP answer to a wire `error` reply (or the producer's own `overloaded` refusal); `param`: the
    request field the reply names (its `param`), under the name the caller gave it."""
    status, kind, name = WIRE_ERRORS.get(code, (500, "api_error", "internal_error"))
    headers = {"Retry-After": str(retry_after_s)} if status == 429 else None
    return ApiError(status, message or name, type=kind, code=name, param=param, headers=headers)


def timed_out(timeout_s: float) -> ApiError:
    return ApiError(
        504,
        f"no answer within {timeout_s:g} s; the request was cancelled",
        type="timeout_error",
        code="timeout",
    )


def internal(message: str = "the gateway failed to process the request") -> ApiError:
    return ApiError(500, message, type="api_error", code="internal_error")


def unavailable(message: str, retry_after_s: int) -> ApiError:
    return ApiError(
        503,
        message,
        type="api_error",
        code="service_unavailable",
        headers={"Retry-After": str(retry_after_s)},
    )


def param_path(loc: Sequence[int | str]) -> str | None:
    """A pydantic location as OpenAI writes it: `('messages', 0, 'content')` -> `messages[0].content`."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out or None


# pydantic error types -> OpenAI codes.
_CODES = {"missing": "missing_required_parameter", "extra_forbidden": "unknown_parameter"}
_RANGE = ("greater_than", "less_than", "too_short", "too_long", "literal_error", "pattern_mismatch")


def _code(kind: str) -> str:
    if kind in _CODES:
        return _CODES[kind]
    if any(part in kind for part in _RANGE) or kind in (
        "value_error",
        "assertion_error",
        "enum",
        "finite_number",
    ):
        return "invalid_value"
    return "invalid_type"


def _shown_loc(loc: Sequence[int | str]) -> list[int | str]:
    """A location without pydantic's union-member tags (`str`, `list[str]`, `function-after[...]`)."""
    return [p for p in loc if isinstance(p, int) or not any(c in p for c in "[]()") and p not in _TAGS]


_TAGS = {"str", "int", "float", "bool", "list", "dict", "none", "is-instance", "literal"}


def from_validation(exc: ValidationError, rename: Mapping[str, str] | None = None) -> ApiError:
    """A 400 naming the first invalid field (`rename` maps wire field names to the caller's)."""
    return from_errors(exc.errors(include_url=False), rename)


def from_errors(errors: Sequence[Any], rename: Mapping[str, str] | None = None) -> ApiError:
    """`from_validation` of pydantic's error dicts (FastAPI's `RequestValidationError.errors()` too)."""
    if not errors:
        return ApiError(400, "invalid request", code="invalid_value")
    first = errors[0]
    loc = _shown_loc(first.get("loc", ()))
    if loc and isinstance(loc[0], str) and rename:
        loc[0] = rename.get(loc[0], loc[0])
    param = param_path(loc)
    kind = str(first.get("type", ""))
    msg = str(first.get("msg", "invalid"))
    if kind == "extra_forbidden":
        message = f"Unrecognized request argument supplied: {param}"
    elif kind == "missing":
        message = f"Missing required parameter: '{param}'."
    elif param is None:
        message = msg.removeprefix("Value error, ")
    else:
        message = f"Invalid '{param}': {msg.removeprefix('Value error, ')}."
    return ApiError(400, message, code=_code(kind), param=param)
