"""`EngineConfig`: everything an engine is built from, with the one set of engine defaults.

The worker builds it from its settings (`WorkerSettings.engine_config()`); benchmarks and tests
build it directly. Admission knobs live in `policy` (`scheduler.BatchPolicy`, whose defaults are
the service's), so they are defined once.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from scheduler import BatchPolicy
from worker.engine.kv_prune import DEFAULT_SINK_TOKENS, PrunePolicy
from worker.engine.model_files import DEFAULT_MODEL

EngineName = Literal["paged", "static", "echo"]
DEFAULT_KV_CACHE_BYTES = 256 * 2**20


@dataclass(frozen=True)
class EngineConfig:
    """What to load, where, in which formats; how to cache KV; how to batch."""

    engine: EngineName = "paged"
    model: str = DEFAULT_MODEL  # id, directory, .gguf file or a random shape (`random_model.RANDOM_MODELS`)
    device: str = "cpu"  # a torch device, already resolved ("cuda", "cuda:1", "cpu")
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"  # auto: float16 on GPU, float32 on CPU
    weights: Literal["auto", "fp16", "bf16", "int8", "w8a8"] = "auto"  # see `quant/weights.py`
    trust_remote_code: bool = False
    cache_dir: Path | None = None  # converted-model cache; None: `model_files.default_cache_dir()`
    policy: BatchPolicy = field(default_factory=BatchPolicy)
    # KV cache pool size; None: a fraction of the free memory on CUDA (`kv_cache.num_blocks_for_budget`).
    kv_cache_bytes: int | None = DEFAULT_KV_CACHE_BYTES
    kv_block_size_tokens: int = 16
    kv_dtype: Literal["auto", "fp16", "bf16", "fp32", "int8"] = "auto"  # see `kv_cache.py`
    kv_budget_tokens: int = 0  # KV pruning (`kv_prune.py`): tokens a sequence keeps; 0 = off
    kv_sink_tokens: int = DEFAULT_SINK_TOKENS
    kv_prune_mode: Literal["window", "snapkv"] = "window"
    enable_prefix_caching: bool = True
    attention_backend: Literal["auto", "triton", "torch"] = "auto"  # auto: triton on CUDA
    cuda_graphs: bool = True  # decode steps replayed as CUDA graphs (triton backend on CUDA)
    fused_layers: bool = True  # one-launch norms, QKV + RoPE-and-store, gate/up + SiLU (triton backend)
    # New prompts join a decoding batch at latest every N steps; None: 8 with CUDA graphs, else 0 (each step).
    prefill_interval_steps: int | None = None
    # Plan and launch step N+1 before step N is read back (its tokens fed on the device); None: on with CUDA.
    async_scheduling: bool | None = None
    # Stream step N's tokens after step N+1 is launched; None: on with CUDA where async scheduling is off.
    async_output: bool | None = None
    echo_token_delay_ms: float = 0.0  # echo engine: sleep per generated token
    grammar_threads: int = 0  # structured output: threads filling token masks; 0 = a quarter of the CPUs, 1-8
    torch_threads: int = 0  # CPU engines: torch intra-op threads; 0 = `host_cpus.default_torch_threads()`

    def prune_policy(self) -> PrunePolicy:
        """KV pruning as configured; raises `ValueError` for an unusable budget or mode."""
        return PrunePolicy(
            block_size=self.kv_block_size_tokens, default_budget_tokens=self.kv_budget_tokens,
            sink_tokens=self.kv_sink_tokens, mode=self.kv_prune_mode,
        )  # fmt: skip
