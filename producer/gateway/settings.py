"""Gateway settings, env-configurable with prefix `LLM_GATEWAY_` (and command-line options of the same names).

The wire settings are the producer's own (`ProducerSettings`: `REDIS_URL`, `LLM_PREFIX`,
`LLM_STREAM_SHARDS`, `LLM_REDIS_CLUSTER`, `LLM_REPLY_SIGNING_KEY`, `LLM_MAX_BACKLOG_REQUESTS`, ...), read
the same way as by any other producer: the gateway is one more producer on the same streams.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from producer.gateway.api_keys import KeyRing
from producer.wire.limits import MAX_TOKENS_CAP

# The model of workers that do not say which they serve, and the one accepted before any worker reported:
# the workers' default model (`LLM_MODEL`).
DEFAULT_MODEL = "SmolLM2-135M-Instruct"


class GatewaySettings(BaseSettings):
    """Configuration of `python -m producer.gateway` (`llm-gateway`)."""

    model_config = SettingsConfigDict(env_prefix="LLM_GATEWAY_", extra="ignore", env_ignore_empty=True)

    host: str = Field(default="127.0.0.1", description="Address the HTTP server listens on.")
    port: int = Field(default=8000, ge=1, le=65535, description="Port the HTTP server listens on.")
    keys_file: Path | None = Field(
        default=None,
        description="JSON or JSON-lines file of API keys (their SHA-256), each with its tenant and that "
        "tenant's Redis ACL user (docs/openai.md); unset = no authentication, one open namespace (the "
        "un-tenanted keys), logged as `gateway_open_namespace`.",
    )
    default_model: str = Field(
        default=DEFAULT_MODEL,
        min_length=1,
        max_length=256,
        description="Model name of workers whose stats record names no model (older workers), and the one "
        "model accepted while no live worker has reported.",
    )
    worker_liveness_s: float = Field(
        default=15.0,
        gt=0,
        description="A worker counts as live (in /v1/models, /ready) while its latest `<prefix>:stats` "
        "record is younger than this; keep it above the workers' LLM_STATS_INTERVAL_S (5 s).",
    )
    stats_refresh_s: float = Field(
        default=1.0, gt=0, le=60, description="How often the gateway reads the workers' stats stream."
    )
    max_body_bytes: int = Field(
        default=1024 * 1024,
        ge=1024,
        le=64 * 1024 * 1024,
        description="Largest request body accepted; larger ones get 413.",
    )
    request_timeout_s: float = Field(
        default=600.0,
        gt=0,
        le=24 * 3600,
        description="Deadline of a request that names none (`timeout_ms` in the body, or the "
        "X-Timeout-Ms header): it is sent as the wire's `timeout_ms`, and a request unanswered by then "
        "is cancelled and gets 504.",
    )
    default_temperature: float = Field(
        default=1.0,
        ge=0,
        le=2,
        description="Temperature of a request that names none (OpenAI's default is 1; 0 = greedy).",
    )
    default_max_tokens: int = Field(
        default=256,
        ge=1,
        le=MAX_TOKENS_CAP,
        description="max_tokens of a chat request that names none (completions default to 16, as OpenAI's).",
    )
    drain_s: float = Field(
        default=30.0,
        ge=0,
        description="On SIGTERM: stop accepting, let open requests finish for up to this long, then cancel "
        "the rest on the wire.",
    )
    max_reads_per_tenant: int = Field(
        default=16,
        ge=1,
        le=1024,
        description="Most reply-stream XREADs the multiplexer keeps outstanding per tenant (each on its "
        "own connection, each over many reply streams).",
    )
    retry_after_s: int = Field(
        default=1, ge=0, description="Retry-After (seconds) of a 429 answered to an `overloaded` refusal."
    )
    log_level: Literal["debug", "info", "warning", "error"] = Field(
        default="info", description="Level of the gateway's JSON log lines on stdout."
    )

    @field_validator("keys_file")
    @classmethod
    def _check_keys_file(cls, path: Path | None) -> Path | None:
        if path is not None:
            KeyRing.load(path)  # KeysFileError (a ValueError) names what is wrong
        return path

    def key_ring(self) -> KeyRing | None:
        """The keys file's keys, or None without a keys file (open namespace)."""
        return None if self.keys_file is None else KeyRing.load(self.keys_file)
