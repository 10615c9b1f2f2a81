"""Writing reply events: streamed tokens, then exactly one final `done` or `error`.

Delivery is at-least-once (a reclaimed entry can run twice), so every write goes
through the guard scripts of `producer/wire/final_guard.py`: a final event is appended
only by the writer that takes the request's guard first, and acknowledges the request
entry in the same script; token events are appended only while no final exists. A
duplicate run's final is dropped, and the client sees one `done`/`error` per request id,
always as the last event of its reply stream.

All writes of one loop iteration (tokens, finals, dead letters, acks) are queued in the
`ReplyWriter` and sent in one pipeline by `flush()`. If Redis is unreachable, the queue
is kept and the loop retries the flush (with backoff) before it steps the engine again,
so no final reply and no acknowledgement is dropped by a connection loss; a retried
flush may repeat token events, which clients drop by `index` (see `TokenRuns`). A server that
refuses writes for now (OOM at `maxmemory` with `noeviction`, BUSY, MISCONF, READONLY:
`refuses_writes`) is treated the same way, except that the batch's token events are
dropped rather than kept (the final reply carries the whole text, and memory is what is short).

A request id belongs to the first request entry that claimed it (`<root>:claim:<id>`, see
`worker/loop/intake.py`). A final for an entry carries its body's digest (`FinalWrite.digest`) and is
written only if the id's claim, when there is one, names that digest (`CLAIMED_FINAL_SCRIPT`): an entry
that reuses another's id with another body never answers on that request's reply stream. The same
digest goes into the event itself (`rd`, under the signature), so that a client can tell an answer to
the entry it sent from one to another entry that owns its id (`producer/wire/request_digest.py`).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import redis
import structlog

from producer.wire.backoff import TRANSIENT_ERRORS
from producer.wire.codec import ContentType, encode_body, encode_event
from producer.wire.final_guard import FINAL_SCRIPT, TOKENS_SCRIPT, ScriptCall, final_call, tokens_call
from producer.wire.keys import StreamNames
from producer.wire.models import ErrorCode, ErrorEvent, ReplyEvent
from producer.wire.redis_factory import is_cluster, register_script
from producer.wire.signing import sign

__all__ = ["FinalWrite", "ReplyWriter", "refuses_writes", "retry_delay_s"]

log = structlog.get_logger("worker")


# Replies of a server that refuses writes for now, whatever the command: memory at `maxmemory` under
# `noeviction` (OOM), a script running past its time limit (BUSY), a failed RDB save with
# `stop-writes-on-bgsave-error` (MISCONF), a primary turned replica (READONLY), or one that lost its
# primary or replicas (MASTERDOWN, NOREPLICAS). The same write succeeds once the server recovers, so a
# writer keeps it and retries; a command error (WRONGTYPE, NOPERM, a bad argument) would fail again.
SERVER_STATE_ERRORS = frozenset({"OOM", "BUSY", "MISCONF", "READONLY", "MASTERDOWN", "NOREPLICAS"})
# The longest back-off after such an error: the server is up and recovers at once when memory frees
# (or the script ends), so the retry must come soon after, not at the connection back-off's cap.
SERVER_STATE_RETRY_MAX_S = 0.5


def refuses_writes(exc: object) -> bool:
    """Whether `exc` is a server's refusal of writes for now (`SERVER_STATE_ERRORS`), not of the command
    (also when re-raised naming its key: `worker.loop.keyed_errors.about`, which keeps it as the cause)."""
    if not isinstance(exc, redis.ResponseError):
        return False
    if exc.__cause__ is not None and refuses_writes(exc.__cause__):
        return True
    if isinstance(exc, redis.exceptions.OutOfMemoryError | redis.exceptions.ReadOnlyError):
        return True
    return str(exc).split(" ", 1)[0] in SERVER_STATE_ERRORS


def retry_delay_s(delay_s: float, exc: BaseException) -> float:
    """A back-off delay for `exc`: capped at `SERVER_STATE_RETRY_MAX_S` when the server refuses writes."""
    return min(delay_s, SERVER_STATE_RETRY_MAX_S) if refuses_writes(exc) else delay_s


# FINAL_SCRIPT, preceded by the id claim's check. KEYS[4] the claim, ARGV[8] the entry's body digest
# ('' = no check: a cancel's reply, or an entry without a body). A claim's value is `<digest> <entry id>`;
# an unreadable one (not a string) is no claim. Returns 2, after acknowledging the entry, when the id
# belongs to an entry with another body; else what FINAL_SCRIPT returns (1 written, 0 another final won).
CLAIM_LOST = 2
CLAIMED_FINAL_SCRIPT = (
    """\
if ARGV[8] ~= '' then
  local claim = redis.pcall('GET', KEYS[4])
  if type(claim) == 'string' and string.sub(claim, 1, #ARGV[8]) ~= ARGV[8] then
    if ARGV[6] ~= '' then
      redis.call('XACK', KEYS[3], ARGV[5], ARGV[6])
    end
    return 2
  end
end
"""
    + FINAL_SCRIPT
)


def claimed_final_call(
    names: StreamNames, request_id: str, digest: str | None, call: ScriptCall
) -> ScriptCall:
    """CLAIMED_FINAL_SCRIPT's KEYS and ARGV: FINAL_SCRIPT's (`final_call`), with the claim and digest."""
    keys, args = call
    return keys + [names.claim(request_id)], args + [digest or ""]


@dataclass(frozen=True)
class FinalWrite:
    """A final event for one request, with the stream entry to acknowledge."""

    request_id: str
    reply_key: str
    event: ReplyEvent
    content_type: ContentType
    entry_id: str | bytes | None
    # TTL of the reply stream and guard; None = the writer's `ttl_s`. Refusals use a short one.
    ttl_s: int | None = None
    # The digest of the entry (`producer.wire.request_digest`): the final is written only if the request
    # id's claim names it. None = no check (a cancel's reply: it answers the id, not an entry).
    digest: str | None = None


@dataclass
class _Queued:
    tokens: list[tuple[str, str, dict[str, Any], ContentType, bool]] = field(default_factory=list)
    finals: list[FinalWrite] = field(default_factory=list)
    dead: list[tuple[dict[bytes, bytes], bytes]] = field(default_factory=list)
    acks: list[bytes] = field(default_factory=list)


class ReplyWriter:
    """Queues the reply writes of one loop iteration and sends them in one round trip."""

    def __init__(
        self,
        client: redis.Redis,
        names: StreamNames,
        group: str,
        attempt: str,
        ttl_s: int,
        dead_max_entries: int = 100_000,
        signing_key: bytes | None = None,
    ):
        self.client = client
        self.names = names
        self.group = group
        self.stream = names.requests
        self.attempt = attempt
        self.ttl_s = ttl_s
        self.dead_stream = names.dead_letter
        self.dead_max_entries = dead_max_entries
        self.signing_key = signing_key  # sign every event (`sig`, producer/wire/signing.py) when set
        self._final = register_script(client, CLAIMED_FINAL_SCRIPT)
        self._tokens = register_script(client, TOKENS_SCRIPT)
        self._queued = _Queued()
        self._answering: str | None = None  # the body digest of the entry being answered (`answering`)

    @contextmanager
    def answering(self, digest: str | None) -> Iterator[None]:
        """Inside, the finals that `error` queues are for an entry with this body digest: a refusal of an
        entry that reuses a claimed request id with another body is not written (see `FinalWrite.digest`)."""
        before, self._answering = self._answering, digest
        try:
            yield
        finally:
            self._answering = before

    @property
    def pending(self) -> bool:
        """Writes are queued that have not reached Redis yet."""
        q = self._queued
        return bool(q.tokens or q.finals or q.dead or q.acks)

    def token(
        self, request_id: str, key: str, body: dict[str, Any], content_type: ContentType, first: bool
    ) -> None:
        """Queue a token event, given as its `TokenEvent` body (`first`: also set the reply stream's TTL);
        dropped if the request is final."""
        self._queued.tokens.append((request_id, key, body, content_type, first))

    def final(self, final: FinalWrite) -> None:
        """Queue a final reply, guarded and acknowledged atomically."""
        self._queued.finals.append(final)

    def error(
        self,
        request_id: str | None,
        reply_key: str | None,
        code: ErrorCode,
        message: str,
        content_type: ContentType,
        entry_id: str | bytes | None,
        ttl_s: int | None = None,
        param: str | None = None,
    ) -> None:
        """Queue one final error (or only the acknowledgement when the sender left no usable address);
        `ttl_s` overrides the reply stream's and guard's TTL (refusals keep theirs short); `param` names
        the request field the error is about."""
        if request_id is None or reply_key is None:
            if entry_id is not None:
                self.ack(entry_id if isinstance(entry_id, bytes) else entry_id.encode())
            return
        event = ErrorEvent(id=request_id, code=code, message=message, attempt=self.attempt, param=param)
        digest = self._answering if entry_id is not None else None
        self.final(FinalWrite(request_id, reply_key, event, content_type, entry_id, ttl_s, digest))

    def dead_letter(self, fields: dict[bytes, bytes], entry_id: bytes) -> None:
        """Queue parking an entry in the dead-letter stream, then its acknowledgement."""
        self._queued.dead.append((fields, entry_id))

    def ack(self, entry_id: bytes) -> None:
        """Queue a bare acknowledgement (an entry that needs no reply)."""
        self._queued.acks.append(entry_id)

    def flush(self) -> list[str]:
        """Send everything queued; returns the request ids whose final lost the guard (already answered).

        On a connection error the queue is kept and the error propagates; call again to retry.
        """
        if not self.pending:
            return []
        dropped = self.write(self._queued)
        self._queued = _Queued()
        return dropped

    def take(self) -> _Queued | None:
        """Hand over everything queued as one batch for `write` (the background writer's way)."""
        if not self.pending:
            return None
        batch, self._queued = self._queued, _Queued()
        return batch

    def write(self, q: _Queued) -> list[str]:
        """Send one batch in one pipeline; returns the ids whose final lost the guard. Raises on transient
        errors and on a server refusing writes (`refuses_writes`: OOM...), leaving in `q` what is still to
        write, to be written again (token events may repeat; clients drop them by index; finals and acks
        are idempotent under the guard; after a refusal the token events are dropped)."""
        pipe = self.client.pipeline(transaction=False)
        for fields, entry_id in q.dead:
            pipe.xadd(self.dead_stream, fields, maxlen=self.dead_max_entries, approximate=True)  # type: ignore[arg-type]
            pipe.xack(self.stream, self.group, entry_id)
        # One script call for all token events, each reply stream's in order.
        streams: dict[tuple[str, str], list[Any]] = {}
        set_ttl: set[tuple[str, str]] = set()
        for request_id, key, body, ct, first in q.tokens:
            raw = encode_body(body, ct)
            sig = "" if self.signing_key is None else sign(self.signing_key, key, ct, raw)
            streams.setdefault((request_id, key), []).extend((ct, raw, sig))
            if first:
                set_ttl.add((request_id, key))
        if streams:
            calls = [(rid, key, (rid, key) in set_ttl, events) for (rid, key), events in streams.items()]
            keys, args = tokens_call(self.names, self.ttl_s, calls)
            self._tokens(keys=keys, args=args, client=pipe)
        tokens_done: list[Any] = []
        if is_cluster(self.client) and any((f.request_id, f.reply_key) in streams for f in q.finals):
            # A cluster pipeline retries a command that got TRYAGAIN (a slot in migration) after the others
            # ran: a request's final could then precede its last tokens, which the guard drops for good.
            # So the tokens go first, and the finals only once they are written (one more round trip).
            tokens_done = pipe.execute(raise_on_error=False)
            pipe = self.client.pipeline(transaction=False)
            failed = next((r for r in tokens_done if isinstance(r, TRANSIENT_ERRORS)), None)
            if failed is not None:
                unsent = [failed] * (len(q.finals) + (1 if q.acks else 0))
                self._keep_unwritten(q, tokens_done + unsent, bool(streams))
                raise failed
        for final in q.finals:
            self._queue_final(pipe, final)
        if q.acks:
            pipe.xack(self.stream, self.group, *q.acks)
        # A command error (say, a hostile reply key of the wrong type) must not block the queue forever:
        # it is logged and dropped; only transient errors propagate and keep the batch for a retry. On a
        # cluster those come back as results too (a slot in migration: TRYAGAIN past redis-py's own
        # retries), not raised: a final that was not written must not pass for one another writer won.
        results = tokens_done + pipe.execute(raise_on_error=False)
        transient = next((r for r in results if isinstance(r, TRANSIENT_ERRORS)), None)
        if transient is not None:
            self._keep_unwritten(q, results, bool(streams))
            raise transient
        refused = next((r for r in results if refuses_writes(r)), None)
        if refused is not None:
            self._keep_unwritten(q, results, bool(streams))
            if q.tokens:
                log.warning("reply_tokens_dropped", events=len(q.tokens), error=str(refused)[:200])
                q.tokens = []
            raise refused
        for result in results:
            if isinstance(result, Exception):
                log.warning("reply_write_failed", error=str(result)[:200])
        won = results[len(results) - len(q.finals) - (1 if q.acks else 0) :][: len(q.finals)]
        for f, w in zip(q.finals, won, strict=True):
            if w == CLAIM_LOST:
                entry = f.entry_id.decode() if isinstance(f.entry_id, bytes) else f.entry_id
                log.warning("request_duplicate_id", id=f.request_id, entry=entry, tenant=self.names.tenant,
                            stage="final")  # fmt: skip
        # Only a 0 says another final won the guard; a failed command (an exception) was logged above.
        return [f.request_id for f, w in zip(q.finals, won, strict=True) if w == 0]

    @staticmethod
    def _keep_unwritten(q: _Queued, results: list[Any], tokens_sent: bool) -> None:
        """Before a retry, take out of `q` what this try wrote (in pipeline order: dead letters with their
        acks, the tokens script, finals, acks): a final written now would read as lost to the guard next
        time, and its request be reported as answered by another writer."""
        n_dead = 2 * len(q.dead)
        dead, rest = results[:n_dead], results[n_dead:]
        q.dead = [d for i, d in enumerate(q.dead) if isinstance(dead[2 * i], Exception)
                  or isinstance(dead[2 * i + 1], Exception)]  # fmt: skip
        if tokens_sent:
            if not isinstance(rest[0], Exception):
                q.tokens = []
            rest = rest[1:]
        finals, rest = rest[: len(q.finals)], rest[len(q.finals) :]
        q.finals = [f for f, won in zip(q.finals, finals, strict=True) if won != 1]
        if q.acks and not isinstance(rest[0], Exception):
            q.acks = []

    def _queue_final(self, pipe: Any, final: FinalWrite) -> None:
        event = final.event
        if final.digest and event.rd is None:  # the entry it answers, for the client (`rd`, signed)
            event = event.model_copy(update={"rd": final.digest})
        fields = encode_event(event, final.content_type, final.reply_key, self.signing_key)
        entry = final.entry_id.decode() if isinstance(final.entry_id, bytes) else (final.entry_id or "")
        keys, args = final_call(
            self.names,
            final.request_id,
            final.reply_key,
            fields,
            attempt=self.attempt,
            ttl_s=self.ttl_s if final.ttl_s is None else final.ttl_s,
            group=self.group,
            entry_id=entry,
        )
        keys, args = claimed_final_call(self.names, final.request_id, final.digest, (keys, args))
        self._final(keys=keys, args=args, client=pipe)


class ReplyWriters:
    """Every lane's `ReplyWriter`, by lane (`InFlight.lane`), seen as one writer by the loop and its thread.

    Each lane's writes go in that lane's own pipeline (its acknowledgements name its stream), one
    after the other; a batch written again after a connection error is written again whole, which
    `ReplyWriter.write` allows.
    """

    def __init__(self, by_lane: Mapping[tuple[str | None, int | None], ReplyWriter]):
        self.by_lane = dict(by_lane)

    def of(self, lane: tuple[str | None, int | None]) -> ReplyWriter:
        return self.by_lane[lane]

    @property
    def pending(self) -> bool:
        return any(w.pending for w in self.by_lane.values())

    def flush(self) -> list[str]:
        dropped: list[str] = []
        for w in self.by_lane.values():
            dropped += w.flush()
        return dropped

    def take(self) -> list[tuple[ReplyWriter, Any]] | None:
        batches = [(w, batch) for w in self.by_lane.values() if (batch := w.take()) is not None]
        return batches or None

    def write(self, batches: list[tuple[ReplyWriter, Any]]) -> list[str]:
        dropped: list[str] = []
        for writer, batch in batches:
            dropped += writer.write(batch)
        return dropped
