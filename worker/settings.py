"""Worker settings: one pydantic-settings class, every field env-configurable (prefix `LLM_`)."""

from __future__ import annotations

import os
import socket
from typing import Literal

from pydantic import AliasChoices, Field
from pydantic_settings import BaseSettings, SettingsConfigDict


def _default_consumer_name() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


class WorkerSettings(BaseSettings):
    """Configuration of `python -m worker`; env var names are `LLM_<FIELD>` unless noted."""

    model_config = SettingsConfigDict(env_prefix="LLM_", extra="ignore", populate_by_name=True)

    redis_url: str | None = Field(
        default=None,
        validation_alias=AliasChoices("REDIS_URL", "LLM_REDIS_URL"),
        description="Redis/Valkey URL (redis:// or rediss://, ACL user:password allowed); unset = start a private embedded server (env REDIS_URL).",
    )
    prefix: str = Field(default="llm", description="Key prefix of every stream and key the service uses.")
    group: str = Field(default="workers", description="Consumer group of the request stream.")
    consumer_name: str = Field(
        default_factory=_default_consumer_name, description="This worker's consumer name in the group (default host-pid)."
    )
    engine: Literal["hf", "static", "echo"] = Field(
        default="hf",
        description="Inference engine: hf (paged continuous batching), static (padded static batches), echo (no model).",
    )
    model: str = Field(
        default="SmolLM2-135M-Instruct",
        validation_alias=AliasChoices("MODEL", "LLM_MODEL"),
        description="Hugging Face model id, local directory or .gguf file (env MODEL).",
    )
    device: str = Field(default="auto", description="Torch device: auto (cuda if present, else cpu), cpu, cuda, cuda:N.")
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field(
        default="auto", description="Weight dtype; auto = float16 on GPU, float32 on CPU."
    )
    trust_remote_code: bool = Field(default=False, description="Allow model repositories to run their own Python code.")
    read_count: int = Field(default=64, ge=1, description="Most entries taken per XREADGROUP call.")
    read_block_ms: int = Field(
        default=2000, ge=1, description="XREADGROUP BLOCK when idle; kept below the client's socket timeout."
    )
    max_wait_ms: float = Field(default=10.0, ge=0, description="Time window: how long an idle engine waits to fill a microbatch.")
    max_batch_tokens: int = Field(default=4096, ge=16, description="Token budget per engine step (prefill + decode tokens).")
    max_num_seqs: int = Field(default=32, ge=1, description="Most sequences running at once.")
    max_prefill_chunk_tokens: int = Field(default=512, ge=16, description="Largest prefill chunk of one prompt per step.")
    kv_cache_bytes: int = Field(default=256 * 2**20, ge=2**20, description="KV cache pool size in bytes (paged engine).")
    kv_block_size_tokens: int = Field(default=16, ge=1, description="Tokens per KV cache block.")
    kv_reserve: Literal["worst_case", "optimistic"] = Field(
        default="worst_case", description="KV admission: reserve prompt+max_tokens, or prompt only with preemption."
    )
    max_prompt_tokens: int = Field(default=4096, ge=1, description="Prompts longer than this get a too_long error.")
    max_body_bytes: int = Field(default=256 * 1024, ge=1024, description="Request bodies larger than this get a too_long error.")
    max_waiting_requests: int = Field(default=256, ge=1, description="Validated requests held locally before reading pauses.")
    reply_ttl_s: int = Field(default=3600, ge=1, description="TTL of reply streams and final-reply guards.")
    echo_token_delay_ms: float = Field(default=0.0, ge=0, description="Echo engine: sleep per generated token.")
    log_level: str = Field(default="info", description="Log level of the JSON logs on stdout.")

    def resolved_device(self) -> str:
        """The torch device to use."""
        if self.device != "auto":
            return self.device
        try:
            import torch

            return "cuda" if torch.cuda.is_available() else "cpu"
        except ImportError:
            return "cpu"
