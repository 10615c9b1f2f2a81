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
    content_type: Literal["msgpack", "json"] = Field(default="msgpack", description="Encoding of request bodies.")
    timeout_s: float = Field(default=120.0, gt=0, description="How long `chat`/`result` wait for the final reply.")
    reply_block_ms: int = Field(default=1000, ge=1, description="XREAD BLOCK per poll of the reply stream.")
