"""Bulk document jobs (static batching) through RQ.

One RQ job takes a list of documents and an instruction ("Summarize ..."), sends every
document as a `priority: batch` chat request (system = instruction, user = document), keeps
at most `max_in_flight` requests outstanding, and returns the replies in document order.
Batch requests yield to interactive ones in the workers' scheduler (with aging), so a large
job fills idle GPU time without hurting chat latency.

    python -m producer.bulk submit docs.jsonl --instruction "Summarize in 3 sentences." --wait
    python -m producer.bulk status JOB_ID
    python -m producer.bulk worker            # an RQ worker for the bulk queue (JSON serializer)

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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict
from rq import Queue, Worker, get_current_job
from rq.exceptions import NoSuchJobError
from rq.job import Job
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


@dataclass
class _InFlight:
    index: int
    request_id: str
    deadline_s: float
    last_id: bytes = b"0"


def _ok(index: int, event: DoneEvent) -> dict[str, Any]:
    return {
        "index": index,
        "ok": True,
        "text": event.text,
        "finish_reason": event.finish_reason,
        "usage": event.usage.model_dump(),
        "timings": event.timings.model_dump(),
    }


def _failed(index: int, code: str, message: str) -> dict[str, Any]:
    return {"index": index, "ok": False, "error": {"code": code, "message": message}}


class BulkRun:
    """Sends documents through the service with a bounded window and collects the replies in order.

    All outstanding reply streams are read with one blocking XREAD, so a window of hundreds
    of requests costs one round trip per poll. Requests are sent with `stream: false`, so
    each reply stream holds only its final event.
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
    ):
        self.client = client
        self.documents = documents
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
        self.results: list[dict[str, Any] | None] = [None] * len(documents)
        self.to_send: deque[int] = deque(range(len(documents)))
        self.in_flight: dict[bytes, _InFlight] = {}
        self.refusals = [0] * len(documents)
        settings = client.settings
        self._backoff = Backoff(settings.reconnect_backoff_initial_ms, settings.reconnect_backoff_max_ms)
        self._retry_at_s = 0.0

    @property
    def finished(self) -> int:
        return sum(r is not None for r in self.results)

    @property
    def failed(self) -> int:
        return sum(r is not None and not r["ok"] for r in self.results)

    def run(self, on_progress: Any = None) -> list[dict[str, Any]]:
        """Process every document; `on_progress(run)` is called after each poll."""
        try:
            while self.to_send or self.in_flight:
                self._fill()
                if self.in_flight:
                    self._poll()
                else:
                    time.sleep(max(0.0, self._retry_at_s - time.monotonic()))
                self._expire()
                if on_progress is not None:
                    on_progress(self)
        except BaseException:
            # Stopped (RQ job timeout, Ctrl-C, a bug): workers need not generate replies nobody reads.
            self._cancel_all()
            raise
        return [r for r in self.results if r is not None]

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
                    self.results[index] = _failed(index, exc.code.value, exc.message)
                    continue
                self._refused(index, exc.message, queued=True)
                return
            self.to_send.popleft()
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
            self.results[index] = _failed(index, ErrorCode.OVERLOADED.value, message)
            return
        if not queued:
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
                if isinstance(event, DoneEvent):
                    self.results[slot.index] = _ok(slot.index, event)
                elif isinstance(event, ErrorEvent):
                    if event.code is ErrorCode.OVERLOADED:
                        self._refused(slot.index, event.message, queued=False)
                    else:
                        self.results[slot.index] = _failed(slot.index, event.code.value, event.message)
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
                self.results[slot.index] = _failed(
                    slot.index,
                    ErrorCode.DEADLINE_EXCEEDED.value,
                    f"no reply within {self.request_timeout_s:.0f} s",
                )

    def _cancel(self, request_id: str) -> None:
        # If Redis is unreachable, the request's own deadline (timeout_ms) still stops it.
        with contextlib.suppress(redis.RedisError):
            self.client.cancel(request_id)

    def _cancel_all(self) -> None:
        for slot in self.in_flight.values():
            self._cancel(slot.request_id)
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
) -> dict[str, Any]:
    """The RQ job: every document through the service; results (JSON) in document order."""
    job = get_current_job()
    last_save = [0.0]

    def save_progress(run: BulkRun) -> None:
        if job is None or time.monotonic() - last_save[0] < PROGRESS_SAVE_INTERVAL_S:
            return
        job.meta["progress"] = {
            "total": len(documents),
            "finished": run.finished,
            "failed": run.failed,
            "in_flight": len(run.in_flight),
        }
        job.save_meta()
        last_save[0] = time.monotonic()

    settings = ProducerSettings(prefix=prefix) if prefix else ProducerSettings()
    with ChatClient(settings=settings) as client:
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
        )
        results = run.run(save_progress)
    if job is not None:
        job.meta["progress"] = {
            "total": len(documents),
            "finished": len(results),
            "failed": run.failed,
            "in_flight": 0,
        }
        job.save_meta()
    return {
        "instruction": instruction,
        "total": len(documents),
        "succeeded": len(results) - run.failed,
        "failed": run.failed,
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
) -> Job:
    """Enqueue one bulk job; unset options come from BulkSettings (env `LLM_BULK_*`)."""
    docs = list(documents)
    if not docs:
        raise ValueError("a bulk job needs at least one document")
    if not all(isinstance(d, str) for d in docs):
        raise TypeError("documents must be strings")
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
    }
    return bulk_queue(conn, queue).enqueue_call(
        func=run_bulk_job,
        args=(docs, instruction),
        kwargs=kwargs,
        timeout=job_timeout_s or settings.job_timeout_s,
        result_ttl=settings.result_ttl_s,
        failure_ttl=settings.result_ttl_s,
        description=f"bulk: {len(docs)} documents: {instruction[:80]}",
        meta={"progress": {"total": len(docs), "finished": 0, "failed": 0, "in_flight": 0}},
    )


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


def read_documents(path: str) -> list[str]:
    """Documents from a file ('-' = stdin): a JSON array or JSON Lines of strings or {"text": ...}."""
    raw = sys.stdin.read() if path == "-" else Path(path).read_text(encoding="utf-8")
    stripped = raw.lstrip()
    items: list[Any] = (
        json.loads(raw)
        if stripped.startswith("[")
        else [json.loads(line) for line in raw.splitlines() if line.strip()]
    )
    docs = []
    for n, item in enumerate(items, 1):
        text = item.get("text") if isinstance(item, dict) else item
        if not isinstance(text, str):
            raise ValueError(f"document {n}: expected a string or an object with a string `text`")
        docs.append(text)
    return docs


def _connection(url: str | None) -> redis.Redis:
    return redis.Redis.from_url(url or ProducerSettings().redis_url)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m producer.bulk", description="Bulk document jobs through RQ.")
    p.add_argument("--redis-url", help="default: REDIS_URL or redis://127.0.0.1:6379/0")
    p.add_argument("--queue", help="RQ queue (default LLM_BULK_QUEUE or llm-bulk)")
    sub = p.add_subparsers(dest="command", required=True)
    submit = sub.add_parser("submit", help="enqueue a job for the documents in FILE (JSON array or lines)")
    submit.add_argument("file", help="path, or - for stdin")
    submit.add_argument("--instruction", default=DEFAULT_INSTRUCTION)
    submit.add_argument("--max-in-flight", type=int)
    submit.add_argument("--max-tokens", type=int)
    submit.add_argument("--temperature", type=float, default=0.0)
    submit.add_argument("--seed", type=int)
    submit.add_argument("--wait", action="store_true", help="wait for the job and print its result")
    status = sub.add_parser("status", help="print a job's status (and results once finished) as JSON")
    status.add_argument("job_id")
    status.add_argument("--no-results", action="store_true", help="omit the per-document results")
    work = sub.add_parser("worker", help="run an RQ worker for the bulk queue (JSON serializer)")
    work.add_argument("--burst", action="store_true", help="exit when the queue is empty")
    args = p.parse_args(argv)

    conn = _connection(args.redis_url)
    if args.command == "worker":
        worker = Worker([bulk_queue(conn, args.queue)], connection=conn, serializer=JSONSerializer)
        worker.work(burst=args.burst)
        return 0
    if args.command == "submit":
        job = enqueue_bulk(
            read_documents(args.file),
            args.instruction,
            connection=conn,
            queue=args.queue,
            max_in_flight=args.max_in_flight,
            max_tokens=args.max_tokens,
            temperature=args.temperature,
            seed=args.seed,
        )
        print(job.id)
        if not args.wait:
            return 0
        while not (job.is_finished or job.is_failed or job.is_stopped or job.is_canceled):
            time.sleep(1.0)
        args.job_id, args.no_results = job.id, False
    try:
        state = job_status(args.job_id, conn, with_results=not args.no_results)
    except NoSuchJobError:
        print(f"no job {args.job_id} (unknown, or its results expired)", file=sys.stderr)
        return 1
    print(json.dumps(state, indent=2, ensure_ascii=False))
    return 0 if state["status"] != "failed" else 1


if __name__ == "__main__":
    sys.exit(main())
