"""Bulk document jobs (static batching) through RQ.

One RQ job takes a list of documents and an instruction ("Summarize ..."), sends every
document as a `priority: batch` chat request (system = instruction, user = document), keeps
at most `max_in_flight` requests outstanding, and returns the replies in document order.
Batch requests yield to interactive ones in the workers' scheduler (with aging), so a large
job fills idle GPU time without hurting chat latency.

    python -m producer.bulk submit docs.jsonl --instruction "Summarize in 3 sentences." --wait
    python -m producer.bulk status JOB_ID
    python -m producer.bulk results JOB_ID    # the results stored so far, as JSON lines
    python -m producer.bulk resume JOB_ID     # run a failed, stopped or abandoned job again
    python -m producer.bulk cancel JOB_ID     # stop a job and cancel its outstanding requests
    python -m producer.bulk worker            # an RQ worker for the bulk queue (JSON serializer)

Jobs are resumable: each document's result is stored in Redis as it arrives (a hash per job,
`llm-bulk:job:<id>:results`), and so is each outstanding request's id
(`llm-bulk:job:<id>:inflight`). A job that runs again (RQ's retry of an abandoned job, or
`resume`) keeps the stored results, waits for the replies of the requests already sent, and
sends only the documents nobody has sent yet.

Jobs, their arguments, progress and results are stored with RQ's JSON serializer: the
project keeps pickle off the wire and out of Redis. `rq worker` works too, given
`--serializer rq.serializers.JSONSerializer`. The Redis that carries the chat requests is
the RQ worker's `REDIS_URL` (ProducerSettings); a job carries no credentials.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict
from rq import Queue, Retry, Worker, get_current_job
from rq.exceptions import InvalidJobOperation, NoSuchJobError
from rq.job import Job, JobStatus
from rq.serializers import JSONSerializer

from producer.client import ChatClient, ChatError
from producer.settings import ProducerSettings
from producer.wire.backoff import Backoff
from producer.wire.codec import decode_event
from producer.wire.limits import MAX_TOKENS_CAP
from producer.wire.models import DoneEvent, ErrorCode, ErrorEvent
from producer.wire.redis_types import read_entries

DEFAULT_INSTRUCTION = "Summarize the document in at most three sentences."
# A client-side grace past a request's own deadline: the worker answers `deadline_exceeded`
# itself; this only ends the wait when no worker is alive to answer.
DEADLINE_GRACE_S = 30.0
PROGRESS_SAVE_INTERVAL_S = 1.0
# The job function by its import path: a job enqueued from `python -m producer.bulk` would
# otherwise be stored as `__main__.run_bulk_job`, which no RQ worker can import.
JOB_FUNC = "producer.bulk.run_bulk_job"
STATE_KEY_PREFIX = "llm-bulk:job:"


class BulkSettings(BaseSettings):
    """Defaults of bulk jobs and the bulk RQ worker; env vars `LLM_BULK_<FIELD>`."""

    model_config = SettingsConfigDict(env_prefix="LLM_BULK_", extra="ignore")

    queue: str = Field(default="llm-bulk", description="RQ queue of bulk document jobs.")
    max_in_flight_requests: int = Field(
        default=32, ge=1, le=1024, description="Most chat requests one job keeps outstanding at once."
    )
    max_tokens: int = Field(
        default=256, ge=1, le=MAX_TOKENS_CAP, description="max_tokens of each document's reply."
    )
    request_timeout_s: float = Field(
        default=1800.0,
        gt=0,
        description="Each document's deadline, from its submission (the request's timeout_ms).",
    )
    job_timeout_s: int = Field(
        default=6 * 3600, ge=1, description="RQ job timeout: the whole job is stopped after it."
    )
    result_ttl_s: int = Field(
        default=7 * 24 * 3600, ge=1, description="How long a finished job's results (or failure) are kept."
    )
    overloaded_retries: int = Field(
        default=20, ge=0, description="How often one document is resubmitted after an `overloaded` refusal."
    )
    abandoned_retries: int = Field(
        default=3,
        ge=0,
        description="How often RQ runs a job again after its RQ worker died (it resumes where it stopped).",
    )


DocumentId = str | int


class JobState:
    """A job's results and outstanding requests in Redis, written as they change (what makes it resumable).

    `<prefix><job>:results`: document index -> its result (JSON); `<prefix><job>:inflight`:
    document index -> {"request_id", "submitted_at"} of the request sent for it and not yet
    answered; `<prefix><job>:cancel`: set by `cancel`. Every key expires `ttl_s` after its last write.
    """

    def __init__(self, connection: redis.Redis, job_id: str, ttl_s: int):
        self.redis = connection
        self.job_id = job_id
        self.ttl_s = ttl_s
        base = f"{STATE_KEY_PREFIX}{job_id}"
        self.results_key = f"{base}:results"
        self.inflight_key = f"{base}:inflight"
        self.cancel_key = f"{base}:cancel"

    def results(self) -> dict[int, dict[str, Any]]:
        raw = self.redis.hgetall(self.results_key)
        return {int(k): json.loads(v) for k, v in raw.items()}

    def answered(self) -> int:
        return int(self.redis.hlen(self.results_key))

    def in_flight(self) -> dict[int, dict[str, Any]]:
        raw = self.redis.hgetall(self.inflight_key)
        return {int(k): json.loads(v) for k, v in raw.items()}

    def sent(self, index: int, request_id: str) -> None:
        pipe = self.redis.pipeline(transaction=True)
        sent = {"request_id": request_id, "submitted_at": time.time()}
        pipe.hset(self.inflight_key, str(index), json.dumps(sent))
        pipe.expire(self.inflight_key, self.ttl_s)
        pipe.execute()

    def done(self, index: int, result: dict[str, Any]) -> None:
        pipe = self.redis.pipeline(transaction=True)
        pipe.hset(self.results_key, str(index), json.dumps(result, ensure_ascii=False))
        pipe.hdel(self.inflight_key, str(index))
        pipe.expire(self.results_key, self.ttl_s)
        pipe.execute()

    def forget_in_flight(self, index: int) -> None:
        self.redis.hdel(self.inflight_key, str(index))

    def cancel(self) -> None:
        self.redis.set(self.cancel_key, b"1", ex=self.ttl_s)

    def cancelled(self) -> bool:
        return bool(self.redis.exists(self.cancel_key))


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
    of requests costs one round trip per poll. Requests are sent with `stream: false`, so
    each reply stream holds only its final event. With a `state`, results and outstanding
    requests are stored as they change, and a run over the same state resumes where an
    earlier one stopped.
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
        self.params: dict[str, Any] = {
            "max_tokens": max_tokens,
            "temperature": temperature,
            "stream": False,
            "priority": "batch",
            "tenant": tenant,
            "timeout_ms": int(request_timeout_s * 1000),
        }
        if seed is not None:
            self.params["seed"] = seed
        self.metadata = metadata or {}
        self.state = state
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

    def _load(self, state: JobState) -> None:
        for index, result in state.results().items():
            if 0 <= index < len(self.results):
                self.results[index] = result
                self.resumed += 1
        now_wall, now = time.time(), time.monotonic()
        for index, sent in state.in_flight().items():
            if not 0 <= index < len(self.results) or self.results[index] is not None:
                continue
            key = self.client.names.reply(sent["request_id"])
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
                if self.state is not None and self.state.cancelled():
                    raise BulkCancelled(self.state.job_id)
                self._fill()
                if self.in_flight:
                    self._poll()
                else:
                    time.sleep(max(0.0, self._retry_at_s - time.monotonic()))
                self._expire()
                if on_progress is not None:
                    on_progress(self)
        except BaseException:
            # Stopped (cancelled, job timeout, Ctrl-C, a bug): workers need not generate replies nobody reads.
            self._cancel_all()
            raise
        return [r for r in self.results if r is not None]

    def _finish(self, index: int, result: dict[str, Any]) -> None:
        self.results[index] = result
        if self.state is not None:
            self.state.done(index, result)

    def _fill(self) -> None:
        while self.to_send and len(self.in_flight) < self.max_in_flight:
            if time.monotonic() < self._retry_at_s:
                return
            index = self.to_send[0]
            messages = [
                {"role": "system", "content": self.instruction},
                {"role": "user", "content": self.documents[index]},
            ]
            metadata = {**self.metadata, "index": index}
            try:
                request_id = self.client.submit(messages, metadata=metadata, **self.params)
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
            key = self.client.names.reply(request_id).encode()
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

    def _poll(self) -> None:
        streams: dict[Any, Any] = {key: slot.last_id for key, slot in self.in_flight.items()}
        got = read_entries(
            self.client.redis.xread(streams, block=self.client.settings.reply_block_ms, count=16)
        )
        for key, entries in got:
            slot = self.in_flight.get(key)
            if slot is None:
                continue
            for entry_id, fields in entries:
                slot.last_id = entry_id
                event = decode_event(fields)
                doc_id = self.ids[slot.index]
                if isinstance(event, DoneEvent):
                    self._finish(slot.index, _ok(slot.index, doc_id, event))
                elif isinstance(event, ErrorEvent):
                    if event.code is ErrorCode.OVERLOADED:
                        self._refused(slot.index, event.message, queued=False)
                    else:
                        self._finish(slot.index, _failed(slot.index, doc_id, event.code.value, event.message))
                else:
                    continue
                del self.in_flight[key]
                break

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


def run_bulk_job(
    documents: list[str],
    instruction: str,
    *,
    prefix: str | None = None,
    max_in_flight: int = 32,
    max_tokens: int = 256,
    temperature: float = 0.0,
    seed: int | None = None,
    request_timeout_s: float = 1800.0,
    overloaded_retries: int = 20,
    tenant: str = "bulk",
    ids: list[DocumentId] | None = None,
    state_ttl_s: int | None = None,
) -> dict[str, Any]:
    """The RQ job: every document through the service; results (JSON) in document order.

    Run again (RQ's retry, `resume`), it resumes from the results and requests stored so far.
    """
    job = get_current_job()
    last_save = [0.0]

    def progress(run: BulkRun) -> dict[str, int]:
        return {
            "total": len(documents),
            "finished": run.finished,
            "failed": run.failed,
            "in_flight": len(run.in_flight),
        }

    def save_progress(run: BulkRun) -> None:
        if job is None or time.monotonic() - last_save[0] < PROGRESS_SAVE_INTERVAL_S:
            return
        job.meta["progress"] = progress(run)
        job.save_meta()
        last_save[0] = time.monotonic()

    settings = ProducerSettings(prefix=prefix) if prefix else ProducerSettings()
    cancelled = False
    with ChatClient(settings=settings) as client:
        state = None
        if job is not None:
            state = JobState(job.connection, job.id, state_ttl_s or BulkSettings().result_ttl_s)
        run = BulkRun(
            client,
            documents,
            instruction,
            max_in_flight=max_in_flight,
            max_tokens=max_tokens,
            request_timeout_s=request_timeout_s,
            overloaded_retries=overloaded_retries,
            temperature=temperature,
            seed=seed,
            tenant=tenant,
            metadata={"bulk_job": job.id} if job is not None else {},
            ids=ids,
            state=state,
        )
        if job is not None and (run.resumed or run.reattached):
            job.meta["resumed"] = {"results": run.resumed, "in_flight": run.reattached}
        try:
            results = run.run(save_progress)
        except BulkCancelled:
            cancelled = True
            results = [r for r in run.results if r is not None]
    if job is not None:
        job.meta["progress"] = progress(run)
        job.save_meta()
    return {
        "instruction": instruction,
        "total": len(documents),
        "succeeded": len(results) - run.failed,
        "failed": run.failed,
        "cancelled": cancelled,
        "results": results,
    }


def bulk_queue(connection: redis.Redis, name: str | None = None) -> Queue:
    """The RQ queue of bulk jobs, with the JSON serializer."""
    return Queue(name or BulkSettings().queue, connection=connection, serializer=JSONSerializer)


def enqueue_bulk(
    documents: Iterable[str],
    instruction: str = DEFAULT_INSTRUCTION,
    *,
    connection: redis.Redis | None = None,
    queue: str | None = None,
    prefix: str | None = None,
    max_in_flight: int | None = None,
    max_tokens: int | None = None,
    temperature: float = 0.0,
    seed: int | None = None,
    request_timeout_s: float | None = None,
    job_timeout_s: int | None = None,
    tenant: str = "bulk",
    ids: Iterable[DocumentId] | None = None,
    input_errors: list[dict[str, Any]] | None = None,
) -> Job:
    """Enqueue one bulk job; unset options come from BulkSettings (env `LLM_BULK_*`).

    `ids` name the documents in the results (default: 1, 2, ...); `input_errors` (the
    skipped input lines) are kept in the job's meta for `status`.
    """
    docs = list(documents)
    if not docs:
        raise ValueError("a bulk job needs at least one document")
    if not all(isinstance(d, str) for d in docs):
        raise TypeError("documents must be strings")
    doc_ids = list(ids) if ids is not None else list(range(1, len(docs) + 1))
    if len(doc_ids) != len(docs):
        raise ValueError("ids and documents differ in length")
    if len(set(doc_ids)) != len(doc_ids):
        raise ValueError("document ids must be unique")
    settings = BulkSettings()
    producer_settings = ProducerSettings()
    conn = connection or redis.Redis.from_url(producer_settings.redis_url)
    kwargs = {
        "prefix": prefix or producer_settings.prefix,
        "max_in_flight": max_in_flight or settings.max_in_flight_requests,
        "max_tokens": max_tokens or settings.max_tokens,
        "temperature": temperature,
        "seed": seed,
        "request_timeout_s": request_timeout_s or settings.request_timeout_s,
        "overloaded_retries": settings.overloaded_retries,
        "tenant": tenant,
        "ids": doc_ids,
        "state_ttl_s": settings.result_ttl_s,
    }
    meta: dict[str, Any] = {"progress": {"total": len(docs), "finished": 0, "failed": 0, "in_flight": 0}}
    if input_errors:
        meta["input_errors"] = input_errors
    return bulk_queue(conn, queue).enqueue_call(
        func=JOB_FUNC,
        args=(docs, instruction),
        kwargs=kwargs,
        timeout=job_timeout_s or settings.job_timeout_s,
        result_ttl=settings.result_ttl_s,
        failure_ttl=settings.result_ttl_s,
        description=f"bulk: {len(docs)} documents: {instruction[:80]}",
        meta=meta,
        retry=Retry(max=settings.abandoned_retries) if settings.abandoned_retries else None,
    )


def job_state(job: Job) -> JobState:
    return JobState(job.connection, job.id, int(job.kwargs.get("state_ttl_s") or BulkSettings().result_ttl_s))


def job_status(job_id: str, connection: redis.Redis, *, with_results: bool = True) -> dict[str, Any]:
    """A job's state as JSON: status, progress, and its result or error once it ended."""
    job = Job.fetch(job_id, connection=connection, serializer=JSONSerializer)
    status = job.get_status(refresh=True)
    out: dict[str, Any] = {
        "id": job.id,
        "status": str(status.value if status is not None else "unknown"),
        "description": job.description,
        "progress": job.get_meta(refresh=True).get("progress"),
        "enqueued_at": job.enqueued_at.isoformat() if job.enqueued_at else None,
        "started_at": job.started_at.isoformat() if job.started_at else None,
        "ended_at": job.ended_at.isoformat() if job.ended_at else None,
    }
    if job.is_finished:
        result = job.return_value()
        if not with_results and isinstance(result, dict):
            result = {k: v for k, v in result.items() if k != "results"}
        out["result"] = result
    elif job.is_failed:
        latest = job.latest_result()
        out["error"] = latest.exc_string if latest is not None else None
    return out


@dataclass
class InputFile:
    """A documents file: the good lines' documents and ids, and the bad lines (1-based `line`, `reason`)."""

    documents: list[str] = field(default_factory=list)
    ids: list[DocumentId] = field(default_factory=list)
    errors: list[dict[str, Any]] = field(default_factory=list)


def parse_documents(raw: str) -> InputFile:
    """JSON Lines (or one JSON array) of strings or {"text": ..., "id": ...} objects.

    A bad line (invalid JSON, no string `text`, an empty text, an id that is not a string or
    integer, a repeated id) is reported with its line number (its item number in an array)
    and skipped; the other lines are kept. A document's id defaults to its line number.
    """
    out = InputFile()
    items: list[tuple[int, Any]] = []
    if raw.lstrip().startswith("["):
        try:
            array = json.loads(raw)
        except json.JSONDecodeError as exc:
            out.errors.append({"line": exc.lineno, "reason": f"invalid JSON array: {exc.msg}"})
            return out
        items = list(enumerate(array, 1))
    else:
        for n, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            try:
                items.append((n, json.loads(line)))
            except json.JSONDecodeError as exc:
                out.errors.append({"line": n, "reason": f"invalid JSON: {exc.msg} (column {exc.colno})"})
    seen: dict[DocumentId, int] = {}
    for n, item in items:
        doc_id: Any = n
        if isinstance(item, dict):
            text = item.get("text")
            if "id" in item:
                doc_id = item["id"]
        else:
            text = item
        if not isinstance(text, str):
            out.errors.append({"line": n, "reason": 'expected a string or an object with a string "text"'})
            continue
        if not text.strip():
            out.errors.append({"line": n, "reason": "empty document"})
            continue
        if isinstance(doc_id, bool) or not isinstance(doc_id, str | int):
            out.errors.append({"line": n, "reason": '"id" must be a string or an integer'})
            continue
        if doc_id in seen:
            reason = f"duplicate id {doc_id!r} (first on line {seen[doc_id]})"
            out.errors.append({"line": n, "reason": reason})
            continue
        seen[doc_id] = n
        out.documents.append(text)
        out.ids.append(doc_id)
    out.errors.sort(key=lambda e: e["line"])
    return out


def read_documents(path: str) -> InputFile:
    """parse_documents of a file ('-' = stdin)."""
    return parse_documents(sys.stdin.read() if path == "-" else Path(path).read_text(encoding="utf-8"))


def _connection(url: str | None) -> redis.Redis:
    return redis.Redis.from_url(url or ProducerSettings().redis_url)


def _fetch(job_id: str, conn: redis.Redis) -> Job | None:
    try:
        return Job.fetch(job_id, connection=conn, serializer=JSONSerializer)
    except NoSuchJobError:
        print(f"no job {job_id} (unknown, or its results expired)", file=sys.stderr)
        return None


ENDED = (JobStatus.FINISHED, JobStatus.FAILED, JobStatus.STOPPED, JobStatus.CANCELED)


def _wait(job: Job, *, show_progress: bool) -> JobStatus | None:
    """Wait for the job to end; a progress bar (answered documents) on stderr meanwhile."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    state = job_state(job)
    total = len(job.args[0]) if job.args else None
    columns = (TextColumn("[progress.description]{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn())  # fmt: skip
    console = Console(stderr=True)
    with Progress(*columns, console=console, disable=not show_progress, transient=False) as bar:
        task = bar.add_task(f"job {job.id}", total=total)
        while True:
            status = job.get_status(refresh=True)
            bar.update(task, completed=state.answered())
            if status in ENDED:
                return status
            time.sleep(0.5)


def _write_results(job: Job, output: str | None) -> int:
    """The job's results stored so far, in document order, as JSON lines (stdout or `output`)."""
    results = [r for _, r in sorted(job_state(job).results().items())]
    lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in results)
    if output:
        Path(output).write_text(lines, encoding="utf-8")
    else:
        sys.stdout.write(lines)
        sys.stdout.flush()
    return len(results)


def resume_job(job_id: str, conn: redis.Redis, *, force: bool = False) -> Job:
    """Run a failed or stopped job again (it resumes from its stored results).

    A job still marked `started` is resumed only with `force` (its RQ worker is known to be
    dead; RQ itself retries it once the worker's heartbeat expires).
    """
    job = Job.fetch(job_id, connection=conn, serializer=JSONSerializer)
    status = job.get_status(refresh=True)
    if job_state(job).cancelled():
        raise InvalidJobOperation(f"job {job_id} was cancelled")
    if status in (JobStatus.FAILED, JobStatus.STOPPED):
        return job.requeue()
    if status == JobStatus.STARTED and force:
        job.started_job_registry.remove_executions(job)
        queue = bulk_queue(conn, job.origin)
        return queue.enqueue_job(job)
    raise InvalidJobOperation(
        f"job {job_id} is {status.value if status else 'unknown'}"
        + ("; pass --force if its RQ worker is dead" if status == JobStatus.STARTED else "")
    )


def cancel_job(job_id: str, conn: redis.Redis, *, redis_url: str | None = None) -> dict[str, Any]:
    """Stop a job: a queued one never runs, a running one stops at its next poll; its outstanding
    chat requests are cancelled through the client (here, and by the job itself)."""
    job = Job.fetch(job_id, connection=conn, serializer=JSONSerializer)
    state = job_state(job)
    state.cancel()
    status = job.get_status(refresh=True)
    if status in (JobStatus.QUEUED, JobStatus.DEFERRED, JobStatus.SCHEDULED):
        job.cancel()
    prefix = job.kwargs.get("prefix")
    url: dict[str, Any] = {"redis_url": redis_url} if redis_url else {}
    settings = ProducerSettings(**url, **({"prefix": prefix} if prefix else {}))
    cancelled = 0
    with ChatClient(settings=settings) as client:
        for sent in state.in_flight().values():
            with contextlib.suppress(redis.RedisError):
                cancelled += bool(client.cancel(sent["request_id"]))
    return {"id": job.id, "status_before": status.value if status else None, "requests_cancelled": cancelled}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m producer.bulk", description="Bulk document jobs through RQ.")
    p.add_argument("--redis-url", help="default: REDIS_URL or redis://127.0.0.1:6379/0")
    p.add_argument("--queue", help="RQ queue (default LLM_BULK_QUEUE or llm-bulk)")
    sub = p.add_subparsers(dest="command", required=True)
    submit = sub.add_parser("submit", help="enqueue a job for the documents in FILE (JSON lines or array)")
    submit.add_argument("file", help="path, or - for stdin")
    submit.add_argument("--instruction", default=DEFAULT_INSTRUCTION)
    submit.add_argument("--max-in-flight", type=int)
    submit.add_argument("--max-tokens", type=int)
    submit.add_argument("--temperature", type=float, default=0.0)
    submit.add_argument("--seed", type=int)
    submit.add_argument("--strict", action="store_true", help="refuse the whole file if any line is bad")
    submit.add_argument("--wait", action="store_true",
                        help="wait for the job (progress on stderr) and write its results as JSON lines")
    submit.add_argument("--output", help="with --wait: write the results to this file instead of stdout")
    submit.add_argument("--no-progress", action="store_true", help="with --wait: no progress bar")
    status = sub.add_parser("status", help="print a job's status (and results once finished) as JSON")
    status.add_argument("job_id")
    status.add_argument("--no-results", action="store_true", help="omit the per-document results")
    res = sub.add_parser("results", help="write a job's results stored so far as JSON lines")
    res.add_argument("job_id")
    res.add_argument("--output", help="write to this file instead of stdout")
    resume = sub.add_parser("resume", help="run a failed, stopped or abandoned job again, where it stopped")
    resume.add_argument("job_id")
    resume.add_argument("--force", action="store_true",
                        help="also a job still marked started (its RQ worker is dead)")
    cancel = sub.add_parser("cancel", help="stop a job and cancel its outstanding chat requests")
    cancel.add_argument("job_id")
    work = sub.add_parser("worker", help="run an RQ worker for the bulk queue (JSON serializer)")
    work.add_argument("--burst", action="store_true", help="exit when the queue is empty")
    args = p.parse_args(argv)

    conn = _connection(args.redis_url)
    if args.command == "worker":
        worker = Worker([bulk_queue(conn, args.queue)], connection=conn, serializer=JSONSerializer)
        worker.work(burst=args.burst)
        return 0
    if args.command == "submit":
        return _submit(args, conn)
    job = _fetch(args.job_id, conn)
    if job is None:
        return 1
    if args.command == "results":
        n = _write_results(job, args.output)
        print(f"{n} results", file=sys.stderr)
        return 0
    if args.command == "resume":
        try:
            job = resume_job(job.id, conn, force=args.force)
        except InvalidJobOperation as exc:
            print(f"cannot resume: {exc}", file=sys.stderr)
            return 1
        print(f"job {job.id} queued again; it resumes with {job_state(job).answered()} documents answered",
              file=sys.stderr)
        return 0
    if args.command == "cancel":
        print(json.dumps(cancel_job(job.id, conn, redis_url=args.redis_url)))
        return 0
    state = job_status(args.job_id, conn, with_results=not args.no_results)
    print(json.dumps(state, indent=2, ensure_ascii=False))
    return 0 if state["status"] != "failed" else 1


def _submit(args: argparse.Namespace, conn: redis.Redis) -> int:
    try:
        parsed = read_documents(args.file)
    except (OSError, UnicodeDecodeError) as exc:
        print(f"cannot read {args.file}: {exc}", file=sys.stderr)
        return 2
    for error in parsed.errors:
        print(f"{args.file}:{error['line']}: {error['reason']}", file=sys.stderr)
    if parsed.errors:
        if args.strict or not parsed.documents:
            why = "--strict" if parsed.documents else "no good lines"
            print(f"{len(parsed.errors)} bad lines; nothing submitted ({why})", file=sys.stderr)
            return 2
        good = len(parsed.documents)
        bad = len(parsed.errors)
        print(f"{bad} bad lines skipped; submitting the other {good} documents", file=sys.stderr)
    elif not parsed.documents:
        print(f"{args.file}: no documents; nothing submitted", file=sys.stderr)
        return 2
    job = enqueue_bulk(
        parsed.documents,
        args.instruction,
        connection=conn,
        queue=args.queue,
        max_in_flight=args.max_in_flight,
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        seed=args.seed,
        ids=parsed.ids,
        input_errors=parsed.errors,
    )
    if not args.wait:
        print(job.id)
        return 0
    print(f"job {job.id}: {len(parsed.documents)} documents", file=sys.stderr)
    try:
        ended = _wait(job, show_progress=not args.no_progress)
    except KeyboardInterrupt:
        print(f"\nstopped waiting; job {job.id} goes on (cancel: llm-bulk cancel {job.id})", file=sys.stderr)
        return 130
    n = _write_results(job, args.output)
    result = job.return_value() if ended == JobStatus.FINISHED else None
    if isinstance(result, dict):
        summary = f"{result['succeeded']} succeeded, {result['failed']} failed"
        if result.get("cancelled"):
            summary += ", cancelled"
        print(f"job {job.id} finished: {summary}", file=sys.stderr)
        return 1 if result.get("cancelled") else 0
    print(f"job {job.id} {ended.value if ended else 'ended'}; {n} results stored", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
