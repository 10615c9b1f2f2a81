"""What a chatbot backend imports: `ChatClient` (sync) and `AsyncChatClient` (asyncio).

    client = ChatClient()                       # REDIS_URL or redis://127.0.0.1:6379/0
    reply = client.chat([{"role": "user", "content": "Hi"}], max_tokens=32)
    for tok in client.stream([...]): print(tok.text, end="")

Requests go to the stream `<prefix>:requests`; replies are read from the request's
own reply stream, from its beginning, so a late or reconnecting reader loses nothing.

Tenants (`LLM_TENANT` or `tenant=`; docs/security.md): every key is the tenant's own,
under `<prefix>:t:{<tenant>}`, and the client uses only what a tenant's ACL user may:
XADD to its request and cancel streams, XREAD of its reply streams. So a tenant's client
runs no script: `submit` appends with a plain XADD (the workers shed a backlog over
their limit with `overloaded`), and `cancel` appends the id to the tenant's cancel
stream, after which the worker holding the request, or the one that reads it later,
writes the `cancelled` reply under the final-reply guard.

Shards and Redis Cluster (`LLM_STREAM_SHARDS`, `LLM_REDIS_CLUSTER`; docs/scaling.md): with N
shards a request goes to the namespace `<prefix>:s:{<n>}` of shard `crc32(key) % N`, where `key`
is its affinity key (`submit(..., shard_key=...)`, else its `session`, else the content of its
first user message: `ChatRequest.affinity_key`), else its id; so a conversation's turns go to one
shard, and the worker that owns it, whose prefix cache holds the history. A request placed by its
key gets an id of the same shard (`request_id_in_shard`) unless the caller chose the id, so a
cancel or a read by id alone finds it. Its reply, guard and cancel keys are that shard's. A
tenant's client with N > 1 shards does the same within its tenant, over the namespaces
`<prefix>:t:{<tenant>.<n>}`. A `reply_to` must be in one of the client's namespaces, and picks
that one. On a cluster the client is redis-py's `RedisCluster` and `results` reads one shard's
reply streams per XREAD, the shards in turn.

Reliability, client side (see docs/reliability.md):
- `submit` refuses with `ChatError(overloaded)` before XADD when the backlog is over
  `max_backlog_requests` (an atomic check-and-append script);
- connection errors are retried with jittered exponential backoff, reading the reply
  stream from the last id seen, so a Redis restart loses no event it kept;
- `cancel(id)` answers `cancelled` at once (reply and guard kept `reply_ttl_s`, 60 s, as
  a refusal) and makes the worker stop and free the sequence; workers remember the cancel,
  so a queued request is not run later; a `chat`/`result` that times out cancels its request;
- token events carry `attempt`: after a reclaim two worker runs may stream tokens for
  the same id, so `ReplyStream` yields only the run whose `index` sequence is contiguous
  from 0, and the final reply (exactly one per id) names the attempt that won.

Trust (see docs/protocol.md, "Reply authenticity"): a reply stream is only a Redis key, and
anyone who may write it could append a fake answer. The client accepts an event only if it
names the request's own id and, when `LLM_REPLY_SIGNING_KEY` is set, carries a valid `sig`
from the workers. Any other entry (wrong id, missing or bad signature, malformed) is skipped
with a `reply_event_rejected` log line and the client keeps waiting for the real final: a
forged `done` is never returned, and a forged `error` cannot end the wait either.

Binding (docs/protocol.md, "Reply authenticity"): a request id is the sender's choice, so another
entry may carry it, and a worker's signed answer to that entry lands on the same reply stream.
Workers name the entry each event answers (`rd`, the digest of its `ct` and `body`,
`producer/wire/request_digest.py`), and a client that sent the request checks it against what it
sent: a token event of another entry is skipped (`other_request`); a final of another entry means
the id is answered for good, so the wait ends at once with `ChatError(invalid_request)` naming the
`id`, never with that entry's text. With a signing key, an event without `rd` is skipped too
(`no_request_digest`; workers older than `rd`), except a `cancelled` error, which answers an id, not
an entry.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import AsyncIterator, Generator, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, cast

import redis
import redis.asyncio as aioredis
from redis.typing import KeyT, StreamIdT

from producer.messages import Messages, normalize_messages
from producer.settings import ProducerSettings
from producer.wire import backlog, final_guard
from producer.wire.backoff import TRANSIENT_ERRORS, Backoff
from producer.wire.codec import ContentType, decode_event, encode_request
from producer.wire.keys import CONSUMER_GROUP, StreamNames, check_tenant, reply_key_allowed, shard_for
from producer.wire.models import (
    ChatRequest,
    Choice,
    DoneEvent,
    ErrorCode,
    ErrorEvent,
    Logprob,
    ReplyEvent,
    Timings,
    TokenEvent,
    Usage,
    request_id_in_shard,
)
from producer.wire.redis_factory import by_slot, connect, connect_async, recover, register_script
from producer.wire.redis_types import StreamEntries, read_entries
from producer.wire.request_digest import request_digest
from producer.wire.signing import verify

log = logging.getLogger("producer")


class ChatError(Exception):
    """The service answered with an `error` reply; `code` is one of `ErrorCode`, `param` the request field
    it is about when the reply names one (an extra the worker's engine does not honour, say)."""

    def __init__(
        self, code: ErrorCode | str, message: str, request_id: str | None = None, param: str | None = None
    ):
        self.code = ErrorCode(code)
        super().__init__(f"{self.code.value}: {message}")  # `too_long: ...`, the code as on the wire
        self.message = message
        self.request_id = request_id
        self.param = param


class ChatTimeout(TimeoutError):
    """No final reply arrived within the client's timeout."""

    def __init__(self, request_id: str, timeout_s: float):
        super().__init__(f"no reply to request {request_id} within {timeout_s:.1f} s")
        self.request_id = request_id
        self.timeout_s = timeout_s


@dataclass(frozen=True)
class Reply:
    """The final answer to one request.

    `logprobs` (one per token of `text`) when the request asked for them, and `choices` (each with its
    text, finish reason, completion tokens and logprobs) when it asked for `n` > 1; `text` is then
    choice 0's. None otherwise.
    """

    id: str
    text: str
    finish_reason: str
    usage: Usage
    timings: Timings
    attempt: str
    logprobs: list[Logprob] | None = None
    choices: list[Choice] | None = None

    @classmethod
    def from_event(cls, event: DoneEvent) -> Reply:
        return cls(
            event.id, event.text, event.finish_reason, event.usage, event.timings, event.attempt,
            event.logprobs, event.choices,
        )  # fmt: skip


@dataclass(frozen=True)
class PreparedRequest:
    """A request validated and placed in its namespace, with its entry encoded, not yet sent.

    `AsyncChatClient.prepare` makes one and `AsyncChatClient.send` sends it; `submit` is the two in
    one. A caller that reads replies itself (the HTTP gateway's multiplexer) learns the reply stream
    (`reply_key`) before the request is sent.
    """

    request: ChatRequest
    content_type: ContentType
    args: list[Any]  # the admission script's ARGV
    names: StreamNames
    digest: str = ""  # the entry's `request_digest`: what the workers' reply events name (`rd`)

    @property
    def id(self) -> str:
        return self.request.id

    @property
    def reply_key(self) -> str:
        return self.request.reply_key(self.names.root)


def build_request(messages: Messages | None, prompt: str | None, params: dict[str, Any]) -> ChatRequest:
    """Validate a request locally before sending, so a bad call fails at the caller.

    `messages` may use the OpenAI shapes of `producer/messages.py` (text parts, `developer`, `name`);
    a message the wire cannot carry raises `MessageError` (a ValueError naming the place).
    """
    body: dict[str, Any] = dict(params)
    if messages is not None:
        body["messages"] = normalize_messages(messages)
    if prompt is not None:
        body["prompt"] = prompt
    return ChatRequest.model_validate(body)


def check_reply_key(request: ChatRequest, prefix: str) -> None:
    """Workers answer only inside `<prefix>:reply:` (`prefix`: the namespace root, a tenant's own);
    refuse any other `reply_to` before sending."""
    if not reply_key_allowed(request.reply_key(prefix), prefix):
        raise ValueError(f"reply_to must start with `{prefix}:reply:`")


def final_reply(event: ReplyEvent, request_id: str) -> Reply | None:
    """Turn a final event into a Reply, or raise its error; None for token events."""
    if isinstance(event, DoneEvent):
        return Reply.from_event(event)
    if isinstance(event, ErrorEvent):
        raise ChatError(event.code, event.message, request_id, event.param)
    return None


# `reply_event_rejected` reason of an event that answers another entry under the request's id.
OTHER_REQUEST = "other_request"


def id_taken(request_id: str) -> ErrorEvent:
    """What a client's wait ends with when its request id's final answered another entry (`rd`): the id
    has its one final, so this request is never answered; it was not run (or its answer was dropped)."""
    return ErrorEvent(
        id=request_id, code=ErrorCode.INVALID_REQUEST, attempt="client", param="id",
        message=f"request id {request_id!r} was answered for another request sent with the same id; "
        "this one was not served: send it again with a new id",
    )  # fmt: skip


class TokenRuns:
    """Keeps one worker run's tokens: the first attempt seen, in index order, each index once.

    A reclaimed entry may be generated twice (at-least-once delivery); both runs stream
    into the same reply channel with different `attempt` ids. Following the first run
    gives a gap-free, duplicate-free text; if it dies, the final reply of the run that
    finished carries the whole text.
    """

    def __init__(self) -> None:
        self.attempt: str | None = None
        self.next_index = 0

    def accept(self, event: TokenEvent) -> bool:
        """True if this token continues the followed run."""
        if self.attempt is None:
            self.attempt = event.attempt
        if event.attempt != self.attempt or event.index != self.next_index:
            return False
        self.next_index += 1
        return True


# `results` on a cluster, over several shards: the longest one XREAD blocks on one shard's replies.
CLUSTER_REPLY_SLICE_MS = 10


class _ResultsWait:
    """The I/O-free part of `results`: cursors over many reply streams and the final replies read so far."""

    def __init__(self, core: _ClientCore, request_ids: Sequence[str], timeout_s: float):
        self.core = core
        self.keys = {core._reply_key(i): i for i in request_ids}
        self.cursors: dict[str, str | bytes] = dict.fromkeys(self.keys, "0")
        self.out: dict[str, Reply | ChatError] = {}
        self.timeout_s = timeout_s
        self.deadline = time.monotonic() + timeout_s
        self._turn = 0

    def left_s(self) -> float:
        return max(0.0, self.deadline - time.monotonic())

    def next_poll(self) -> tuple[dict[KeyT, StreamIdT], int] | None:
        """The XREAD streams and block time of the next poll; None when every final reply is in.

        Raises ChatTimeout (naming the first unanswered id) once the deadline has passed.
        """
        if not self.cursors:
            return None
        left_ms = int((self.deadline - time.monotonic()) * 1000)
        if left_ms <= 0:
            raise ChatTimeout(self.keys[next(iter(self.cursors))], self.timeout_s)
        block_ms = min(left_ms, self.core.settings.reply_block_ms)
        pending: Iterable[str] = self.cursors
        if self.core.settings.redis_cluster:
            # A cluster serves one XREAD from one hash slot (one shard's reply streams): the slots
            # take turns, each blocking briefly while others wait.
            groups = by_slot(self.cursors)
            pending = groups[self._turn % len(groups)]
            self._turn += 1
            if len(groups) > 1:
                block_ms = min(block_ms, CLUSTER_REPLY_SLICE_MS)
        # One XREAD names at most a few hundred streams, so the command stays small.
        batch = {key: self.cursors[key] for key in itertools.islice(pending, 512)}
        streams = cast("dict[KeyT, StreamIdT]", batch)  # redis-py only reads it; dicts are invariant
        return streams, block_ms

    def take(self, got: StreamEntries) -> None:
        """Advance the cursors over one XREAD's entries; keep each request's final reply or error."""
        for raw_key, entries in got:
            key = raw_key.decode()
            for entry_id, fields in entries:
                self.cursors[key] = entry_id
                request_id = self.keys[key]
                event = self.core._trusted(request_id, key, entry_id, fields)
                if event is None or isinstance(event, TokenEvent):
                    continue
                try:
                    reply = final_reply(event, request_id)
                    assert reply is not None
                    self.out[request_id] = reply
                except ChatError as exc:
                    self.out[request_id] = exc
                self.core._sent.pop(request_id, None)
                del self.cursors[key]
                break


class ReplyStream:
    """Iterates a request's token events; `.reply` holds the final reply once iteration ends."""

    def __init__(self, client: ChatClient, request_id: str, timeout_s: float):
        self.id = request_id
        self.reply: Reply | None = None
        self._events = client.events(request_id, timeout_s=timeout_s)

    def __iter__(self) -> Iterator[TokenEvent]:
        runs = TokenRuns()
        for event in self._events:
            if isinstance(event, TokenEvent):
                if runs.accept(event):
                    yield event
                continue
            self.reply = final_reply(event, self.id)
            return


class _ClientCore:
    """What the sync and async clients share: settings, request preparation, reply keys (no I/O)."""

    def __init__(
        self, redis_url: str | None, settings: ProducerSettings | None, tenant: str | None,
        overrides: dict[str, Any],
    ):  # fmt: skip
        url: dict[str, Any] = {"redis_url": redis_url} if redis_url else {}
        self.settings = settings or ProducerSettings(**url, **overrides)
        if tenant is not None:
            self.settings = self.settings.model_copy(update={"tenant": check_tenant(tenant)})
        self.tenant = self.settings.tenant
        s = self.settings
        # The namespaces requests go to: the tenant's, the shards' (`shard_for`), or the bare one.
        self.spaces = StreamNames.layout(s.prefix, [self.tenant], s.stream_shards, s.redis_cluster)
        self.names = self.spaces[0]
        # Sent requests: reply key, encoding, namespace and the entry's digest (`rd` of their replies).
        self._sent: dict[str, tuple[str, ContentType, StreamNames, str]] = {}
        self._signing_key = self.settings.signing_key()
        self.rejected_events = 0  # reply entries skipped as not the workers' answer to our request

    def _trusted(
        self, request_id: str, key: str, entry_id: bytes, fields: dict[bytes, bytes]
    ) -> ReplyEvent | None:
        """The entry's event if it is a reply to this request from the workers, else None (logged, skipped).

        Skipping, not raising: whoever could forge an entry could otherwise end the caller's wait with it.
        """
        reason = None
        event: ReplyEvent | None = None
        if self._signing_key is not None and not verify(self._signing_key, key, fields):
            reason = "bad_signature"
        else:
            try:
                event = decode_event(fields)
            except (ValueError, TypeError, RecursionError):
                reason = "malformed"
            else:
                reason = "wrong_id" if event.id != request_id else self._unbound(request_id, event)
        if reason is None:
            return event
        self.rejected_events += 1
        log.warning(
            "reply_event_rejected",
            extra={"id": request_id, "reply_key": key, "entry": entry_id.decode(), "reason": reason},
        )
        if reason == OTHER_REQUEST and not isinstance(event, TokenEvent):
            return id_taken(request_id)  # the id's one final answered another entry: ours never comes
        return None

    def _unbound(self, request_id: str, event: ReplyEvent) -> str | None:
        """Why an event of the right id is not an answer to the entry this client sent, or None.

        `other_request`: it names another entry (`rd`). `no_request_digest`: with a signing key, it names
        none, and is not a `cancelled` error (which answers an id, whoever cancels). A request this client
        did not send (its digest unknown) is not checked."""
        sent = self._sent.get(request_id)
        expected = sent[3] if sent is not None else ""
        if not expected:
            return None
        if event.rd is not None:
            return None if event.rd == expected else OTHER_REQUEST
        if self._signing_key is None:
            return None  # workers older than `rd`; an unsigned deployment trusts the stream's writers
        if isinstance(event, ErrorEvent) and event.code is ErrorCode.CANCELLED:
            return None
        return "no_request_digest"

    def check_event(
        self, request_id: str, reply_key: str, entry_id: bytes, fields: dict[bytes, bytes]
    ) -> ReplyEvent | None:
        """A reply entry read by the caller: its event if it is the workers' answer to `request_id`, else
        None (logged `reply_event_rejected` and counted, as the client's own reads do)."""
        return self._trusted(request_id, reply_key, entry_id, fields)

    def forget(self, request_id: str) -> None:
        """Drop what the client kept of a sent request (its reply key, encoding and digest) once it has
        ended; the client's own reads do this when they see the final event."""
        self._sent.pop(request_id, None)

    def prepare(
        self,
        messages: Messages | None = None,
        *,
        prompt: str | None = None,
        content_type: ContentType | None = None,
        **params: Any,
    ) -> PreparedRequest:
        """Validate and place a request as `submit` does, without sending it (`send` does)."""
        return PreparedRequest(*self._prepare(messages, prompt, content_type, params))

    def _connection_args(self) -> dict[str, Any]:
        # The socket timeout stays above the longest XREAD BLOCK the client issues.
        return {"socket_timeout": self.settings.reply_block_ms / 1000 + 10, "socket_connect_timeout": 5}

    def _backoff(self) -> Backoff:
        return Backoff(self.settings.reconnect_backoff_initial_ms, self.settings.reconnect_backoff_max_ms)

    def _names_for(self, request_id: str, shard_key: str | None = None) -> StreamNames:
        """The namespace of a request: its shard's (by `shard_key`, else its id) when sharded."""
        if len(self.spaces) == 1:
            return self.names
        return self.spaces[shard_for(shard_key or request_id, len(self.spaces))]

    def _names_of(self, request: ChatRequest, shard_key: str | None) -> StreamNames:
        """The namespace a request goes to, checked against its `reply_to`.

        Sharded, a `reply_to` in any of this client's namespaces (for a tenant: any of its shards) picks
        that shard, since the worker answers only in the namespace of the stream it read the request
        from (one hash slot for the guard, the reply stream and the request stream); a `shard_key` that
        picks another shard is refused. Any other `reply_to` is refused before sending.
        """
        if request.reply_to is not None and len(self.spaces) > 1:
            owner = next((n for n in self.spaces if n.reply_allowed(request.reply_to)), None)
            if owner is None:
                roots = f"{self.spaces[0].root} .. {self.spaces[-1].root}"
                raise ValueError(f"reply_to must start with `<namespace>:reply:`, namespace one of {roots}")
            if shard_key is not None and self._names_for(request.id, shard_key) is not owner:
                raise ValueError(f"reply_to is in {owner.root}, shard_key {shard_key!r} picks another shard")
            return owner
        names = self._names_for(request.id, shard_key or request.affinity_key())
        check_reply_key(request, names.root)
        return names

    def _prepare(
        self, messages: Messages | None, prompt: str | None, content_type: ContentType | None,
        params: dict[str, Any],
    ) -> tuple[ChatRequest, ContentType, list[Any], StreamNames, str]:  # fmt: skip
        """Validate a request locally, pick its namespace, and build the admission script's ARGV for it,
        and the entry's digest (`request_digest`).

        `shard_key` among `params` (a conversation id, say) picks the shard instead of the request's
        affinity key (`ChatRequest.affinity_key`), which picks it instead of the request id.
        """
        params = dict(params)
        shard_key = params.pop("shard_key", None)
        explicit = None if shard_key is None else str(shard_key)
        request = build_request(messages, prompt, params)
        if "id" not in params:
            request = self._with_id_in_shard(request, explicit or request.affinity_key())
        names = self._names_of(request, explicit)
        ct = content_type or self.settings.content_type
        fields = encode_request(request, ct)
        body = fields["body"]
        digest = request_digest(ct, body if isinstance(body, bytes) else body.encode())
        args = backlog.script_args(CONSUMER_GROUP, self.settings.max_backlog_requests, fields)
        return request, ct, args, names, digest

    def _with_id_in_shard(self, request: ChatRequest, key: str | None) -> ChatRequest:
        """`request` under a fresh id of its key's shard (`request_id_in_shard`), so its id alone finds the
        shard, as it does for a request placed by its id; unchanged without a key or shards, or with a
        `reply_to` (whose namespace places it)."""
        shards = len(self.spaces)
        if not key or shards == 1 or request.reply_to is not None:
            return request
        return request.model_copy(update={"id": request_id_in_shard(shard_for(key, shards), shards)})

    def _entry(self, args: list[Any]) -> dict[Any, Any]:
        """The request entry's fields, back from the admission script's ARGV (a tenant's plain XADD)."""
        pairs = args[2:]
        return dict(zip(pairs[::2], pairs[1::2], strict=True))

    def _admission(self, reply: Any) -> list[Any]:
        """A tenant's XADD reply in the admission script's shape (always appended)."""
        return [1, reply] if self.tenant is not None else reply

    def _prepare_many(
        self, requests: Sequence[dict[str, Any]], content_type: ContentType | None
    ) -> list[tuple[ChatRequest, ContentType, list[Any], StreamNames, str]]:
        """`_prepare` for each dict of `submit_many` (what `submit` takes as keywords); all or nothing."""
        return [
            self._prepare(r.get("messages"), r.get("prompt"), content_type,
                          {k: v for k, v in r.items() if k not in ("messages", "prompt")})
            for r in requests
        ]  # fmt: skip

    def _admitted_many(
        self, prepared: list[tuple[ChatRequest, ContentType, list[Any], StreamNames, str]], replies: list[Any]
    ) -> list[str | ChatError]:
        """Each request's id (recorded as sent) or its `overloaded` refusal, from the admission replies."""
        out: list[str | ChatError] = []
        for (request, ct, _, names, digest), reply in zip(prepared, replies, strict=True):
            try:
                backlog.admitted_entry_id(reply, self.settings.max_backlog_requests)
            except backlog.AdmissionRefused as exc:
                out.append(ChatError(ErrorCode.OVERLOADED, str(exc), request.id))
                continue
            self._record(request, ct, names, digest)
            out.append(request.id)
        return out

    def _record(self, request: ChatRequest, ct: ContentType, names: StreamNames, digest: str) -> None:
        """Remember where a sent request's replies go, how they are encoded, its namespace and its entry's
        digest. Done before the entry is sent, so that a reader of its replies (the gateway's) already
        knows the digest; `forget` undoes it if sending fails."""
        self._sent[request.id] = (request.reply_key(names.root), ct, names, digest)

    def _sent_or_default(self, request_id: str, ct: ContentType) -> tuple[str, ContentType, StreamNames, str]:
        """What `_record` kept of a request, else its defaults and no digest (a request sent by another
        client: its shard by its id, which is its key's shard when the client chose the id; a request sent
        with a `reply_to`, or with its own id and an affinity key, is found only by its sender)."""
        found = self._sent.get(request_id)
        if found is not None:
            return found
        names = self._names_for(request_id)
        return names.reply(request_id), ct, names, ""

    def _reply_key(self, request_id: str) -> str:
        return self._sent_or_default(request_id, "json")[0]

    def reply_key(self, request_id: str) -> str:
        """The reply stream of a request: where this client sent it replies to, else the default key of
        its namespace (its shard by its id when sharded)."""
        return self._reply_key(request_id)

    def _cancel_entry(self, request_id: str) -> tuple[StreamNames, dict[Any, Any]]:
        """A tenant's cancel: its cancel stream and entry (`id`, `ct`, and `reply_to` if not the default);
        the worker that reads it writes the `cancelled` reply."""
        key, ct, names, _ = self._sent_or_default(request_id, self.settings.content_type)
        fields = {"id": request_id, "ct": ct}
        if key != names.reply(request_id):
            fields["reply_to"] = key
        return names, fields

    def _cancel_call(self, request_id: str) -> tuple[list[str], list[Any]]:
        key, ct, names, digest = self._sent_or_default(request_id, self.settings.content_type)
        return final_guard.cancel_call(
            names,
            request_id,
            key,
            ct,
            self.settings.reply_ttl_s,
            self.settings.cancel_stream_max_entries,
            self._signing_key,
            digest,
        )


class ChatClient(_ClientCore):
    """Synchronous client of the service."""

    def __init__(
        self,
        redis_url: str | None = None,
        *,
        client: redis.Redis | None = None,
        settings: ProducerSettings | None = None,
        tenant: str | None = None,
        **overrides: Any,
    ):
        super().__init__(redis_url, settings, tenant, overrides)
        self.redis = client or connect(
            self.settings.redis_url, self.settings.redis_cluster, **self._connection_args()
        )
        self._admit = register_script(self.redis, backlog.ADMIT_SCRIPT)
        self._cancel = register_script(self.redis, final_guard.CANCEL_SCRIPT)

    def submit(
        self,
        messages: Messages | None = None,
        *,
        prompt: str | None = None,
        content_type: ContentType | None = None,
        **params: Any,
    ) -> str:
        """Enqueue a request; returns its id (its replies go to `<prefix>:reply:<id>` unless `reply_to`).

        Raises ChatError(overloaded) without enqueuing when the backlog is at the limit.
        """
        request, ct, args, names, digest = self._prepare(messages, prompt, content_type, params)
        give_up = time.monotonic() + self.settings.submit_retry_s
        backoff = self._backoff()
        self._record(request, ct, names, digest)
        while True:
            try:
                backlog.admitted_entry_id(self._send(args, names), self.settings.max_backlog_requests)
                break
            except backlog.AdmissionRefused as exc:
                self.forget(request.id)
                raise ChatError(ErrorCode.OVERLOADED, str(exc), request.id) from None
            except TRANSIENT_ERRORS as exc:
                recover(self.redis)
                if time.monotonic() >= give_up:
                    self.forget(request.id)
                    raise
                time.sleep(backoff.next_delay_s(exc))
            except BaseException:
                self.forget(request.id)
                raise
        return request.id

    def submit_many(
        self, requests: Sequence[dict[str, Any]], *, content_type: ContentType | None = None
    ) -> list[str | ChatError]:
        """Enqueue many requests in one round trip; returns, in order, each id or its `overloaded` refusal.

        Each dict holds what `submit` takes as keywords (`messages` or `prompt`, and parameters).
        All are validated before anything is sent. After a connection error the whole batch is
        sent again with the same ids: a request that then runs twice still gets one final reply.
        """
        prepared = self._prepare_many(requests, content_type)
        give_up = time.monotonic() + self.settings.submit_retry_s
        backoff = self._backoff()
        while True:
            pipe = self.redis.pipeline(transaction=False)
            for _, _, args, names, _ in prepared:
                self._send(args, names, pipe)
            try:
                replies = [self._admission(r) for r in pipe.execute()]
                break
            except TRANSIENT_ERRORS as exc:
                recover(self.redis)
                if time.monotonic() >= give_up:
                    raise
                time.sleep(backoff.next_delay_s(exc))
        return self._admitted_many(prepared, replies)

    def results(
        self, request_ids: Sequence[str], *, timeout_s: float | None = None
    ) -> dict[str, Reply | ChatError]:
        """Final replies of many requests, read with one XREAD over all their reply streams per poll.

        Token events are skipped. Raises ChatTimeout (naming the first unanswered id) if not all
        final replies arrive in time.
        """
        wait = _ResultsWait(self, request_ids, timeout_s or self.settings.timeout_s)
        backoff = self._backoff()
        while (poll := wait.next_poll()) is not None:
            streams, block_ms = poll
            try:
                got = read_entries(self.redis.xread(streams, block=block_ms))
                backoff.reset()
            except TRANSIENT_ERRORS as exc:
                recover(self.redis)
                time.sleep(min(backoff.next_delay_s(exc), wait.left_s()))
                continue
            wait.take(got)
        return wait.out

    def _send(self, args: list[Any], names: StreamNames, pipe: Any = None) -> Any:
        """Append one request: the admission script, or a tenant's plain XADD (queued on `pipe` if given)."""
        if self.tenant is not None:
            fields = self._entry(args)
            if pipe is not None:
                return pipe.xadd(names.requests, fields)
            return self._admission(self.redis.xadd(names.requests, fields))
        return self._admit(keys=[names.requests], args=args, client=pipe)

    def cancel(self, request_id: str) -> bool:
        """Stop a request: the client gets `cancelled` unless a final reply already exists (then False).

        A tenant's client only announces the cancel (always True); a worker writes the `cancelled` reply
        (the one holding the request, else the one that reads it).
        """
        if self.tenant is not None:
            names, entry = self._cancel_entry(request_id)
            self.redis.xadd(
                names.cancel, entry,
                maxlen=self.settings.cancel_stream_max_entries, approximate=True,
            )  # fmt: skip
            return True
        keys, args = self._cancel_call(request_id)
        return bool(self._cancel(keys=keys, args=args))

    def events(
        self, request_id: str, *, timeout_s: float | None = None, last_id: str | bytes = "0"
    ) -> Iterator[ReplyEvent]:
        """All reply events of a request, in order, until (and including) its final event.

        On timeout the request is cancelled (if `cancel_on_timeout`) and ChatTimeout is raised.
        """
        key = self._reply_key(request_id)
        timeout_s = timeout_s or self.settings.timeout_s
        deadline = time.monotonic() + timeout_s
        backoff = self._backoff()
        while True:
            left_ms = int((deadline - time.monotonic()) * 1000)
            if left_ms <= 0:
                self._cancel_after_timeout(request_id)
                raise ChatTimeout(request_id, timeout_s)
            try:
                got = read_entries(
                    self.redis.xread(
                        {key: last_id}, block=min(left_ms, self.settings.reply_block_ms), count=256
                    )
                )
                backoff.reset()
            except TRANSIENT_ERRORS as exc:
                recover(self.redis)
                time.sleep(min(backoff.next_delay_s(exc), max(0.0, deadline - time.monotonic())))
                continue
            for _, entries in got:
                for entry_id, fields in entries:
                    last_id = entry_id
                    event = self._trusted(request_id, key, entry_id, fields)
                    if event is None:
                        continue
                    yield event
                    if not isinstance(event, TokenEvent):
                        self._sent.pop(request_id, None)
                        return

    def _cancel_after_timeout(self, request_id: str) -> None:
        if not self.settings.cancel_on_timeout:
            return
        # If Redis is unreachable, the request's own deadline, if any, still stops it.
        with contextlib.suppress(*TRANSIENT_ERRORS):
            self.cancel(request_id)

    def result(self, request_id: str, *, timeout_s: float | None = None) -> Reply:
        """Wait for the final reply of a submitted request."""
        for event in self.events(request_id, timeout_s=timeout_s):
            reply = final_reply(event, request_id)
            if reply is not None:
                return reply
        raise ChatError(ErrorCode.INTERNAL, "reply stream ended without a final event", request_id)

    def chat(
        self, messages: Messages | None = None, *, timeout_s: float | None = None, **params: Any
    ) -> Reply:
        """Send a request and wait for its reply."""
        return self.result(self.submit(messages, **params), timeout_s=timeout_s)

    def stream(
        self, messages: Messages | None = None, *, timeout_s: float | None = None, **params: Any
    ) -> ReplyStream:
        """Send a request; iterate the result for token events, then read `.reply`."""
        params.setdefault("stream", True)
        return ReplyStream(self, self.submit(messages, **params), timeout_s or self.settings.timeout_s)

    def close(self) -> None:
        self.redis.close()

    def __enter__(self) -> ChatClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncChatClient(_ClientCore):
    """asyncio twin of `ChatClient` (redis.asyncio)."""

    def __init__(
        self,
        redis_url: str | None = None,
        *,
        client: aioredis.Redis | None = None,
        settings: ProducerSettings | None = None,
        tenant: str | None = None,
        **overrides: Any,
    ):
        super().__init__(redis_url, settings, tenant, overrides)
        self.redis = client or connect_async(
            self.settings.redis_url, self.settings.redis_cluster, **self._connection_args()
        )
        self._admit = register_script(self.redis, backlog.ADMIT_SCRIPT)
        self._cancel = register_script(self.redis, final_guard.CANCEL_SCRIPT)

    async def submit(
        self,
        messages: Messages | None = None,
        *,
        prompt: str | None = None,
        content_type: ContentType | None = None,
        **params: Any,
    ) -> str:
        """Enqueue a request; ChatError(overloaded), nothing enqueued, when the backlog is at the limit."""
        return await self.send(self.prepare(messages, prompt=prompt, content_type=content_type, **params))

    async def send(self, prepared: PreparedRequest) -> str:
        """Enqueue a request made by `prepare`; as `submit` (which is `send(prepare(...))`)."""
        request, ct, args, names = prepared.request, prepared.content_type, prepared.args, prepared.names
        give_up = time.monotonic() + self.settings.submit_retry_s
        backoff = self._backoff()
        self._record(request, ct, names, prepared.digest)
        while True:
            try:
                backlog.admitted_entry_id(await self._send(args, names), self.settings.max_backlog_requests)
                break
            except backlog.AdmissionRefused as exc:
                self.forget(request.id)
                raise ChatError(ErrorCode.OVERLOADED, str(exc), request.id) from None
            except TRANSIENT_ERRORS as exc:
                recover(self.redis)
                if time.monotonic() >= give_up:
                    self.forget(request.id)
                    raise
                await asyncio.sleep(backoff.next_delay_s(exc))
            except BaseException:
                self.forget(request.id)
                raise
        return request.id

    async def submit_many(
        self, requests: Sequence[dict[str, Any]], *, content_type: ContentType | None = None
    ) -> list[str | ChatError]:
        """Enqueue many requests in one round trip; returns, in order, each id or its `overloaded` refusal.

        As `ChatClient.submit_many`: every request is validated before anything is sent, and after a
        connection error the whole batch is sent again with the same ids.
        """
        prepared = self._prepare_many(requests, content_type)
        give_up = time.monotonic() + self.settings.submit_retry_s
        backoff = self._backoff()
        while True:
            pipe = self.redis.pipeline(transaction=False)
            for _, _, args, names, _ in prepared:
                await self._send(args, names, pipe)  # queued, not sent
            try:
                replies = [self._admission(r) for r in await pipe.execute()]
                break
            except TRANSIENT_ERRORS as exc:
                recover(self.redis)
                if time.monotonic() >= give_up:
                    raise
                await asyncio.sleep(backoff.next_delay_s(exc))
        return self._admitted_many(prepared, replies)

    async def results(
        self, request_ids: Sequence[str], *, timeout_s: float | None = None
    ) -> dict[str, Reply | ChatError]:
        """Final replies of many requests (id -> Reply or ChatError), one XREAD over their streams per poll.

        As `ChatClient.results`: token events are skipped; ChatTimeout (naming the first unanswered
        id) if not all final replies arrive in time.
        """
        wait = _ResultsWait(self, request_ids, timeout_s or self.settings.timeout_s)
        backoff = self._backoff()
        while (poll := wait.next_poll()) is not None:
            streams, block_ms = poll
            try:
                got = read_entries(await self.redis.xread(streams, block=block_ms))
                backoff.reset()
            except TRANSIENT_ERRORS as exc:
                recover(self.redis)
                await asyncio.sleep(min(backoff.next_delay_s(exc), wait.left_s()))
                continue
            wait.take(got)
        return wait.out

    async def _send(self, args: list[Any], names: StreamNames, pipe: Any = None) -> Any:
        """Append one request: the admission script, or a tenant's plain XADD (queued on `pipe` if given)."""
        if self.tenant is not None:
            fields = self._entry(args)
            if pipe is not None:
                return pipe.xadd(names.requests, fields)
            return self._admission(await self.redis.xadd(names.requests, fields))
        return await self._admit(keys=[names.requests], args=args, client=pipe)

    async def cancel(self, request_id: str) -> bool:
        """Stop a request: the client gets `cancelled` unless a final reply already exists (then False).

        A tenant's client only announces the cancel (always True); a worker writes the `cancelled` reply
        (the one holding the request, else the one that reads it).
        """
        if self.tenant is not None:
            names, entry = self._cancel_entry(request_id)
            await self.redis.xadd(
                names.cancel, entry,
                maxlen=self.settings.cancel_stream_max_entries, approximate=True,
            )  # fmt: skip
            return True
        keys, args = self._cancel_call(request_id)
        return bool(await self._cancel(keys=keys, args=args))

    async def events(
        self, request_id: str, *, timeout_s: float | None = None, last_id: str | bytes = "0"
    ) -> AsyncIterator[ReplyEvent]:
        """All reply events of a request until its final one; cancels and raises ChatTimeout on timeout."""
        key = self._reply_key(request_id)
        timeout_s = timeout_s or self.settings.timeout_s
        deadline = time.monotonic() + timeout_s
        backoff = self._backoff()
        while True:
            left_ms = int((deadline - time.monotonic()) * 1000)
            if left_ms <= 0:
                await self._cancel_after_timeout(request_id)
                raise ChatTimeout(request_id, timeout_s)
            try:
                got = read_entries(
                    await self.redis.xread(
                        {key: last_id}, block=min(left_ms, self.settings.reply_block_ms), count=256
                    )
                )
                backoff.reset()
            except TRANSIENT_ERRORS as exc:
                recover(self.redis)
                await asyncio.sleep(min(backoff.next_delay_s(exc), max(0.0, deadline - time.monotonic())))
                continue
            for _, entries in got:
                for entry_id, fields in entries:
                    last_id = entry_id
                    event = self._trusted(request_id, key, entry_id, fields)
                    if event is None:
                        continue
                    yield event
                    if not isinstance(event, TokenEvent):
                        self._sent.pop(request_id, None)
                        return

    async def _cancel_after_timeout(self, request_id: str) -> None:
        if not self.settings.cancel_on_timeout:
            return
        # If Redis is unreachable, the request's own deadline, if any, still stops it.
        with contextlib.suppress(*TRANSIENT_ERRORS):
            await self.cancel(request_id)

    async def result(self, request_id: str, *, timeout_s: float | None = None) -> Reply:
        async for event in self.events(request_id, timeout_s=timeout_s):
            reply = final_reply(event, request_id)
            if reply is not None:
                return reply
        raise ChatError(ErrorCode.INTERNAL, "reply stream ended without a final event", request_id)

    async def chat(
        self, messages: Messages | None = None, *, timeout_s: float | None = None, **params: Any
    ) -> Reply:
        return await self.result(await self.submit(messages, **params), timeout_s=timeout_s)

    def stream(
        self, messages: Messages | None = None, *, timeout_s: float | None = None, **params: Any
    ) -> AsyncReplyStream:
        """A request to stream: `async for` it for token events, then read `.reply`.

        The request is sent when iteration starts, or at `await client.stream(...)`, which gives
        the stream with its `.id` set. Validation errors are raised here, before anything is sent.
        """
        params.setdefault("stream", True)
        rest = {k: v for k, v in params.items() if k not in ("prompt", "content_type")}
        self._prepare(messages, params.get("prompt"), params.get("content_type"), rest)
        return AsyncReplyStream(self, messages, timeout_s or self.settings.timeout_s, params)

    async def aclose(self) -> None:
        await self.redis.aclose()

    async def __aenter__(self) -> AsyncChatClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


class AsyncReplyStream:
    """asyncio twin of `ReplyStream`: iterates token events; `.reply` holds the final reply after iteration.

    An error reply raises ChatError from the iteration, as for the sync stream.
    """

    def __init__(
        self, client: AsyncChatClient, messages: Messages | None, timeout_s: float,
        params: dict[str, Any],
    ):  # fmt: skip
        self.id: str | None = None
        self.reply: Reply | None = None
        self._client = client
        self._messages = messages
        self._params = params
        self._timeout_s = timeout_s

    async def submit(self) -> AsyncReplyStream:
        """Send the request (once); `.id` is set afterwards."""
        if self.id is None:
            self.id = await self._client.submit(self._messages, **self._params)
        return self

    def __await__(self) -> Generator[Any, None, AsyncReplyStream]:
        return self.submit().__await__()

    async def __aiter__(self) -> AsyncIterator[TokenEvent]:
        request_id = (await self.submit()).id
        assert request_id is not None
        runs = TokenRuns()
        async for event in self._client.events(request_id, timeout_s=self._timeout_s):
            if isinstance(event, TokenEvent):
                if runs.accept(event):
                    yield event
                continue
            self.reply = final_reply(event, request_id)
            return
