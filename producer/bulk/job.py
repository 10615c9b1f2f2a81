"""The RQ job function: one bulk job, run (or run again, resuming) inside an RQ worker.

Jobs name it by its public path, `producer.bulk.run_bulk_job` (see `control.JOB_FUNC`). A run takes the
job's RunLock before it loads the stored state, so two runs of one job never send at once: a second run
waits for the first (run_lock.py says why it waits rather than fails).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from typing import Any

import redis
from rq import get_current_job

from producer.bulk.documents import DocumentId
from producer.bulk.run import BulkCancelled, BulkRun
from producer.bulk.run_lock import RunLock, RunLockLost, log
from producer.bulk.settings import BulkSettings
from producer.bulk.store import JobState
from producer.client import ChatClient
from producer.settings import ProducerSettings

PROGRESS_SAVE_INTERVAL_S = 1.0


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

    Run again (RQ's retry, `resume`), it resumes from the results and requests stored so far; while
    another run of the job holds its run lock, it waits for it.
    """
    job = get_current_job()
    last_save = [0.0]

    def progress(run: BulkRun) -> dict[str, int]:
        # `finished` counts the answered documents, `failed` those of them that failed.
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
    with ChatClient(settings=settings) as client:
        state = lock = None
        if job is not None:
            state = JobState(job.connection, job.id, state_ttl_s or BulkSettings().result_ttl_s)
            lock = RunLock(job.connection, state.lock_key, job.id, BulkSettings().heartbeat_ttl_s)

        def new_run() -> BulkRun:
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
                lock=lock,
            )
            if job is not None and (run.resumed or run.reattached):
                job.meta["resumed"] = {"results": run.resumed, "in_flight": run.reattached}
            return run

        if lock is None or state is None:
            run = new_run()
            cancelled = run_to_end(run, save_progress)
        else:
            ended = run_locked(lock, state, new_run, save_progress)
            if ended is None:  # cancelled while another run held the job: that run stores what it has
                return job_result(instruction, len(documents), stored_results(state), cancelled=True)
            run, cancelled = ended
    if job is not None:
        job.meta["progress"] = progress(run)
        job.save_meta()
    return job_result(
        instruction, len(documents), [r for r in run.results if r is not None], cancelled=cancelled
    )


def run_to_end(run: BulkRun, on_progress: Callable[[BulkRun], None]) -> bool:
    """Run it until every document is answered; True if the job was cancelled first."""
    try:
        run.run(on_progress)
    except BulkCancelled:
        return True
    return False


def run_locked(
    lock: RunLock, state: JobState, new_run: Callable[[], BulkRun], on_progress: Callable[[BulkRun], None]
) -> tuple[BulkRun, bool] | None:
    """`new_run()` run to its end under the job's run lock: (the run, whether it was cancelled); None if the
    job was cancelled while another run held the lock. A run that loses the lock is dropped, and once the
    lock is this run's again a new one resumes from the stored state."""
    while True:
        if not lock.acquire(stop=state.cancelled):
            return None
        try:
            run = new_run()
            return run, run_to_end(run, on_progress)
        except RunLockLost as exc:
            log.warning("%s; this run waits for the job again", exc)
        finally:
            with contextlib.suppress(redis.RedisError):
                lock.release()


def stored_results(state: JobState) -> list[dict[str, Any]]:
    """The results a job has stored, in document order."""
    return [result for _, result in sorted(state.results().items())]


def job_result(
    instruction: str, total: int, results: list[dict[str, Any]], *, cancelled: bool
) -> dict[str, Any]:
    """A job's result. `succeeded + failed + unanswered == total`: `unanswered` counts the documents a
    cancel left without an answer (0 for a job that ran to its end)."""
    failed = sum(not r["ok"] for r in results)
    return {
        "instruction": instruction,
        "total": total,
        "succeeded": len(results) - failed,
        "failed": failed,
        "unanswered": total - len(results),
        "cancelled": cancelled,
        "results": results,
    }
