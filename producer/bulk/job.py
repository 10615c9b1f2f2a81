"""The RQ job function: one bulk job, run (or run again, resuming) inside an RQ worker.

Jobs name it by its public path, `producer.bulk.run_bulk_job` (see `control.JOB_FUNC`).
"""

from __future__ import annotations

import time
from typing import Any

from rq import get_current_job

from producer.bulk.documents import DocumentId
from producer.bulk.run import BulkCancelled, BulkRun
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

    Run again (RQ's retry, `resume`), it resumes from the results and requests stored so far.
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
    return job_result(instruction, len(documents), results, cancelled=cancelled)


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
