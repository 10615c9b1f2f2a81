"""Bulk document jobs through RQ (see `producer.bulk.run`)."""

from producer.bulk.run import (
    BulkSettings,
    JobState,
    bulk_queue,
    enqueue_bulk,
    job_status,
    main,
    read_documents,
    run_bulk_job,
)

__all__ = [
    "BulkSettings",
    "JobState",
    "bulk_queue",
    "enqueue_bulk",
    "job_status",
    "main",
    "read_documents",
    "run_bulk_job",
]
