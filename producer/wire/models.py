"""Request and reply bodies of wire contract v1, and the stable error codes.

A request body is a `ChatRequest`; each reply event is a `TokenEvent`, a `DoneEvent` or
an `ErrorEvent`. How they travel (stream fields, encodings, versions) is `codec.py`;
where they travel is `keys.py`. No Redis client is imported here.
"""

from __future__ import annotations

import json
import re
import secrets
import time
import zlib
from enum import Enum
from typing import Annotated, Any, ClassVar, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    JsonValue,
    SerializerFunctionWrapHandler,
    StrictInt,
    StringConstraints,
    ValidationInfo,
    field_serializer,
    field_validator,
    model_serializer,
    model_validator,
)

from producer.wire.keys import DEFAULT_PREFIX, reply_stream
from producer.wire.limits import (
    MAX_BODY_BYTES,
    MAX_CHOICES,
    MAX_EPOCH_MS,
    MAX_KV_BUDGET_TOKENS,
    MAX_LOGIT_BIAS,
    MAX_MESSAGES,
    MAX_METADATA_BYTES,
    MAX_REGEX_CHARS,
    MAX_REPETITION_PENALTY,
    MAX_RESPONSE_SCHEMA_BYTES,
    MAX_RESPONSE_SCHEMA_DEPTH,
    MAX_SESSION_CHARS,
    MAX_STOP_SEQUENCES,
    MAX_STOP_TOKEN_IDS,
    MAX_TOKEN_ID,
    MAX_TOKENS_CAP,
    MAX_TOP_LOGPROBS,
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


def request_id_in_shard(shard: int, shards: int) -> str:
    """An unguessable id whose own shard (`keys.shard_for(id, shards)`) is `shard`: 128 random bits in hex,
    then 4 hex digits chosen so. A client that places a request by another key (its `session`) sends it
    under such an id, so whoever knows only the id (a cancel, a resumed bulk job) finds its shard.

    CRC-32 goes on from the random part's, so each candidate costs 4 bytes; about `shards` are tried.
    """
    if not 0 <= shard < shards:
        raise ValueError(f"shard {shard} must be >= 0 and < {shards}")
    while True:
        head = new_request_id()
        crc = zlib.crc32(head.encode())
        for n in range(1 << 16):
            tail = f"{n:04x}".encode()
            if zlib.crc32(tail, crc) % shards == shard:
                return head + tail.decode()


RequestId = Annotated[str, StringConstraints(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.:\-]+$")]
# A conversation id (`session`): ASCII, so the bytes its shard is computed from are its characters.
Session = Annotated[
    str, StringConstraints(min_length=1, max_length=MAX_SESSION_CHARS, pattern=r"^[A-Za-z0-9_.:@/+=\-]+$")
]
Role = Literal["system", "user", "assistant", "tool"]


class _OmitsUnused(BaseModel):
    """A body whose fields named in `_omit_unused` are left out while at their defaults: fields added to v1
    after its first readers, so that a reader older than them (`extra="forbid"` on requests) reads a body
    that does not use them exactly as before."""

    _omit_unused: ClassVar[tuple[str, ...]] = ()

    @model_serializer(mode="wrap")
    def _omit(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        body: dict[str, Any] = handler(self)
        defaults = _DEFAULTS.get(type(self)) or _defaults_of(type(self))
        for name, default in defaults.items():
            if name in body and getattr(self, name) == default:
                del body[name]
        return body


# The defaults of each `_OmitsUnused` model's fields to omit, found once (pydantic's `get_default` inspects
# the default factory's signature at every call).
_DEFAULTS: dict[type, dict[str, Any]] = {}


def _defaults_of(model: type[_OmitsUnused]) -> dict[str, Any]:
    fields = model.model_fields
    found = {name: fields[name].get_default(call_default_factory=True) for name in model._omit_unused}
    _DEFAULTS[model] = found
    return found


_TOKEN_ID_KEY = re.compile(r"^[0-9]{1,10}$")


def _token_id_key(value: Any) -> Any:
    """A `logit_bias` key: JSON object keys are strings, so `"42"` is token 42 (as at OpenAI); Python
    callers may use ints. Anything else is left for the int validation to refuse."""
    if isinstance(value, str):
        if not _TOKEN_ID_KEY.match(value):
            raise ValueError("a token id (a string of decimal digits) is expected")
        return int(value)
    return value


TokenId = Annotated[StrictInt, Field(ge=0, le=MAX_TOKEN_ID)]
TokenIdKey = Annotated[StrictInt, BeforeValidator(_token_id_key), Field(ge=0, le=MAX_TOKEN_ID)]
Bias = Annotated[float, Field(ge=-100.0, le=100.0)]


def _json_depth_ok(value: Any, limit: int) -> bool:
    """Whether `value` nests at most `limit` objects and arrays deep, with text keys only (iterative: a
    hostile depth costs no recursion)."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children = list(item.values())
            if not all(isinstance(k, str) for k in item):
                return False
        elif isinstance(item, list):
            children = item
        else:
            continue
        if depth > limit:
            return False
        stack.extend((child, depth + 1) for child in children)
    return True


class JsonSchemaFormat(BaseModel):
    """`response_format.json_schema`, as OpenAI's: a name, the JSON Schema the reply satisfies, `strict`."""

    model_config = ConfigDict(extra="forbid", serialize_by_alias=True)

    name: Annotated[str, StringConstraints(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")]
    description: Annotated[str, StringConstraints(max_length=1024)] | None = None
    schema_: dict[str, Any] = Field(alias="schema")
    strict: bool | None = None

    @field_validator("schema_")
    @classmethod
    def _bounded(cls, schema: dict[str, Any]) -> dict[str, Any]:
        if not _json_depth_ok(schema, MAX_RESPONSE_SCHEMA_DEPTH):
            limit = MAX_RESPONSE_SCHEMA_DEPTH
            raise ValueError(f"the schema nests deeper than {limit} levels or has a key that is not text")
        try:
            size = len(json.dumps(schema, separators=(",", ":"), allow_nan=False).encode())
        except (TypeError, ValueError) as exc:
            raise ValueError(f"the schema is not JSON: {exc}"[:200]) from None
        if size > MAX_RESPONSE_SCHEMA_BYTES:
            raise ValueError(f"the schema is {size} bytes as JSON; the limit is {MAX_RESPONSE_SCHEMA_BYTES}")
        return schema


class ResponseFormat(BaseModel):
    """What the reply must be: `text` (anything), a JSON object, JSON satisfying a schema, or a match of a
    regular expression (`regex`, an extension)."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["text", "json_object", "json_schema", "regex"]
    json_schema: JsonSchemaFormat | None = None
    regex: Annotated[str, StringConstraints(min_length=1, max_length=MAX_REGEX_CHARS)] | None = None

    @model_validator(mode="after")
    def _check(self) -> ResponseFormat:
        if (self.json_schema is not None) != (self.type == "json_schema"):
            raise ValueError("`json_schema` is required with type `json_schema`, and only with it")
        if (self.regex is not None) != (self.type == "regex"):
            raise ValueError("`regex` is required with type `regex`, and only with it")
        return self

    @property
    def constrained(self) -> bool:
        """Whether it constrains the reply at all (`text` does not)."""
        return self.type != "text"


class ChatMessage(BaseModel):
    """One OpenAI-style chat message."""

    model_config = ConfigDict(extra="forbid")

    role: Role
    content: Annotated[str, StringConstraints(max_length=MAX_BODY_BYTES)]


# The sampling extras of `ChatRequest`, left out of its body while at their defaults (`_OmitsUnused`).
REQUEST_EXTRAS = (
    "n", "logprobs", "top_logprobs", "presence_penalty", "frequency_penalty", "repetition_penalty",
    "logit_bias", "min_tokens", "stop_token_ids", "ignore_eos", "response_format",
)  # fmt: skip


class ChatRequest(_OmitsUnused):
    """Body of a request entry, version 1."""

    model_config = ConfigDict(extra="forbid")
    _omit_unused = (*REQUEST_EXTRAS, "session")

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
    # The conversation this request is a turn of: its affinity key (`affinity_key`). Absent from the body
    # while unset, so workers older than it read requests without one.
    session: Session | None = None
    # Sampling extras (`REQUEST_EXTRAS`): absent from the body while at their defaults, so workers older
    # than them still read requests that do not use them. A worker whose engine does not honour one that
    # is set refuses the request `invalid_request`, naming it.
    n: int = Field(default=1, ge=1, le=MAX_CHOICES)  # choices, each sampled on its own
    logprobs: bool = False
    top_logprobs: int = Field(default=0, ge=0, le=MAX_TOP_LOGPROBS)  # needs `logprobs`
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    repetition_penalty: float = Field(default=1.0, gt=0.0, le=MAX_REPETITION_PENALTY)
    logit_bias: dict[TokenIdKey, Bias] = Field(default_factory=dict, max_length=MAX_LOGIT_BIAS)
    min_tokens: int = Field(default=0, ge=0, le=MAX_TOKENS_CAP)  # at most `max_tokens`
    stop_token_ids: list[TokenId] = Field(default_factory=list, max_length=MAX_STOP_TOKEN_IDS)
    ignore_eos: bool = False
    response_format: ResponseFormat | None = None

    @field_serializer("logit_bias")
    def _text_keys(self, bias: dict[int, float]) -> dict[str, float]:
        # msgpack bodies are decoded with text keys only, and JSON has no others.
        return {str(token): value for token, value in bias.items()}

    # Checked as fields (with the fields declared before them), so that an error names the field.
    @field_validator("top_logprobs")
    @classmethod
    def _needs_logprobs(cls, value: int, info: ValidationInfo) -> int:
        if value and info.data.get("logprobs") is False:
            raise ValueError("`top_logprobs` needs `logprobs` true")
        return value

    @field_validator("min_tokens")
    @classmethod
    def _within_max_tokens(cls, value: int, info: ValidationInfo) -> int:
        max_tokens = info.data.get("max_tokens")
        if isinstance(max_tokens, int) and value > max_tokens:
            raise ValueError(f"`min_tokens` ({value}) exceeds `max_tokens` ({max_tokens})")
        return value

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

    def affinity_key(self) -> str | None:
        """What a client picks the request's shard by (docs/protocol.md, "Keys per shard"): `session`, else
        the content of the first `user` message (stable over a conversation's turns, which each resend the
        history), else None: the request id does, as for a `prompt`.

        Not the system message: every conversation of one application shares it, and would share a shard.
        """
        if self.session is not None:
            return self.session
        first = next((m.content for m in self.messages or [] if m.role == "user"), None)
        return first or None

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


class TopLogprob(_OmitsUnused):
    """One of the most likely tokens at a position, with its log-probability."""

    _omit_unused = ("token",)

    token_id: int
    token: str | None = None  # its text, when the worker gives it
    logprob: float


class Logprob(_OmitsUnused):
    """A sampled token's log-probability, and the `top_logprobs` most likely tokens (most likely first)."""

    _omit_unused = ("token",)

    token_id: int
    token: str | None = None  # its text, when the worker gives it
    logprob: float
    top: list[TopLogprob] = Field(default_factory=list)


class Choice(_OmitsUnused):
    """One of the `n` choices of a request that asked for more than one."""

    _omit_unused = ("logprobs",)

    index: int
    text: str
    finish_reason: str
    completion_tokens: int
    logprobs: list[Logprob] | None = None


# The `rd` of a reply event: the digest of the request entry it answers (`request_digest.py`), written by
# the workers into every event of an entry they serve; absent from events that answer an id, not an entry
# (a cancel's `cancelled`), and from workers older than it.
RequestDigest = Annotated[str, StringConstraints(max_length=64)]


class TokenEvent(_OmitsUnused):
    # Fields after `attempt` are absent while unused, so older clients read the events as before.
    _omit_unused = ("logprobs", "choice", "rd")

    type: Literal["token"] = "token"
    # The request id. Optional only so events of older workers still decode; clients accept a token
    # event only when it names their request.
    id: str | None = None
    index: int
    text: str
    token_ids: list[int]
    # Which worker run produced it: after a reclaim two runs may write; clients keep the attempt of `done`.
    attempt: str
    logprobs: list[Logprob] | None = None  # one per token of `token_ids`, when the request asked for them
    choice: int = 0  # which choice the tokens belong to (requests with `n` > 1)
    rd: RequestDigest | None = None  # the digest of the request entry answered


class DoneEvent(_OmitsUnused):
    # Fields after `attempt` are absent while unused, so older clients read the events as before.
    _omit_unused = ("logprobs", "choices", "rd")

    type: Literal["done"] = "done"
    id: str
    text: str  # with `n` > 1: choice 0's (as `finish_reason`); `usage` counts the tokens of every choice
    finish_reason: str
    usage: Usage
    timings: Timings
    attempt: str
    logprobs: list[Logprob] | None = None  # one per token of the reply (choice 0's with `n` > 1)
    choices: list[Choice] | None = None  # every choice, by index, when the request asked for `n` > 1
    rd: RequestDigest | None = None  # the digest of the request entry answered


class ErrorEvent(_OmitsUnused):
    _omit_unused = ("param", "rd")

    type: Literal["error"] = "error"
    id: str | None
    code: ErrorCode
    message: str
    attempt: str = ""
    param: str | None = None  # the request field an `invalid_request` is about, when it is about one
    rd: RequestDigest | None = None  # the digest of the request entry answered (none for a cancel's)


ReplyEvent = TokenEvent | DoneEvent | ErrorEvent


def now_ms() -> int:
    """Wall-clock epoch milliseconds (the clock of `deadline_ms`)."""
    return int(time.time() * 1000)
