"""BulkWorker: the RQ worker of `llm-bulk worker`, RQ's Worker with a bounded recovery time.

A job whose RQ worker dies (kill -9, OOM, node loss) stays `started` until its heartbeat lapses and
some live worker's maintenance pass moves it (RQ retries it: it resumes from its stored state).
With RQ's defaults that is a 90 s heartbeat and a pass every 10 minutes, and an idle worker only
looks between two blocking dequeues of `worker_ttl - 15` s (405 s). BulkWorker bounds both from
BulkSettings: the heartbeat TTL is `LLM_BULK_HEARTBEAT_TTL_S` (renewed every third of it), and a
maintenance pass runs every `LLM_BULK_MAINTENANCE_INTERVAL_S`, whether the worker is idle (its
dequeue waits at most that long) or running a job (between two heartbeats). So a restarted or
any other live worker runs an abandoned job again at most TTL + interval after its worker died.

It also settles cancelled jobs (a job that returns after `cancel` ends `canceled`, not `finished`), and
its warm shutdown (SIGTERM) takes a second, not up to a minute (see `subscribe`).
"""

from __future__ import annotations

from typing import Any

from rq import Worker, worker_registration
from rq.executions import Execution
from rq.job import Job
from rq.queue import Queue
from rq.registry import StartedJobRegistry, clean_registries
from rq.serializers import JSONSerializer
from rq.utils import now

from producer.bulk.control import settle_cancelled
from producer.bulk.settings import BulkSettings

PUBSUB_POLL_S = 1.0


class BulkWorker(Worker):
    """RQ's Worker with the heartbeat TTL and maintenance interval of BulkSettings (JSON serializer)."""

    def __init__(self, queues: Any, *, settings: BulkSettings | None = None, **kwargs: Any):
        settings = settings or BulkSettings()
        self.heartbeat_ttl_s = settings.heartbeat_ttl_s
        kwargs.setdefault("serializer", JSONSerializer)
        kwargs.setdefault("maintenance_interval", settings.maintenance_interval_s)
        kwargs.setdefault("job_monitoring_interval", max(1, settings.heartbeat_ttl_s // 3))
        super().__init__(queues, **kwargs)

    def subscribe(self) -> None:
        """RQ's command channel, its listener polling every second (RQ's waits 60 s, and a warm shutdown
        joins it: SIGTERM could take a minute)."""
        self.log.info("Worker %s: subscribing to channel %s", self.name, self.pubsub_channel_name)
        self.pubsub = self.connection.pubsub()
        self.pubsub.subscribe(**{self.pubsub_channel_name: self.handle_payload})
        self.pubsub_thread = self.pubsub.run_in_thread(  # type: ignore[assignment]
            sleep_time=PUBSUB_POLL_S, daemon=True, exception_handler=self._pubsub_exception_handler
        )

    def get_heartbeat_ttl(self, job: Job, working_time: float = 0.0) -> int:
        return self.heartbeat_ttl_s

    @property
    def dequeue_timeout(self) -> int:
        return max(1, min(self.worker_ttl - 15, int(self.maintenance_interval)))

    def clean_registries(self) -> None:
        """RQ's maintenance pass over each queue, under a lock that expires after one interval (RQ's lasts
        15 minutes: a worker killed during a pass would hold up every other worker's passes that long)."""
        for queue in self.queues:
            lock_s = max(2, int(self.maintenance_interval))
            if self.connection.set(queue.registry_cleaning_key, 1, nx=True, ex=lock_s):
                self.log.debug("Worker %s: cleaning registries for queue: %s", self.name, queue.name)
                clean_registries(queue, self._exc_handlers)
                worker_registration.clean_worker_registry(queue)
                queue.intermediate_queue.cleanup(self, queue)
                queue.release_maintenance_lock()
        self.last_cleaned_at = now()  # type: ignore[assignment]

    def maintain_heartbeats(self, job: Job, execution: Execution) -> None:
        super().maintain_heartbeats(job, execution)
        if self.should_run_maintenance_tasks:
            try:
                self.run_maintenance_tasks()
            except Exception:  # the job it watches goes on; the next pass tries again
                self.log.exception("Worker %s: maintenance failed", self.name)

    def handle_job_success(
        self, job: Job, queue: Queue, started_job_registry: StartedJobRegistry, execution: Execution
    ) -> None:
        super().handle_job_success(job, queue, started_job_registry, execution)
        settle_cancelled(job)
