"""Jobs from the outside: enqueue a bulk job, read its status, resume it, cancel it."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from typing import Any

import redis
from rq import Queue, Retry
from rq.exceptions import InvalidJobOperation
from rq.job import Job, JobStatus
from rq.serializers import JSONSerializer

from producer.bulk.documents import DocumentId
from producer.bulk.settings import DEFAULT_INSTRUCTION, BulkSettings, rq_redis_url
from producer.bulk.store import job_state
from producer.client import ChatClient
from producer.settings import ProducerSettings

# The job function by its public import path (re-exported by the package), not by the module
# that defines it: a job enqueued from `python -m producer.bulk` would otherwise be stored under
# `__main__`, and jobs already enqueued keep naming this path whatever module holds it.
JOB_FUNC = "producer.bulk.run_bulk_job"


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

    `connection`: RQ's Redis (default: `rq_redis_url()`); the job's chat requests go to the RQ
    worker's own `REDIS_URL` (a cluster with `LLM_REDIS_CLUSTER=true`).

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
    # RQ's queue: LLM_BULK_RQ_REDIS_URL, else REDIS_URL (never a cluster: settings.py says why).
    conn = connection or redis.Redis.from_url(rq_redis_url(settings=settings, producer=producer_settings))
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
    # The running job cancels its outstanding requests too once it sees the flag: whichever comes first
    # writes the `cancelled` reply, and the other finds the request already ended.
    cancelled = ended = 0
    with ChatClient(settings=settings) as client:
        for sent in state.in_flight().values():
            with contextlib.suppress(redis.RedisError):
                if client.cancel(sent["request_id"]):
                    cancelled += 1
                else:
                    ended += 1
    return {
        "id": job.id, "status_before": status.value if status else None,
        "requests_cancelled": cancelled, "requests_already_ended": ended,
    }  # fmt: skip
