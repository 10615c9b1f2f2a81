"""Producer (client) settings, env-configurable with prefix `LLM_` (REDIS_URL without prefix)."""

from __future__ import annotations

from typing import Literal
from urllib.parse import urlparse

from pydantic import AliasChoices, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from producer.wire.keys import MAX_STREAM_SHARDS, check_tenant

# Where workers and clients meet when `REDIS_URL` is unset: a worker starts the packaged server
# there when nothing listens (worker/local_redis/server.py), a client connects there.
LOCAL_REDIS_HOST = "127.0.0.1"
DEFAULT_LOCAL_REDIS_PORT = 6379
REDIS_URL_EXPECTED = (
    "a Redis URL: redis://[[user]:password@]host[:port][/db], rediss://... (TLS) or unix:///path/to/socket"
)


def local_redis_url(port: int = DEFAULT_LOCAL_REDIS_PORT) -> str:
    """The address worker and client use when `REDIS_URL` is unset."""
    return f"redis://{LOCAL_REDIS_HOST}:{port}/0"


def check_redis_url(url: str) -> str:
    """`url` if redis-py can connect with it (scheme, host, port, db); else ValueError naming the form."""
    try:
        parsed = urlparse(url)
        port_ok = parsed.port is None or 0 < parsed.port < 65536  # .port raises on a non-number
    except ValueError:
        raise ValueError(REDIS_URL_EXPECTED) from None
    if parsed.scheme == "unix":
        ok = bool(parsed.path)
    else:
        db = parsed.path.lstrip("/")
        ok = (
            parsed.scheme in ("redis", "rediss")
            and bool(parsed.hostname)
            and port_ok
            and (db == "" or db.isdigit())
        )
    if not ok:
        raise ValueError(REDIS_URL_EXPECTED)
    return url


class ProducerSettings(BaseSettings):
    """Configuration of `ChatClient`, `AsyncChatClient` and `python -m producer`."""

    model_config = SettingsConfigDict(
        env_prefix="LLM_", extra="ignore", populate_by_name=True, env_ignore_empty=True
    )

    redis_url: str = Field(
        default=local_redis_url(),
        validation_alias=AliasChoices("REDIS_URL", "LLM_REDIS_URL"),
        description="Redis/Valkey URL the client sends requests to (env REDIS_URL); unset = "
        "redis://127.0.0.1:<LLM_LOCAL_REDIS_PORT>/0, where a worker without REDIS_URL serves.",
    )
    local_redis_port: int = Field(
        default=DEFAULT_LOCAL_REDIS_PORT,
        ge=1,
        le=65535,
        description="Port on 127.0.0.1 that workers and clients without REDIS_URL share.",
    )
    prefix: str = Field(default="llm", description="Key prefix shared with the workers.")
    tenant: str | None = Field(
        default=None,
        description="This backend's tenant: requests, replies and cancels use its key namespace "
        "`<prefix>:t:{<tenant>}`, or with LLM_STREAM_SHARDS > 1 its shards' `<prefix>:t:{<tenant>.<n>}` "
        "(workers list it in LLM_TENANTS; docs/security.md); unset = the un-namespaced keys.",
    )
    redis_cluster: bool = Field(
        default=False,
        description="REDIS_URL names a node of a Redis Cluster (or Valkey cluster mode): connect with the "
        "cluster client; keys are hash-tagged by shard (docs/scaling.md). Set like the workers'.",
    )
    stream_shards: int = Field(
        default=1,
        ge=1,
        le=MAX_STREAM_SHARDS,
        description="Request streams `<prefix>:s:{<n>}:requests`, n < N, the workers read (same N as "
        "theirs); a request goes to the shard of its `shard_key`, else of its id. 1 = the one "
        "`<prefix>:requests` (`<prefix>:s:{0}:requests` in cluster mode). With LLM_TENANT: the tenant's "
        "N streams `<prefix>:t:{<tenant>.<n>}:requests`.",
    )
    content_type: Literal["msgpack", "json"] = Field(
        default="msgpack", description="Encoding of request bodies."
    )
    timeout_s: float = Field(
        default=120.0,
        gt=0,
        description="How long `chat`/`result` (and `llm-chat`, unless --timeout-s) wait for the final reply.",
    )
    reply_block_ms: int = Field(default=1000, ge=1, description="XREAD BLOCK per poll of the reply stream.")
    max_backlog_requests: int = Field(
        default=10_000,
        ge=0,
        description="Refuse new requests with `overloaded` (before XADD) while the group's lag + pending "
        "is at least this many requests; 0 disables the check. A tenant's client (LLM_TENANT) may not "
        "read its stream and skips it: the workers shed its excess.",
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
        default=60,
        ge=1,
        description="TTL of the `cancelled` reply and guard the client writes when it cancels: short, as "
        "the workers' `refusal_ttl_s` (a queued request stays cancelled past it: workers remember cancels).",
    )
    reply_signing_key: SecretStr | None = Field(
        default=None,
        min_length=16,
        description="The workers' reply signing secret: when set, only reply events with a valid `sig` "
        "are accepted, and the client signs its own `cancelled` event.",
    )
    cancel_stream_max_entries: int = Field(
        default=10_000, ge=100, description="Approximate cap of the `<prefix>:cancel` stream (MAXLEN ~)."
    )

    def signing_key(self) -> bytes | None:
        """The reply signing secret as bytes, or None when replies are not checked."""
        return None if self.reply_signing_key is None else self.reply_signing_key.get_secret_value().encode()

    @field_validator("redis_url")
    @classmethod
    def _check_redis_url(cls, url: str) -> str:
        return check_redis_url(url)

    @field_validator("tenant")
    @classmethod
    def _check_tenant(cls, tenant: str | None) -> str | None:
        return None if tenant is None else check_tenant(tenant)

    @model_validator(mode="after")
    def _default_redis_url(self) -> ProducerSettings:
        if "redis_url" not in self.model_fields_set:
            self.redis_url = local_redis_url(self.local_redis_port)
            self.model_fields_set.discard("redis_url")  # still unset: callers may start a local server
        return self
