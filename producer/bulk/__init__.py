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
    python -m producer.bulk cancel JOB_ID     # stop a job (it ends `canceled`) and cancel its requests
    python -m producer.bulk worker            # BulkWorker: an RQ worker for the bulk queue (JSON serializer)

`submit` checks every line as a worker checks its request and refuses the whole file when one is
bad (`FILE:LINE: CODE: message` each; `--skip-invalid` submits the rest); a document that still
fails at run time gets its own error result, and the job goes on.

Jobs are resumable: each document's result is stored in Redis as it arrives (a hash per job,
`llm-bulk:job:<id>:results`), and so is each outstanding request's id
(`llm-bulk:job:<id>:inflight`). A job that runs again (RQ's retry of an abandoned job, or
`resume`) keeps the stored results, waits for the replies of the requests already sent, and
sends only the documents nobody has sent yet. One run of a job at a time: a run holds the job's run
lock (`llm-bulk:job:<id>:lock`), and another run of the same job (`resume --force` while the first
lives, RQ retrying a job whose live worker missed its heartbeat) waits for it, sending nothing.

Jobs, their arguments, progress and results are stored with RQ's JSON serializer: the
project keeps pickle off the wire and out of Redis. `rq worker` works too, given
`--serializer rq.serializers.JSONSerializer`. The Redis that carries the chat requests is
the RQ worker's `REDIS_URL` (ProducerSettings, a Redis Cluster with `LLM_REDIS_CLUSTER=true`);
a job carries no credentials. RQ's queue and the jobs' stored state are on
`LLM_BULK_RQ_REDIS_URL`, by default the same `REDIS_URL`, and never on a cluster (settings.py).

Modules, one concept each:

    settings.py   BulkSettings (env `LLM_BULK_*`), the default instruction, RQ's Redis (rq_redis_url)
    documents.py  the input file: documents, their ids, the bad lines and their codes (parse_documents)
    validate.py   a document's chat request, checked as a worker checks it (check_document)
    store.py      a job's resumable state in Redis: results and outstanding requests (JobState)
    run_lock.py   RunLock: at most one run of a job at a time (a lease the run's loop renews)
    run.py        BulkRun: the bounded window of requests, replies collected in document order
    job.py        run_bulk_job, the RQ job function
    control.py    enqueue_bulk, job_status, resume_job, cancel_job, bulk_queue, settle_cancelled
    worker.py     BulkWorker: RQ's Worker with a bounded recovery time for abandoned jobs
    cli.py        main: the argparse CLI, the progress bar, the results as JSON lines

This package re-exports the names other code imports from `producer.bulk`. Two of them are
paths other programs name and must stay: `producer.bulk.run_bulk_job` (every enqueued job
names its function by that path, see `control.JOB_FUNC`) and `producer.bulk.main` (the
console script `llm-bulk`; `python -m producer.bulk` runs `__main__.py`).
"""

from producer.bulk.cli import main
from producer.bulk.control import bulk_queue, cancel_job, enqueue_bulk, job_status, resume_job
from producer.bulk.documents import DocumentId, InputFile, parse_documents, read_documents
from producer.bulk.job import run_bulk_job
from producer.bulk.settings import DEFAULT_INSTRUCTION, BulkSettings
from producer.bulk.store import JobState

__all__ = [
    "DEFAULT_INSTRUCTION",
    "BulkSettings",
    "DocumentId",
    "InputFile",
    "JobState",
    "bulk_queue",
    "cancel_job",
    "enqueue_bulk",
    "job_status",
    "main",
    "parse_documents",
    "read_documents",
    "resume_job",
    "run_bulk_job",
]
