"""Producer (client) settings, env-configurable with prefix `LLM_` (REDIS_URL without prefix)."""

from __future__ import annotations

from typing import Literal

from pydantic import AliasChoices, Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class ProducerSettings(BaseSettings):
    """Configuration of `ChatClient`, `AsyncChatClient` and `python -m producer`."""

    model_config = SettingsConfigDict(env_prefix="LLM_", extra="ignore", populate_by_name=True)

    redis_url: str = Field(
        default="redis://127.0.0.1:6379/0",
        validation_alias=AliasChoices("REDIS_URL", "LLM_REDIS_URL"),
        description="Redis/Valkey URL the client sends requests to (env REDIS_URL).",
    )
    prefix: str = Field(default="llm", description="Key prefix shared with the workers.")
    content_type: Literal["msgpack", "json"] = Field(
        default="msgpack", description="Encoding of request bodies."
    )
    timeout_s: float = Field(
        default=120.0, gt=0, description="How long `chat`/`result` wait for the final reply."
    )
    reply_block_ms: int = Field(default=1000, ge=1, description="XREAD BLOCK per poll of the reply stream.")
    max_backlog_requests: int = Field(
        default=10_000,
        ge=0,
        description="Refuse new requests with `overloaded` (before XADD) while the group's lag + pending "
        "is at least this many requests; 0 disables the check.",
    )
    submit_retry_s: float = Field(
        default=30.0,
        ge=0,
        description="How long `submit` keeps retrying through connection errors (a retried XADD is "
        "deduplicated by request id).",
    )
    reconnect_backoff_initial_ms: float = Field(
        default=50.0, gt=0, description="First delay before reconnecting after a connection error (jittered)."
    )
    reconnect_backoff_max_ms: float = Field(
        default=2000.0, gt=0, description="Cap of the exponential reconnect delay (jittered)."
    )
    cancel_on_timeout: bool = Field(
        default=True,
        description="When `chat`/`result` time out, cancel the request so no worker keeps generating.",
    )
    reply_ttl_s: int = Field(
        default=3600, ge=1, description="TTL of the `cancelled` reply the client writes itself."
    )
    cancel_stream_max_entries: int = Field(
        default=10_000, ge=100, description="Approximate cap of the `<prefix>:cancel` stream (MAXLEN ~)."
    )
