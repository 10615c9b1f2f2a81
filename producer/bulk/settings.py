"""BulkSettings: defaults of bulk jobs and of the bulk RQ worker (env `LLM_BULK_*`), and the Redis
that holds RQ's queue (`rq_redis_url`).

RQ's own keys (queue, jobs, registries, workers) and each job's results live on one plain Redis,
never on a Redis Cluster, even when the chat requests go through one (`LLM_REDIS_CLUSTER=true`):

- RQ 3 can put all its keys in one hash slot (`RQ_KEY_PREFIX={rq}`), so its MULTI/WATCH
  transactions and scripts would be single-slot, but stock RQ still cannot run on redis-py's
  `RedisCluster`: its worker reads and rewrites `connection.connection_pool.connection_kwargs`
  (the socket timeout, and to reconnect in the work horse), which the cluster client has not,
  registers itself with CLIENT SETNAME / CLIENT LIST on "the" connection, and `rq worker --url`
  opens a plain client. Making that work means a fork or subclasses of RQ's Worker, Queue and Job.
- It would gain nothing: one slot is one primary, so RQ's traffic would sit on one node anyway.
  RQ's traffic is small (a job is one queue entry, progress saved once a second, one hash write
  per answered document); a small Redis beside the cluster carries it and keeps it off the
  primaries that serve the chat path.

So with `LLM_REDIS_CLUSTER=true` the bulk CLI, `enqueue_bulk` and the bulk RQ worker need
`LLM_BULK_RQ_REDIS_URL` (a configuration error otherwise), while a job's chat requests and reply
reads go through the cluster client of `REDIS_URL` like any other client's. Without cluster mode
RQ shares `REDIS_URL` with the service unless `LLM_BULK_RQ_REDIS_URL` says otherwise.
"""

from __future__ import annotations

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from producer.settings import ProducerSettings, check_redis_url
from producer.wire.limits import MAX_TOKENS_CAP

RQ_REDIS_URL_ENV = "LLM_BULK_RQ_REDIS_URL"

DEFAULT_INSTRUCTION = "Summarize the document in at most three sentences."


class BulkSettings(BaseSettings):
    """Defaults of bulk jobs and the bulk RQ worker; env vars `LLM_BULK_<FIELD>`."""

    model_config = SettingsConfigDict(env_prefix="LLM_BULK_", extra="ignore")

    queue: str = Field(default="llm-bulk", description="RQ queue of bulk document jobs.")
    rq_redis_url: str | None = Field(
        default=None,
        description="Plain Redis (not a cluster) of RQ's queue, jobs and each job's stored results; unset = "
        "REDIS_URL. Required with LLM_REDIS_CLUSTER=true: RQ cannot run on a cluster, the job's chat "
        "requests still go through it (docs/scaling.md).",
    )
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
    heartbeat_ttl_s: int = Field(
        default=60,
        ge=3,
        description="`llm-bulk worker`: a running job's heartbeat TTL (renewed every third of it); once it "
        "lapses, the job counts as abandoned and the next maintenance pass runs it again.",
    )
    maintenance_interval_s: int = Field(
        default=15,
        ge=1,
        description="`llm-bulk worker`: how often it looks for abandoned jobs, idle or busy (RQ's "
        "maintenance: registries cleaned, abandoned jobs retried).",
    )

    @field_validator("rq_redis_url")
    @classmethod
    def _check_rq_redis_url(cls, url: str | None) -> str | None:
        return None if url is None else check_redis_url(url)


class BulkConfigError(ValueError):
    """The bulk jobs' settings cannot work together (cluster mode without a Redis for RQ)."""

    env = RQ_REDIS_URL_ENV


def rq_redis_url(
    override: str | None = None,
    settings: BulkSettings | None = None,
    producer: ProducerSettings | None = None,
) -> str:
    """The Redis URL of RQ's queue: `override` (`--rq-redis-url`), else `LLM_BULK_RQ_REDIS_URL`, else the
    service's `REDIS_URL` unless that names a cluster (BulkConfigError)."""
    if override:
        return check_redis_url(override)
    settings = settings or BulkSettings()
    if settings.rq_redis_url:
        return settings.rq_redis_url
    producer = producer or ProducerSettings()
    if producer.redis_cluster:
        raise BulkConfigError(
            f"LLM_REDIS_CLUSTER=true: set {RQ_REDIS_URL_ENV} (or --rq-redis-url) to a plain Redis for RQ's "
            "queue and the jobs' results; RQ cannot run on a Redis Cluster (the jobs' chat requests still "
            "go through the cluster of REDIS_URL)"
        )
    return producer.redis_url
