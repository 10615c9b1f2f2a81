"""BulkSettings: defaults of bulk jobs and of the bulk RQ worker (env `LLM_BULK_*`)."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from producer.wire.limits import MAX_TOKENS_CAP

DEFAULT_INSTRUCTION = "Summarize the document in at most three sentences."


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
