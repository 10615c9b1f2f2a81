"""Jobs from the outside: enqueue a bulk job, read its status, resume it, cancel it."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterable
from typing import Any

import redis
from rq import Queue, Retry
from rq.exceptions import InvalidJobOperation
from rq.job import Job, JobStatus
from rq.serializers import JSONSerializer

from producer.bulk.documents import DocumentId, id_problem
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
    for doc_id in doc_ids:
        problem = id_problem(doc_id)
        if problem is not None:
            raise ValueError(f"document id {str(doc_id)[:40]!r}: {problem}")
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


def settle_cancelled(job: Job) -> bool:
    """A job that returned after `cancel` (its result says `"cancelled": true`) ends `canceled`, RQ's
    status for it, not `finished`; True if it is `canceled` now. The bulk worker does it as the job
    returns; `status`, `cancel` and `submit --wait` do it for a job another RQ worker ran."""
    status = job.get_status(refresh=True)
    if status == JobStatus.CANCELED:
        return True
    if status != JobStatus.FINISHED:
        return False
    result = job.return_value(refresh=True)
    if not (isinstance(result, dict) and result.get("cancelled")):
        return False
    with contextlib.suppress(InvalidJobOperation):  # cancelled meanwhile by another caller
        job.cancel()
    return True


def job_counts(job: Job) -> dict[str, int]:
    """The job's documents by outcome, from its stored results: `succeeded + failed + in_flight +
    unanswered == total` (`unanswered`: neither answered nor outstanding; a cancelled job's leftovers)."""
    state = job_state(job)
    results = state.results()
    total = len(job.args[0]) if job.args else len(results)
    failed = sum(not r.get("ok") for r in results.values())
    in_flight = 0 if job.get_status() in ENDED else len(set(state.in_flight()) - set(results))
    return {
        "total": total, "succeeded": len(results) - failed, "failed": failed, "in_flight": in_flight,
        "unanswered": total - len(results) - in_flight,
    }  # fmt: skip


ENDED = (JobStatus.FINISHED, JobStatus.FAILED, JobStatus.STOPPED, JobStatus.CANCELED)


def job_status(job_id: str, connection: redis.Redis, *, with_results: bool = True) -> dict[str, Any]:
    """A job's state as JSON: status, progress, counts, and its result or error once it ended."""
    job = Job.fetch(job_id, connection=connection, serializer=JSONSerializer)
    settle_cancelled(job)
    status = job.get_status(refresh=True)
    out: dict[str, Any] = {
        "id": job.id,
        "status": str(status.value if status is not None else "unknown"),
        "description": job.description,
        "progress": job.get_meta(refresh=True).get("progress"),
        "counts": job_counts(job),
        "enqueued_at": job.enqueued_at.isoformat() if job.enqueued_at else None,
        "started_at": job.started_at.isoformat() if job.started_at else None,
        "ended_at": job.ended_at.isoformat() if job.ended_at else None,
    }
    if status in (JobStatus.FINISHED, JobStatus.CANCELED):
        result = job.return_value()
        if result is not None:
            if not with_results and isinstance(result, dict):
                result = {k: v for k, v in result.items() if k != "results"}
            out["result"] = result
    elif status == JobStatus.FAILED:
        latest = job.latest_result()
        out["error"] = latest.exc_string if latest is not None else None
    return out


def _abandoned(job: Job, conn: redis.Redis) -> tuple[list[bytes], bool]:
    """The StartedJobRegistry entries (`job:execution`) of this job, and whether none has a live heartbeat
    (each entry's score is its heartbeat's expiry). Read from the registry itself: an abandoned execution's
    own hash expires before its registry entries do (RQ's `get_executions` then raises)."""
    key = job.started_job_registry.key
    prefix = f"{job.id}:".encode()
    raw: list[tuple[bytes, float]] = conn.zrange(key, 0, -1, withscores=True)  # type: ignore[assignment]
    entries = [(member, score) for member, score in raw if member.startswith(prefix)]
    return [member for member, _ in entries], all(score < time.time() for _, score in entries)


class ResumeRefused(InvalidJobOperation):
    """The job cannot be resumed (cancelled, finished, or started with a live heartbeat and no force)."""


def resume_job(job_id: str, conn: redis.Redis, *, force: bool = False) -> Job:
    """Run a failed, stopped or abandoned job again (it resumes from its stored results).

    A job still marked `started` is run again when its heartbeat has lapsed (its RQ worker died;
    a live worker's maintenance would retry it soon), or at once with `force` (its RQ worker is
    known to be dead). A job already queued again (RQ's retry) is left as it is. Raises
    ResumeRefused (an InvalidJobOperation) otherwise.
    """
    job = Job.fetch(job_id, connection=conn, serializer=JSONSerializer)
    status = job.get_status(refresh=True)
    if status == JobStatus.CANCELED or job_state(job).cancelled():
        raise ResumeRefused(f"job {job_id} was cancelled")
    if status in (JobStatus.QUEUED, JobStatus.SCHEDULED, JobStatus.DEFERRED):
        return job
    queue = bulk_queue(conn, job.origin)
    if status in (JobStatus.FAILED, JobStatus.STOPPED):
        try:
            return job.requeue()
        except InvalidJobOperation:  # no longer in the failed registry (expired there)
            return queue.enqueue_job(job)
    if status == JobStatus.STARTED:
        entries, abandoned = _abandoned(job, conn)
        if not (force or abandoned):
            raise ResumeRefused(f"job {job_id} is started and its heartbeat is live; pass --force if its "
                                "RQ worker is dead")  # fmt: skip
        _forget_executions(job, conn, entries)
        return queue.enqueue_job(job)
    raise ResumeRefused(f"job {job_id} is {status.value if status else 'unknown'}")


def _forget_executions(job: Job, conn: redis.Redis, entries: list[bytes]) -> None:
    """Drop a dead worker's executions of the job (RQ's own removal reads their hashes, expired first)."""
    pipe = conn.pipeline(transaction=True)
    if entries:
        pipe.zrem(job.started_job_registry.key, *entries)
    pipe.delete(job.execution_registry.key)
    pipe.execute()


def cancel_job(
    job_id: str, conn: redis.Redis, *, redis_url: str | None = None, wait_s: float = 0.0
) -> dict[str, Any]:
    """Stop a job: a queued, failed, stopped or abandoned one ends `canceled` at once, a running one stops
    at its next poll (waited for up to `wait_s`, then `canceled`); its outstanding chat requests are
    cancelled through the client (here, and by the job itself). A finished job is left as it is."""
    job = Job.fetch(job_id, connection=conn, serializer=JSONSerializer)
    status = job.get_status(refresh=True)
    out: dict[str, Any] = {"id": job.id, "status_before": status.value if status else None}
    if status in (JobStatus.FINISHED, JobStatus.CANCELED) and not settle_cancelled(job):
        return {**out, "status": status.value, "requests_cancelled": 0, "requests_already_ended": 0,
                "counts": job_counts(job)}  # fmt: skip
    state = job_state(job)
    state.cancel()
    running = status == JobStatus.STARTED
    if running:
        entries, abandoned = _abandoned(job, conn)
        if abandoned:
            _forget_executions(job, conn, entries)
            running = False
    if not running and job.get_status(refresh=True) != JobStatus.CANCELED:
        with contextlib.suppress(InvalidJobOperation):
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
    deadline = time.monotonic() + wait_s
    while running and not settle_cancelled(job) and time.monotonic() < deadline:
        if job.get_status(refresh=True) in ENDED:
            break
        time.sleep(0.2)
    now = job.get_status(refresh=True)
    return {
        **out, "status": now.value if now else None,
        "requests_cancelled": cancelled, "requests_already_ended": ended, "counts": job_counts(job),
    }  # fmt: skip
