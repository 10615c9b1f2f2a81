"""Build the engine a worker runs, from its settings; every engine admits with `settings.batch_policy()`."""

from __future__ import annotations

import structlog

from worker.engine.base import Engine
from worker.settings import WorkerSettings

log = structlog.get_logger(__name__)


def create_engine(settings: WorkerSettings) -> Engine:
    """The engine named by `settings.engine`, with its model loaded and warmed up."""
    engine = _build(settings)
    # Weight and KV formats in force (also meant for the `worker_started` event: `engine.describe()`).
    log.info("engine_ready", engine=engine.name, **engine.describe())
    return engine


def open_engine(settings: WorkerSettings) -> Engine:
    """The engine the worker loop drives: built here, or in a process of its own (`engine_process`)."""
    if settings.separate_engine_process():
        from worker.engine.process_engine import ProcessEngine

        return ProcessEngine(settings)
    return create_engine(settings)


def _build(settings: WorkerSettings) -> Engine:
    if settings.engine == "echo":
        from worker.engine.echo import EchoEngine

        return EchoEngine(settings.batch_policy(), token_delay_ms=settings.echo_token_delay_ms)
    from worker.engine.model_loader import load_model

    device = settings.resolved_device()
    loaded = load_model(
        settings.model,
        device=device,
        dtype=settings.dtype,
        trust_remote_code=settings.trust_remote_code,
        cache_dir=settings.cache_dir,
        weights=settings.weights,
    )
    if settings.engine == "static":
        from worker.engine.static_hf import StaticBatchEngine

        return StaticBatchEngine(
            loaded, device=device, policy=settings.batch_policy(), model_name=settings.model
        )
    from worker.engine.llm_engine import PagedEngine

    return PagedEngine(
        loaded.model,
        loaded.tokenizer,
        kv_cache_bytes=settings.kv_cache_bytes,
        block_size=settings.kv_block_size_tokens,
        policy=settings.batch_policy(),
        attention_backend=settings.attention_backend,
        enforce_eager=not settings.cuda_graphs,
        prefill_interval_steps=settings.prefill_interval_steps,
        async_output=settings.async_output,
        model_name=settings.model,
        kv_dtype=settings.kv_dtype,
        kv_budget_tokens=settings.kv_budget_tokens,
        kv_sink_tokens=settings.kv_sink_tokens,
        kv_prune_mode=settings.kv_prune_mode,
    )
