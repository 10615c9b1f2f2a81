"""Worker settings: one pydantic-settings class, every field env-configurable (prefix `LLM_`)."""

from __future__ import annotations

import os
import re
import socket
from pathlib import Path
from typing import Annotated, Literal

from pydantic import AliasChoices, Field, PrivateAttr, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from producer.config_errors import setting_error
from producer.settings import DEFAULT_LOCAL_REDIS_PORT, check_redis_url, local_redis_url
from producer.wire.keys import MAX_STREAM_SHARDS, check_tenant
from scheduler import BatchPolicy
from worker.engine.config import DEFAULT_KV_CACHE_BYTES, EngineConfig
from worker.engine.model_files import DEFAULT_MODEL, default_cache_dir, model_problem

# The engine's defaults, defined once: admission in `BatchPolicy`, the rest in `EngineConfig`.
_POLICY = BatchPolicy()
_ENGINE = EngineConfig()
# Old values of a setting still accepted, mapped to the current one and logged as `setting_deprecated`.
DEPRECATED_VALUES = {("engine", "hf"): "paged"}
_DEVICE = re.compile(r"auto|cpu|cuda(?::([0-9]+))?")


def _default_consumer_name() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


class WorkerSettings(BaseSettings):
    """Configuration of `python -m worker`; env var names are `LLM_<FIELD>` unless noted."""

    model_config = SettingsConfigDict(
        env_prefix="LLM_", extra="ignore", populate_by_name=True, env_ignore_empty=True
    )

    redis_url: str | None = Field(
        default=None,
        validation_alias=AliasChoices("REDIS_URL", "LLM_REDIS_URL"),
        description="Redis/Valkey URL (redis://, rediss:// or unix://, ACL user:password allowed; env "
        "REDIS_URL); unset = redis://127.0.0.1:<LLM_LOCAL_REDIS_PORT>/0, where the worker starts the "
        "packaged server if nothing listens (local runs; a pod sets REDIS_URL).",
    )
    local_redis_port: int = Field(
        default=DEFAULT_LOCAL_REDIS_PORT,
        ge=1,
        le=65535,
        description="Port on 127.0.0.1 that workers and clients without REDIS_URL share.",
    )
    prefix: str = Field(default="llm", description="Key prefix of every stream and key the service uses.")
    group: str = Field(default="workers", description="Consumer group of the request stream.")
    tenants: str = Field(
        default="",
        description="Comma-separated tenants served, each from its own key namespace "
        "`<prefix>:t:{<tenant>}` (`<prefix>:t:{<tenant>.<n>}` per shard with LLM_STREAM_SHARDS > 1; "
        "docs/security.md); empty = the one un-namespaced `<prefix>:requests`.",
    )
    redis_cluster: bool = Field(
        default=False,
        description="REDIS_URL names a node of a Redis Cluster (or Valkey cluster mode): connect with the "
        "cluster client, each shard's (or tenant's) keys in one hash slot (docs/scaling.md).",
    )
    stream_shards: int = Field(
        default=1,
        ge=1,
        le=MAX_STREAM_SHARDS,
        description="Request streams `<prefix>:s:{<n>}:requests`, n < N, read fairly by every worker (set "
        "the clients' alike); 1 = the one `<prefix>:requests` (`<prefix>:s:{0}:requests` in cluster "
        "mode). With LLM_TENANTS, N streams per tenant, `<prefix>:t:{<tenant>.<n>}:requests`.",
    )
    steal_after_ms: int = Field(
        default=500,
        ge=0,
        description="With LLM_STREAM_SHARDS > 1, each worker owns a share of the shard streams (rendezvous "
        "hashing over the live workers) and reads those first; another stream only while it has room and "
        "that stream's oldest unread entry has waited this long, or twice the worker's longest recent "
        "engine step if that is longer (docs/scaling.md). 0 = every worker reads every stream alike.",
    )
    consumer_name: str = Field(
        default_factory=_default_consumer_name,
        description="This worker's consumer name in the group (default host-pid).",
    )
    engine: Literal["paged", "static", "echo", "hf"] = Field(
        default=_ENGINE.engine,
        description="Inference engine: paged (continuous batching over a paged KV cache), static (padded "
        "static batches), echo (no model); hf: the old name of paged (deprecated).",
    )
    model: str = Field(
        default=DEFAULT_MODEL,
        validation_alias=AliasChoices("MODEL", "LLM_MODEL"),
        description="Hugging Face model id already in the local cache, a directory with config.json, or a "
        ".gguf file (env MODEL); llama-1b-random, llama-8b-random, llama-70b-random and tiny-random: seeded "
        "random weights in those shapes (Llama-3.2-1B, Llama-3.1-8B, Llama-3-70B), for benchmarks.",
    )
    cache_dir: Path = Field(
        default_factory=default_cache_dir,
        description=(
            "Where converted models (GGUF -> safetensors) are cached; default ~/.cache/llm-stream-serve."
        ),
    )
    device: str = Field(
        default="auto", description="Torch device: auto (cuda if present, else cpu), cpu, cuda, cuda:N."
    )
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field(
        default=_ENGINE.dtype,
        description="Float dtype of weights and activations; auto = float16 on GPU, float32 on CPU "
        "(LLM_WEIGHTS=fp16/bf16 sets it).",
    )
    weights: Literal["auto", "fp16", "bf16", "int8", "w8a8"] = Field(
        default=_ENGINE.weights,
        description="Weight format: auto (LLM_DTYPE), fp16, bf16, int8 (INT8 linears with per-channel "
        "scales, activations in LLM_DTYPE), w8a8 (INT8 linears and per-token INT8 activations on "
        "torch._int_mm); both also store the embedding as INT8 with a scale per vocabulary row, one table "
        "that a tied lm_head shares.",
    )
    trust_remote_code: bool = Field(
        default=_ENGINE.trust_remote_code,
        description="Allow model repositories to run their own Python code.",
    )
    read_count: int = Field(default=64, ge=1, description="Most entries taken per XREADGROUP call.")
    read_block_ms: int = Field(
        default=2000, ge=1, description="XREADGROUP BLOCK when idle; kept below the client's socket timeout."
    )
    max_wait_ms: float = Field(
        default=_POLICY.max_wait_ms,
        ge=0,
        description="Time window: how long an idle engine waits to fill a microbatch.",
    )
    max_batch_tokens: int = Field(
        default=_POLICY.max_batch_tokens,
        ge=16,
        description="Token budget per engine step (prefill + decode tokens).",
    )
    max_num_seqs: int = Field(
        default=_POLICY.max_num_seqs, ge=1, description="Most sequences running at once."
    )
    max_prefill_chunk_tokens: int = Field(
        default=_POLICY.max_prefill_chunk_tokens,
        ge=16,
        description="Largest prefill chunk of one prompt per step.",
    )
    max_waiting_steps: int = Field(
        default=_POLICY.max_waiting_steps,
        ge=0,
        description="Priority aging: a batch request passed over this many engine steps is served as "
        "interactive.",
    )
    kv_cache_bytes: Annotated[int, Field(ge=2**20)] | Literal["auto"] = Field(
        default=DEFAULT_KV_CACHE_BYTES,
        description="KV cache pool size in bytes (paged engine), or auto: on CUDA what is free once the "
        "weights are loaded, less the steps' estimated workspace and a margin of 3% of the GPU's memory "
        "(logged as kv_pool_sized); on the CPU auto is 256 MiB. worker_started reports the pool "
        "(kv_pool_bytes).",
    )
    kv_dtype: Literal["auto", "fp16", "bf16", "fp32", "int8"] = Field(
        default=_ENGINE.kv_dtype,
        description="KV cache format (paged engine): auto (the activation dtype), fp16, bf16, fp32, or int8 "
        "(K/V rotated by a Hadamard matrix, one FP16 scale per token and KV head, ~1.9x the tokens of fp16 "
        "in the same LLM_KV_CACHE_BYTES; needs a power-of-two head_dim).",
    )
    kv_block_size_tokens: int = Field(
        default=_ENGINE.kv_block_size_tokens, ge=1, description="Tokens per KV cache block."
    )
    kv_budget_tokens: int = Field(
        default=_ENGINE.kv_budget_tokens,
        ge=0,
        description="KV pruning (paged engine): most cached tokens a sequence keeps; middle blocks are "
        "evicted past it (0 = off). A request's `kv_budget_tokens` overrides it; at least the sink tokens "
        "plus one block.",
    )
    kv_sink_tokens: int = Field(
        default=_ENGINE.kv_sink_tokens,
        ge=0,
        description="KV pruning: leading tokens never evicted (attention sinks), rounded up to whole blocks.",
    )
    kv_prune_mode: Literal["window", "snapkv"] = Field(
        default=_ENGINE.kv_prune_mode,
        description="KV pruning: window evicts the oldest middle block (sinks + recent window); snapkv the "
        "block the prompt's last 32 queries attended to least.",
    )
    kv_reserve: Literal["worst_case", "optimistic"] = Field(
        default=_POLICY.kv_reserve,
        description="KV admission: reserve prompt+max_tokens, or prompt only with preemption.",
    )
    attention_backend: Literal["auto", "triton", "torch"] = Field(
        default=_ENGINE.attention_backend,
        description="Paged attention: triton (GPU kernels) or torch (reference); auto = triton on CUDA.",
    )
    cuda_graphs: bool = Field(
        default=_ENGINE.cuda_graphs,
        description="Replay decode steps as CUDA graphs (triton backend on CUDA); false: eager.",
    )
    prefill_interval_steps: int | None = Field(
        default=_ENGINE.prefill_interval_steps,
        ge=0,
        description="While decoding, admit new prompts at latest every N steps (or once they fill a step); "
        "unset = 8 with CUDA graphs, else 0 (every step).",
    )
    async_scheduling: bool | None = Field(
        default=_ENGINE.async_scheduling,
        description="Paged engine: plan and launch step N+1 before step N's tokens are read back (the device "
        "feeds them to it; stops are found one step late and the extra token dropped), so the host's step "
        "work overlaps the device's; unset = on with CUDA, off on the CPU.",
    )
    async_output: bool | None = Field(
        default=_ENGINE.async_output,
        description="Detokenize and stream step N's tokens after step N+1 is launched; unset = on with CUDA "
        "where async scheduling is off (with it, step N's tokens are streamed while N+1 runs anyway).",
    )
    engine_process: Literal["auto", "inline", "separate"] = Field(
        default="auto",
        description="Run the engine in its own process (separate), so the device never waits for the loop's "
        "Redis and per-token work, or in the loop's (inline); auto = separate for the paged engine on CUDA.",
    )
    async_replies: bool | None = Field(
        default=None,
        description="Write replies from a background thread, so the loop never waits on Redis inside a "
        "step; unset = on when a device computes the steps (CUDA).",
    )
    stream_interval_ms: float = Field(
        default=0.0,
        ge=0,
        description="Streamed replies: write each choice's first tokens at once, then those that follow as "
        "one token event once this many ms have passed since its last (the rest right before the final "
        "reply): less host time under many concurrent streams; 0 = one event per engine output.",
    )
    stream_interval_tokens: int = Field(
        default=0,
        ge=0,
        description="Streamed replies: also write a choice's held tokens once this many are held (set alone: "
        "one event per this many tokens after the first); 0 = no count bound.",
    )
    max_prompt_tokens: int = Field(
        default=4096, ge=1, description="Prompts longer than this get a too_long error."
    )
    max_body_bytes: int = Field(
        default=256 * 1024, ge=1024, description="Request bodies larger than this get a too_long error."
    )
    max_waiting_requests: int = Field(
        default=256,
        ge=1,
        description="Requests waiting in the engine's queue (read, not started) before reading pauses.",
    )
    reply_ttl_s: int = Field(default=3600, ge=1, description="TTL of reply streams and final-reply guards.")
    refusal_ttl_s: int = Field(
        default=60,
        ge=1,
        description="TTL of the reply stream and guard of a request refused before it ran (`overloaded`, "
        "`invalid_request`, `too_long`, ...), so a flood of refusals cannot fill Redis for an hour.",
    )
    reply_signing_key: SecretStr | None = Field(
        default=None,
        min_length=16,
        description="Shared secret (at least 16 characters): sign every reply event with HMAC-SHA256 "
        "(field `sig`); clients with the same key accept only signed replies. Unset = unsigned.",
    )
    echo_token_delay_ms: float = Field(
        default=_ENGINE.echo_token_delay_ms, ge=0, description="Echo engine: sleep per generated token."
    )
    grammar_threads: int = Field(
        default=_ENGINE.grammar_threads, ge=0, le=64,
        description="Structured output: threads filling a step's token masks; 0: a quarter of the CPUs, 1-8.",
    )  # fmt: skip
    torch_threads: int = Field(
        default=_ENGINE.torch_threads, ge=0, le=512,
        description="CPU engine: torch's intra-op threads; 0: the CPUs this process may use (affinity and "
        "cgroup quota) but one, at least 1. GPU engines keep torch's default.",
    )  # fmt: skip
    log_level: Literal["debug", "info", "warning", "error", "critical"] = Field(
        default="info", description="Log level of the JSON logs on stdout (any case)."
    )
    heartbeat_interval_s: float = Field(
        default=5.0,
        gt=0,
        description="How often the worker refreshes its heartbeat key and touches the entries it serves.",
    )
    heartbeat_ttl_s: float = Field(
        default=15.0,
        gt=0,
        description="TTL of the heartbeat key; keep it >= 3x the interval.",
    )
    max_step_s: float = Field(
        default=300.0,
        gt=0,
        description="An inline engine step (on the CPU, or LLM_ENGINE_PROCESS=inline) keeps the heartbeat "
        "and /health fresh while it runs, for this long at most: a longer one is taken for stalled, the key "
        "lapses and other workers reclaim the entries, as when a worker dies.",
    )
    reclaim_interval_s: float = Field(
        default=5.0,
        gt=0,
        description="How often the worker looks for dead consumers and reclaims their entries.",
    )
    reclaim_min_idle_ms: int = Field(
        default=30_000,
        ge=1,
        description="XAUTOCLAIM min idle time; live workers touch their entries every heartbeat, so only "
        "a dead or hung worker's entries get this idle.",
    )
    reclaim_count: int = Field(default=64, ge=1, description="Most entries taken per XAUTOCLAIM call.")
    max_deliveries: int = Field(
        default=3,
        ge=1,
        description="An entry delivered more times than this is a poison entry: dead-lettered, its sender "
        "gets an internal error.",
    )
    dead_letter_max_entries: int = Field(
        default=100_000,
        ge=100,
        description="Approximate cap (MAXLEN ~) of the dead-letter stream `<prefix>:dead`.",
    )
    dead_letter_max_field_bytes: int = Field(
        default=4096,
        ge=64,
        description="Each field copied into a dead-letter entry is cut to this many bytes.",
    )
    max_backlog_requests: int = Field(
        default=10_000,
        ge=0,
        description="While the group's lag + pending exceeds this, the worker answers the excess "
        "`overloaded`; "
        "0 disables shedding.",
    )
    backlog_check_interval_ms: float = Field(
        default=250.0, gt=0, description="How often the worker measures the backlog (XINFO GROUPS)."
    )
    trim_interval_s: float = Field(
        default=5.0,
        gt=0,
        description="How often the worker trims the request stream below the oldest id any group needs.",
    )
    cancel_poll_interval_ms: float = Field(
        default=50.0, gt=0, description="How often the worker polls `<prefix>:cancel` for cancelled requests."
    )
    cancel_memory_requests: int = Field(
        default=10_000, ge=1, description="How many recently cancelled request ids the worker remembers."
    )
    cancel_replay_s: float = Field(
        default=3600.0,
        ge=0,
        description="At start, the worker replays the cancels of this many past seconds (up to "
        "cancel_memory_requests per tenant), so a request cancelled while queued is never served later.",
    )
    cancel_read_count: int = Field(
        default=100, ge=1, le=10_000, description="Most entries read from each cancel stream per poll."
    )
    cancel_max_entry_bytes: int = Field(
        default=1024,
        ge=64,
        le=1_048_576,
        description="A cancel entry larger than this (field names and values together) is skipped inside "
        "Redis, never read by the worker (`cancels_dropped`): a cancel stream cannot grow a worker's memory.",
    )
    dead_letter_max_bytes: int = Field(
        default=8192,
        ge=2048,
        le=1_048_576,
        description="Most bytes of one dead-letter entry's copied fields: past it, each field keeps a "
        "prefix, its sha256 and its original length (docs/reliability.md, poison entries and dead letters).",
    )
    drain_timeout_s: float = Field(
        default=20.0,
        ge=0,
        description="After SIGTERM, how long in-flight requests may run before the rest is handed back "
        "(keep below the pod's termination grace period).",
    )
    stats_interval_s: float = Field(
        default=5.0,
        ge=0,
        description="How often the worker logs `worker_stats` and writes it to `<prefix>:stats` "
        "(rates, backlog, KV, step times, GPUs); 0 = off.",
    )
    stats_max_entries: int = Field(
        default=10_000, ge=100, description="Approximate cap (MAXLEN ~) of the stats stream `<prefix>:stats`."
    )
    metrics_port: int = Field(
        default=9400, ge=0, le=65535,
        description="HTTP port of `/metrics`, `/health` and `/ready` (docs/metrics.md); 0 = off.",
    )  # fmt: skip
    metrics_host: str = Field(
        default="0.0.0.0",
        description="Address the metrics port listens on (all interfaces: probes come from outside).",
    )
    reconnect_backoff_initial_ms: float = Field(
        default=100.0,
        gt=0,
        description="First delay before retrying after a Redis connection error (jittered).",
    )
    reconnect_backoff_max_ms: float = Field(
        default=5000.0, gt=0, description="Cap of the exponential Redis reconnect delay (jittered)."
    )

    @field_validator("redis_url")
    @classmethod
    def _check_redis_url(cls, url: str | None) -> str | None:
        return None if url is None else check_redis_url(url)

    @field_validator("tenants")
    @classmethod
    def _check_tenants(cls, value: str) -> str:
        names = [t.strip() for t in value.split(",") if t.strip()]
        for name in names:
            check_tenant(name)
        if len(set(names)) != len(names):
            raise ValueError("each tenant may be named once")
        return ",".join(names)

    @field_validator("log_level", mode="before")
    @classmethod
    def _lower_log_level(cls, level: object) -> object:
        return level.lower() if isinstance(level, str) else level

    @field_validator("device", mode="before")
    @classmethod
    def _check_device(cls, device: object) -> object:
        # The syntax only: whether this machine has the CUDA device is asked of torch at start-up
        # (`python -m worker`), not here.
        if not isinstance(device, str):
            return device
        match = _DEVICE.fullmatch(device.strip().lower())
        if match is None:
            raise ValueError("'auto', 'cpu', 'cuda' or 'cuda:N' (N a device index)")
        return f"cuda:{int(match[1])}" if match[1] else match[0]

    @model_validator(mode="after")
    def _check_model(self) -> WorkerSettings:
        # The echo engine loads no model. Files and known names only: nothing is imported or downloaded.
        problem = None if self.engine == "echo" else model_problem(self.model, self.cache_dir)
        if problem:
            raise setting_error("model", self.model, problem)
        return self

    _deprecated: list[tuple[str, str, str]] = PrivateAttr(default_factory=list)

    @model_validator(mode="after")
    def _map_deprecated(self) -> WorkerSettings:
        for (name, old), new in DEPRECATED_VALUES.items():
            if getattr(self, name) == old:
                object.__setattr__(self, name, new)
                self._deprecated.append((f"LLM_{name.upper()}", old, new))
        return self

    def deprecations(self) -> list[tuple[str, str, str]]:
        """(env var, old value, the value it now means) for each deprecated value given."""
        return list(self._deprecated)

    @model_validator(mode="after")
    def _check_weights(self) -> WorkerSettings:
        wanted = {"fp16": "float16", "bf16": "bfloat16"}.get(self.weights)
        if wanted is not None and self.dtype not in ("auto", wanted):
            raise ValueError(
                f"LLM_WEIGHTS={self.weights} conflicts with LLM_DTYPE={self.dtype}; set one of them"
            )
        return self

    @model_validator(mode="after")
    def _check_kv_dtype(self) -> WorkerSettings:
        # The static engine keeps transformers' own KV cache, in the activation dtype.
        if self.engine == "static" and self.kv_dtype != "auto":
            raise ValueError(f"LLM_KV_DTYPE={self.kv_dtype} needs LLM_ENGINE=paged")
        if self.engine == "static" and self.kv_budget_tokens:
            raise ValueError("LLM_KV_BUDGET_TOKENS needs LLM_ENGINE=paged")
        problem = self.kv_budget_problem(self.kv_budget_tokens)
        if problem:
            raise ValueError(f"LLM_KV_BUDGET_TOKENS: {problem}")
        return self

    def kv_budget_problem(self, budget: int) -> str | None:
        """Why a KV budget (a request's, or the default) is unusable here, or None (0 = off)."""
        block = self.kv_block_size_tokens
        least = (-(-self.kv_sink_tokens // block) + 1) * block
        if 0 < budget < least:
            return (
                f"kv_budget_tokens must be 0 (off) or at least {least} "
                f"(the sink tokens, rounded up to a block of {block}, plus one block)"
            )
        return None

    @model_validator(mode="after")
    def _check_liveness(self) -> WorkerSettings:
        # A live worker touches its entries every interval: a shorter idle threshold would let it be robbed.
        if self.heartbeat_ttl_s <= self.heartbeat_interval_s:
            raise ValueError(
                f"LLM_HEARTBEAT_TTL_S ({self.heartbeat_ttl_s}) above LLM_HEARTBEAT_INTERVAL_S "
                f"({self.heartbeat_interval_s})"
            )
        if self.reclaim_min_idle_ms <= self.heartbeat_interval_s * 1000:
            raise ValueError(
                f"LLM_RECLAIM_MIN_IDLE_MS ({self.reclaim_min_idle_ms}) above LLM_HEARTBEAT_INTERVAL_S "
                f"({self.heartbeat_interval_s}) in ms"
            )
        # An idle worker beats only between reads, which block up to read_block_ms.
        if self.heartbeat_ttl_s * 1000 <= self.read_block_ms + self.heartbeat_interval_s * 1000:
            raise ValueError(
                f"LLM_HEARTBEAT_TTL_S ({self.heartbeat_ttl_s}) above LLM_READ_BLOCK_MS "
                f"({self.read_block_ms}) + LLM_HEARTBEAT_INTERVAL_S ({self.heartbeat_interval_s}), in ms"
            )
        return self

    def batch_policy(self) -> BatchPolicy:
        """The one admission policy of this worker; every engine's scheduler decides with it.

        `prefill_interval_steps` is left at 0 here: its default depends on whether the engine replays
        CUDA graphs, so the paged engine resolves it from `self.prefill_interval_steps`.
        """
        return BatchPolicy(
            max_wait_ms=self.max_wait_ms,
            max_batch_tokens=self.max_batch_tokens,
            max_num_seqs=self.max_num_seqs,
            max_prefill_chunk_tokens=self.max_prefill_chunk_tokens,
            kv_reserve=self.kv_reserve,
            max_waiting_steps=self.max_waiting_steps,
        )

    def tenant_list(self) -> list[str | None]:
        """The tenants whose request streams this worker reads; `[None]` = the single un-namespaced stream."""
        return [t for t in self.tenants.split(",") if t] or [None]

    def signing_key(self) -> bytes | None:
        """The reply signing secret as bytes, or None when replies are not signed."""
        return None if self.reply_signing_key is None else self.reply_signing_key.get_secret_value().encode()

    def resolved_redis_url(self) -> str:
        """`redis_url`, or the shared local address when it is unset."""
        return self.redis_url or local_redis_url(self.local_redis_port)

    def uses_engine_process(self) -> bool:
        """Whether the engine runs in a process of its own (`engine_process`)."""
        if self.engine_process != "auto":
            return self.engine_process == "separate"
        return self.engine == "paged" and self.resolved_device().partition(":")[0] == "cuda"  # cuda:N too

    def engine_config(self) -> EngineConfig:
        """The engine's only input, from these settings."""
        return EngineConfig(
            engine="paged" if self.engine == "hf" else self.engine, model=self.model,
            device=self.resolved_device(), dtype=self.dtype, weights=self.weights,
            trust_remote_code=self.trust_remote_code, cache_dir=self.cache_dir, policy=self.batch_policy(),
            kv_cache_bytes=None if self.kv_cache_bytes == "auto" else self.kv_cache_bytes,
            kv_block_size_tokens=self.kv_block_size_tokens,
            kv_dtype=self.kv_dtype, kv_budget_tokens=self.kv_budget_tokens,
            kv_sink_tokens=self.kv_sink_tokens, kv_prune_mode=self.kv_prune_mode,
            attention_backend=self.attention_backend, cuda_graphs=self.cuda_graphs,
            prefill_interval_steps=self.prefill_interval_steps,
            async_scheduling=self.async_scheduling, async_output=self.async_output,
            echo_token_delay_ms=self.echo_token_delay_ms,
            grammar_threads=self.grammar_threads, torch_threads=self.torch_threads,
        )  # fmt: skip

    def resolved_device(self) -> str:
        """The torch device to use."""
        if self.device != "auto":
            return self.device
        try:
            import torch

            return "cuda" if torch.cuda.is_available() else "cpu"
        except ImportError:
            return "cpu"
