"""`response_format` as the engine sees it: a validated, hashable `GrammarSpec`, or one `GrammarError`.

The wire (`producer/wire/models.py`, `ResponseFormat`) already bounds the request's size and depth; this
module checks the shape again because the engine can be driven without the wire (tests, benchmarks, an
in-process caller), and because the engine needs one canonical text per grammar to key its compile cache.

The schema is kept as compact JSON text in the order its author wrote it. Keys are not sorted: the grammar
emits an object's properties in the schema's order, so two schemas that differ only in property order give
different outputs and must not share a cache entry.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

GrammarKind = Literal["json_object", "json_schema", "regex"]

_TYPES = ("text", "json_object", "json_schema", "regex")
_TOP_FIELDS = {"type", "json_schema", "regex"}
_SCHEMA_FIELDS = {"name", "description", "schema", "strict"}


class GrammarError(ValueError):
    """A `response_format` that cannot constrain a reply.

    Raised for a malformed `response_format`, a schema or regex the grammar engine refuses (an unsupported
    keyword, a regex feature such as look-around, a grammar over the engine's size limits), and a compile
    that failed or ran past the compiler's timeout. The message names what is wrong and is meant for the
    caller (it becomes the request's error), so it never carries a traceback.
    """


@dataclass(frozen=True)
class GrammarSpec:
    """What one request's output must match, in the canonical form the compiler caches by.

    `source` is the schema as compact JSON (property order kept), the regex itself, or "" for
    `json_object`. `name` and `strict` are OpenAI's metadata: they do not change the grammar (every schema
    is enforced as written, and keywords the grammar engine cannot enforce are an error whatever `strict`
    says), so they are left out of equality and of `key`.
    """

    kind: GrammarKind
    source: str
    name: str | None = field(default=None, compare=False)
    strict: bool | None = field(default=None, compare=False)

    @property
    def key(self) -> str:
        """Cache key: a SHA-256 of kind and source (a hash, so a 64 KiB schema is not a dict key)."""
        return hashlib.sha256(f"{self.kind}\0{self.source}".encode()).hexdigest()

    @classmethod
    def json_schema(cls, schema: Mapping[str, Any], *, name: str | None = None) -> GrammarSpec:
        """A spec for a schema given directly (tests, tools): the same checks as `parse_response_format`."""
        return cls("json_schema", _schema_text(schema, "schema"), name=name)

    @classmethod
    def regex(cls, pattern: str) -> GrammarSpec:
        return cls("regex", _regex_text(pattern))

    @classmethod
    def json_object(cls) -> GrammarSpec:
        return cls("json_object", "")


def _schema_text(schema: Any, where: str) -> str:
    if not isinstance(schema, Mapping):
        raise GrammarError(f"{where} must be a JSON object, got {type(schema).__name__}")
    try:
        return json.dumps(schema, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise GrammarError(f"{where} is not JSON: {exc}"[:300]) from None


def _regex_text(pattern: Any, where: str = "regex") -> str:
    if not isinstance(pattern, str) or not pattern:
        raise GrammarError(f"{where} must be a non-empty string")
    return pattern


def _unknown(fields: Mapping[str, Any], allowed: set[str], where: str) -> None:
    extra = sorted(str(k) for k in fields if k not in allowed)
    if extra:
        raise GrammarError(f"{where} has unknown field(s): {', '.join(extra)}")


def parse_response_format(response_format: Mapping[str, Any] | None) -> GrammarSpec | None:
    """The spec of an OpenAI-style `response_format`, or None when it does not constrain (absent, `text`).

    Accepted shapes: `{"type": "text"}`, `{"type": "json_object"}`, `{"type": "json_schema", "json_schema":
    {"name": ..., "schema": {...}, "strict": ..., "description": ...}}` and the extension
    `{"type": "regex", "regex": "..."}`. A pydantic `ResponseFormat` is passed as
    `model_dump(by_alias=True, exclude_none=True)`. Whether the schema's keywords are supported is only
    known when it is compiled (`GrammarCompiler`), which raises the same `GrammarError`.
    """
    if response_format is None:
        return None
    if not isinstance(response_format, Mapping):
        raise GrammarError(f"response_format must be an object, got {type(response_format).__name__}")
    kind = response_format.get("type")
    if kind not in _TYPES:
        raise GrammarError(f"response_format.type must be one of {', '.join(_TYPES)}; got {kind!r}"[:300])
    _unknown(response_format, _TOP_FIELDS, "response_format")
    for other in ("json_schema", "regex"):
        if other != kind and response_format.get(other) is not None:
            raise GrammarError(f"response_format.{other} is only allowed with type {other}")
    if kind == "text":
        return None
    if kind == "json_object":
        return GrammarSpec.json_object()
    if kind == "regex":
        return GrammarSpec("regex", _regex_text(response_format.get("regex"), "response_format.regex"))
    body = response_format.get("json_schema")
    if not isinstance(body, Mapping):
        raise GrammarError("response_format.json_schema must be an object with a `schema`")
    _unknown(body, _SCHEMA_FIELDS, "response_format.json_schema")
    if "schema" not in body:
        raise GrammarError("response_format.json_schema.schema is required")
    name = body.get("name")
    if name is not None and not isinstance(name, str):
        raise GrammarError("response_format.json_schema.name must be a string")
    strict = body.get("strict")
    if strict is not None and not isinstance(strict, bool):
        raise GrammarError("response_format.json_schema.strict must be true or false")
    source = _schema_text(body["schema"], "response_format.json_schema.schema")
    return GrammarSpec("json_schema", source, name=name, strict=strict)
