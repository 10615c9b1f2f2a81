"""BulkRun: sends a job's documents through the service with a bounded window of outstanding
requests and collects the replies in document order (resuming from a JobState, under the job's
RunLock)."""

from __future__ import annotations

import contextlib
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

import redis

from producer.bulk.documents import DocumentId
from producer.bulk.run_lock import RunLock, RunLockLost
from producer.bulk.store import JobState
from producer.bulk.validate import document_messages, problem_of, request_params
from producer.client import CLUSTER_REPLY_SLICE_MS, ChatClient, ChatError
from producer.wire.backoff import Backoff
from producer.wire.models import DoneEvent, ErrorCode, ErrorEvent
from producer.wire.redis_factory import by_slot
from producer.wire.redis_types import StreamEntries, read_entries

# A client-side grace past a request's own deadline: the worker answers `deadline_exceeded`
# itself; this only ends the wait when no worker is alive to answer.
DEADLINE_GRACE_S = 30.0


class BulkCancelled(Exception):
    """The job was cancelled (`cancel`) while it ran."""


@dataclass
class _InFlight:
    index: int
    request_id: str
    deadline_s: float
    last_id: bytes = b"0"


def _ok(index: int, doc_id: DocumentId, event: DoneEvent) -> dict[str, Any]:
    return {
        "index": index,
        "id": doc_id,
        "ok": True,
        "text": event.text,
        "finish_reason": event.finish_reason,
        "usage": event.usage.model_dump(),
        "timings": event.timings.model_dump(),
    }


def _failed(index: int, doc_id: DocumentId, code: str, message: str) -> dict[str, Any]:
    return {"index": index, "id": doc_id, "ok": False, "error": {"code": code, "message": message}}


class BulkRun:
    """Sends documents through the service with a bounded window and collects the replies in order.

    All outstanding reply streams are read with one blocking XREAD, so a window of hundreds
    of requests costs one round trip per poll (on a cluster: one XREAD per hash slot, see
    `_read`). Requests are sent with `stream: false`, so each reply stream holds only its final
    event; an entry counts only as the client's own reads count it (`ChatClient.check_event`).
    With a `state`, results and outstanding requests are stored as they change, and a run over
    the same state resumes where an earlier one stopped. With a `lock` (the job's RunLock, taken
    before the run loads the state), the loop renews it and never waits longer than a third of its
    TTL at a time; once it is lost, the run stops (RunLockLost) and leaves its requests to the run
    that holds it.
    """

    def __init__(
        self,
        client: ChatClient,
        documents: list[str],
        instruction: str,
        *,
        max_in_flight: int,
        max_tokens: int,
        request_timeout_s: float,
        overloaded_retries: int,
        temperature: float = 0.0,
        seed: int | None = None,
        tenant: str = "bulk",
        metadata: dict[str, Any] | None = None,
        ids: list[DocumentId] | None = None,
        state: JobState | None = None,
        lock: RunLock | None = None,
    ):
        self.client = client
        self.documents = documents
        self.ids: list[DocumentId] = list(ids) if ids is not None else list(range(1, len(documents) + 1))
        if len(self.ids) != len(documents):
            raise ValueError("ids and documents differ in length")
        self.instruction = instruction
        self.max_in_flight = max_in_flight
        self.request_timeout_s = request_timeout_s
        self.overloaded_retries = overloaded_retries
        self.params = request_params(
            max_tokens=max_tokens, temperature=temperature, seed=seed, tenant=tenant,
            request_timeout_s=request_timeout_s,
        )  # fmt: skip
        self.metadata = metadata or {}
        self.state = state
        self.lock = lock
        self._wait_cap_s = lock.renew_every_s if lock is not None else float("inf")
        self.results: list[dict[str, Any] | None] = [None] * len(documents)
        self.in_flight: dict[bytes, _InFlight] = {}
        self.refusals = [0] * len(documents)
        self.resumed = 0  # results found from an earlier run
        self.reattached = 0  # requests of an earlier run whose replies this run waits for
        if state is not None:
            self._load(state)
        self.to_send: deque[int] = deque(
            i for i in range(len(documents))
            if self.results[i] is None and not any(s.index == i for s in self.in_flight.values())
        )  # fmt: skip
        settings = client.settings
        self._backoff = Backoff(settings.reconnect_backoff_initial_ms, settings.reconnect_backoff_max_ms)
        self._retry_at_s = 0.0
        self._turn = 0  # on a cluster: the slot whose reply streams the next idle poll blocks on

    def _load(self, state: JobState) -> None:
        for index, result in state.results().items():
            if 0 <= index < len(self.results):
                self.results[index] = result
                self.resumed += 1
        now_wall, now = time.time(), time.monotonic()
        for index, sent in state.in_flight().items():
            if not 0 <= index < len(self.results) or self.results[index] is not None:
                continue
            key = self.client.reply_key(sent["request_id"])
            left_s = float(sent["submitted_at"]) + self.request_timeout_s - now_wall
            if left_s <= 0 and not self.client.redis.exists(key):
                # Past its deadline with no reply kept: send it again.
                state.forget_in_flight(index)
                continue
            deadline_s = now + left_s + DEADLINE_GRACE_S
            self.in_flight[key.encode()] = _InFlight(index, sent["request_id"], deadline_s)
            self.reattached += 1

    @property
    def finished(self) -> int:
        return sum(r is not None for r in self.results)

    @property
    def failed(self) -> int:
        return sum(r is not None and not r["ok"] for r in self.results)

    def run(self, on_progress: Any = None) -> list[dict[str, Any]]:
        """Process every document; `on_progress(run)` is called after each poll.

        Raises BulkCancelled (after cancelling the outstanding requests) once the state is cancelled.
        """
        try:
            while self.to_send or self.in_flight:
                self._keep_lock()
                if self.state is not None and self.state.cancelled():
                    raise BulkCancelled(self.state.job_id)
                self._fill()
                if self.in_flight:
                    self._poll()
                else:
                    time.sleep(min(self._wait_cap_s, max(0.0, self._retry_at_s - time.monotonic())))
                self._expire()
                if on_progress is not None:
                    on_progress(self)
        except RunLockLost:
            raise  # another run holds the job now: its requests are that run's (stored in the state)
        except BaseException:
            # Stopped (cancelled, job timeout, Ctrl-C, a bug): workers need not generate replies nobody reads.
            self._cancel_all()
            raise
        return [r for r in self.results if r is not None]

    def _keep_lock(self) -> None:
        if self.lock is not None:
            self.lock.keep()

    def _finish(self, index: int, result: dict[str, Any]) -> None:
        self.results[index] = result
        if self.state is not None:
            self.state.done(index, result)

    def _fill(self) -> None:
        while self.to_send and len(self.in_flight) < self.max_in_flight:
            if time.monotonic() < self._retry_at_s:
                return
            self._keep_lock()  # before each send: a run that stalled must not send once it lost the job
            index = self.to_send[0]
            messages = document_messages(self.instruction, self.documents[index])
            metadata = {**self.metadata, "index": index}
            try:
                request_id = self.client.submit(messages, metadata=metadata, **self.params)
            except (ValueError, TypeError, RecursionError) as exc:
                # A request the client cannot build or encode (a document past the checks of `submit`,
                # from `enqueue_bulk` say): that document fails alone, with the worker's code.
                self.to_send.popleft()
                self._finish(index, _failed(index, self.ids[index], *problem_of(exc)))
                continue
            except ChatError as exc:
                if exc.code is not ErrorCode.OVERLOADED:
                    self.to_send.popleft()
                    self._finish(index, _failed(index, self.ids[index], exc.code.value, exc.message))
                    continue
                self._refused(index, exc.message, queued=True)
                return
            self.to_send.popleft()
            if self.state is not None:
                self.state.sent(index, request_id)
            self._backoff.reset()
            key = self.client.reply_key(request_id).encode()
            self.in_flight[key] = _InFlight(
                index, request_id, time.monotonic() + self.request_timeout_s + DEADLINE_GRACE_S
            )

    def _refused(self, index: int, message: str, *, queued: bool) -> None:
        """The service said `overloaded`: try this document again later, a bounded number of times."""
        self.refusals[index] += 1
        if self.refusals[index] > self.overloaded_retries:
            if queued:
                self.to_send.popleft()
            self._finish(index, _failed(index, self.ids[index], ErrorCode.OVERLOADED.value, message))
            return
        if not queued:
            if self.state is not None:
                self.state.forget_in_flight(index)
            self.to_send.appendleft(index)
        self._retry_at_s = time.monotonic() + self._backoff.next_delay_s()

    def _read(self) -> StreamEntries:
        """One poll of the outstanding reply streams: one blocking XREAD of them all on one node.

        A cluster serves one XREAD from one hash slot, and the reply streams of a sharded
        deployment are in one slot per shard: each slot's streams are read without blocking, in one
        pipeline (the cluster client sends each node its share), and only when none had an entry
        does the poll block, on the next slot in turn and for at most `CLUSTER_REPLY_SLICE_MS`.
        """
        streams: dict[Any, Any] = {key: slot.last_id for key, slot in self.in_flight.items()}
        block_ms = int(min(self.client.settings.reply_block_ms, self._wait_cap_s * 1000))
        redis_client = self.client.redis
        groups = by_slot(streams) if self.client.settings.redis_cluster else [list(streams)]
        if len(groups) == 1:
            return read_entries(redis_client.xread(streams, block=block_ms, count=16))
        pipe = redis_client.pipeline(transaction=False)
        for keys in groups:
            pipe.xread({key: streams[key] for key in keys}, count=16)
        got = [stream for reply in pipe.execute() for stream in read_entries(reply)]
        if got:
            return got
        keys = groups[self._turn % len(groups)]
        self._turn += 1
        wait_ms = min(block_ms, CLUSTER_REPLY_SLICE_MS)
        return read_entries(redis_client.xread({key: streams[key] for key in keys}, block=wait_ms, count=16))

    def _poll(self) -> None:
        for key, entries in self._read():
            slot = self.in_flight.get(key)
            if slot is None:
                continue
            for entry_id, fields in entries:
                slot.last_id = entry_id
                doc_id = self.ids[slot.index]
                # As the client's own reads: only a signed (where a key is set), well-formed answer to the
                # entry this run sent counts; anything else is logged (`reply_event_rejected`) and skipped.
                event = self.client.check_event(slot.request_id, key.decode(), entry_id, fields)
                if event is None:
                    continue
                if isinstance(event, DoneEvent):
                    self._finish(slot.index, _ok(slot.index, doc_id, event))
                elif isinstance(event, ErrorEvent):
                    if event.code is ErrorCode.OVERLOADED:
                        self._refused(slot.index, event.message, queued=False)
                    elif event.code is ErrorCode.CANCELLED and self._job_cancelled():
                        # Cancelled with the job (by `cancel`, before this run saw the flag): unanswered.
                        self.state.forget_in_flight(slot.index)  # type: ignore[union-attr]
                    else:
                        self._finish(slot.index, _failed(slot.index, doc_id, event.code.value, event.message))
                else:
                    continue
                del self.in_flight[key]
                break

    def _job_cancelled(self) -> bool:
        return self.state is not None and self.state.cancelled()

    def _expire(self) -> None:
        now = time.monotonic()
        for key, slot in list(self.in_flight.items()):
            if now >= slot.deadline_s:
                del self.in_flight[key]
                self._cancel(slot.request_id)
                self._finish(
                    slot.index,
                    _failed(
                        slot.index,
                        self.ids[slot.index],
                        ErrorCode.DEADLINE_EXCEEDED.value,
                        f"no reply within {self.request_timeout_s:.0f} s",
                    ),
                )

    def _cancel(self, request_id: str) -> None:
        # If Redis is unreachable, the request's own deadline (timeout_ms) still stops it.
        with contextlib.suppress(redis.RedisError):
            self.client.cancel(request_id)

    def _cancel_all(self) -> None:
        for slot in self.in_flight.values():
            self._cancel(slot.request_id)
            if self.state is not None:
                # A later run sends these documents again rather than waiting for `cancelled`.
                with contextlib.suppress(redis.RedisError):
                    self.state.forget_in_flight(slot.index)
        self.in_flight.clear()
