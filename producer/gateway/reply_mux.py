"""The reply multiplexer: many requests' reply streams read by few `XREAD BLOCK`s, events to their queues.

One `ReplyMux` per namespace user (a tenant, or the open namespace). Each open request is a
`Subscription` (its reply stream, its cursor, an asyncio queue). Reader tasks, at most
`max_reads`, each own one connection at a time and loop: take every reply stream no other read
covers (up to `MAX_STREAMS_PER_READ`; in cluster mode one hash slot's), `XREAD BLOCK` them from their
cursors, hand each event to its request's queue, and put the streams back to be read again. So every
open stream is in exactly one outstanding XREAD, and a busy gateway reads hundreds of streams per
call.

A new request must not wait for a blocked XREAD that does not name its stream to come back. Two
usual ways to wake such a reader do not work here: a short BLOCK timeout is rounded up to the
server's timer tick (about 100 ms at the default `hz 10`), and a wake-up entry needs a key that both
the reader may XREAD and the gateway may XADD, which a tenant's ACL user does not have (it may only
read its reply streams). Instead, `open` hands the new stream at once to an idle reader, or starts
another reader (another connection) while fewer than `max_reads` run: its XREAD is on the wire
before the worker has even read the request. Under load the reads return as tokens arrive and each
re-read covers every stream that came in meanwhile, so the number of reads stays near the number of
readers, not of requests. Only when `max_reads` XREADs are all blocked does a new stream wait, until
one of them returns (at the next token of any of its streams, or `block_ms`).

Events are checked as the client library checks them (`AsyncChatClient.check_event`: the request's
own id, and the signature when replies are signed); anything else is skipped. A request's stream is
dropped from the reads at its final event (`done`/`error`), or when its caller closes it. A Redis
error that a retry cannot fix (NOPERM, say) fails the requests of that read with a `ReadFailure`;
a lost connection is retried with backoff, from the cursors, so no event is lost.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum

import redis
import redis.asyncio as aioredis
import structlog
from redis.crc import key_slot

from producer.wire.backoff import TRANSIENT_ERRORS, Backoff
from producer.wire.models import ReplyEvent, TokenEvent
from producer.wire.redis_factory import recover
from producer.wire.redis_types import Fields, StreamEntries, read_entries

log = structlog.get_logger("producer.gateway")

MAX_STREAMS_PER_READ = 512
RETRY_LOG_EVERY_S = 10.0
EVENTS_PER_STREAM_PER_READ = 256


class Interrupt(Enum):
    """Put into a request's queue by its caller: the deadline passed, or the HTTP client went away."""

    TIMED_OUT = "timed_out"
    DISCONNECTED = "disconnected"


@dataclass(frozen=True)
class ReadFailure:
    """The request's reply stream cannot be read (a Redis error no retry fixes)."""

    message: str


Item = ReplyEvent | Interrupt | ReadFailure
Check = Callable[[str, str, bytes, Fields], "ReplyEvent | None"]


class DuplicateRequest(Exception):
    """A request with this reply stream is already open here."""


class Subscription:
    """One open request: its reply stream, where reading continues, and the queue of what arrived."""

    __slots__ = ("request_id", "key", "cursor", "queue", "open")

    def __init__(self, request_id: str, key: str):
        self.request_id = request_id
        self.key = key
        self.cursor: bytes | str = "0"
        self.queue: asyncio.Queue[Item] = asyncio.Queue()
        self.open = True


class ReplyMux:
    """Reads the reply streams of open requests, `max_reads` XREADs at most, over one client's pool."""

    def __init__(
        self,
        client: aioredis.Redis,
        check: Check,
        *,
        block_ms: int,
        max_reads: int,
        cluster: bool = False,
        backoff_initial_ms: float = 50.0,
        backoff_max_ms: float = 2000.0,
        label: str | None = None,
    ):
        self.redis = client
        self.check = check
        self.block_ms = block_ms
        self.max_reads = max_reads
        self.cluster = cluster
        self.label = label
        self._backoff = (backoff_initial_ms, backoff_max_ms)
        self._open: dict[str, Subscription] = {}
        self._uncovered: dict[str, Subscription] = {}  # open, and in no outstanding XREAD
        self._idle: deque[asyncio.Future[None]] = deque()
        self._readers: set[asyncio.Task[None]] = set()
        self._closed = False
        self._retries = 0  # failed reads retried since the last `gateway_reply_read_retry` line
        self._retry_logged_at = -RETRY_LOG_EVERY_S
        self.reads = 0  # XREAD calls made
        self.streams_read = 0  # streams named, summed over those calls

    @property
    def open_requests(self) -> int:
        return len(self._open)

    @property
    def readers(self) -> int:
        return len(self._readers)

    def open(self, request_id: str, key: str) -> Subscription:
        """Start reading `key` (from its beginning) for request `request_id`; its events go to `.queue`."""
        if self._closed:
            raise RuntimeError("the reply multiplexer is closed")
        if key in self._open:
            raise DuplicateRequest(request_id)
        sub = Subscription(request_id, key)
        self._open[key] = sub
        self._uncovered[key] = sub
        self._wake()
        return sub

    def close(self, sub: Subscription) -> None:
        """Stop reading a request's stream (idempotent); an XREAD naming it may still come back, unread."""
        if sub.open:
            sub.open = False
            self._open.pop(sub.key, None)
            self._uncovered.pop(sub.key, None)

    async def aclose(self) -> None:
        """Stop every reader and close the client; open requests get nothing more."""
        self._closed = True
        readers = list(self._readers)
        for task in readers:
            task.cancel()
        # Bounded: a cancel landing inside a Redis call may be taken for a failed call (the loop then ends).
        if readers:
            await asyncio.wait(readers, timeout=2.0)
        for sub in list(self._open.values()):
            self.close(sub)
        await self.redis.aclose()

    def _wake(self) -> None:
        """Have a reader take the uncovered streams: an idle one, else a new one while below `max_reads`."""
        while self._idle:
            waiter = self._idle.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return
        if len(self._readers) < self.max_reads and not self._closed:
            task = asyncio.get_running_loop().create_task(self._reader())
            self._readers.add(task)
            task.add_done_callback(self._readers.discard)

    def _take(self) -> list[Subscription]:
        """Up to `MAX_STREAMS_PER_READ` uncovered streams (on a cluster, one hash slot's), now covered."""
        if not self._uncovered:
            return []
        keys = list(self._uncovered)
        if self.cluster:
            slot = key_slot(keys[0].encode())
            keys = [k for k in keys if key_slot(k.encode()) == slot]
        batch = [self._uncovered.pop(k) for k in keys[:MAX_STREAMS_PER_READ]]
        if self._uncovered:  # more than one read's worth: another reader takes the rest
            self._wake()
        return batch

    def _uncover(self, batch: list[Subscription]) -> None:
        for sub in batch:
            if sub.open:
                self._uncovered[sub.key] = sub

    async def _reader(self) -> None:
        backoff = Backoff(*self._backoff)
        loop = asyncio.get_running_loop()
        while not self._closed:
            batch = self._take()
            if not batch:
                waiter: asyncio.Future[None] = loop.create_future()
                self._idle.append(waiter)
                try:
                    await waiter
                finally:
                    if not waiter.done():
                        waiter.cancel()
                continue
            streams = {sub.key: sub.cursor for sub in batch}
            self.reads += 1
            self.streams_read += len(streams)
            try:
                reply = await self.redis.xread(
                    streams,  # type: ignore[arg-type]  # redis-py only reads it; dicts are invariant
                    block=self.block_ms,
                    count=EVENTS_PER_STREAM_PER_READ,
                )
            except TRANSIENT_ERRORS as exc:
                recover(self.redis)
                self._uncover(batch)
                self._retried(exc, len(batch))
                await asyncio.sleep(backoff.next_delay_s(exc))
                continue
            except redis.RedisError as exc:
                for sub in batch:
                    if sub.open:
                        sub.queue.put_nowait(ReadFailure(f"reading the reply failed: {_short(exc)}"))
                        self.close(sub)
                log.error(
                    "gateway_reply_read_failed", tenant=self.label, error=_short(exc), streams=len(batch)
                )
                continue
            except BaseException:
                self._uncover(batch)  # cancelled (shutdown) or a bug: another reader may go on
                raise
            backoff.reset()
            self._dispatch(read_entries(reply))
            self._uncover(batch)
            # Let the other reads that came back in this same turn of the loop put their streams back
            # too: the first reader to go on then takes them all in one XREAD, the others go idle.
            await asyncio.sleep(0)

    def _retried(self, exc: BaseException, streams: int) -> None:
        """Log a retried read: the first of an outage at once, then one line per `RETRY_LOG_EVERY_S`
        with the retries since the last line (every reader retries every back-off step)."""
        self._retries += 1
        now = time.monotonic()
        if now - self._retry_logged_at < RETRY_LOG_EVERY_S:
            return
        log.warning(
            "gateway_reply_read_retry", tenant=self.label, error=_short(exc), streams=streams,
            retries=self._retries,
        )  # fmt: skip
        self._retry_logged_at, self._retries = now, 0

    def _dispatch(self, got: StreamEntries) -> None:
        for raw_key, entries in got:
            sub = self._open.get(raw_key.decode())
            if sub is None:
                continue
            for entry_id, fields in entries:
                sub.cursor = entry_id
                event = self.check(sub.request_id, sub.key, entry_id, fields)
                if event is None:
                    continue
                sub.queue.put_nowait(event)
                if not isinstance(event, TokenEvent):
                    self.close(sub)  # the final event: nothing follows it
                    break


def _short(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:200]
