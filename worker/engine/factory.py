"""Build an engine from its `EngineConfig`: load the model, then the engine around it."""

from __future__ import annotations

import structlog

from worker.engine.base import Engine
from worker.engine.config import EngineConfig

log = structlog.get_logger(__name__)


def create_engine(config: EngineConfig) -> Engine:
    """The engine named by `config.engine`, with its model loaded and warmed up."""
    engine = _build(config)
    # Weight and KV formats in force (also meant for the `worker_started` event: `engine.describe()`).
    log.info("engine_ready", engine=engine.name, **engine.describe())
    return engine


def _build(config: EngineConfig) -> Engine:
    # Imported by the branch taken: the echo engine needs neither transformers nor a model.
    if config.engine == "echo":
        from worker.engine.echo_engine import EchoEngine

        return EchoEngine(config)
    from worker.engine.model_loader import load_model

    loaded = load_model(
        config.model, device=config.device, dtype=config.dtype, trust_remote_code=config.trust_remote_code,
        cache_dir=config.cache_dir, weights=config.weights,
    )  # fmt: skip
    if config.engine == "static":
        from worker.engine.static_engine import StaticBatchEngine

        return StaticBatchEngine(loaded, config)
    from worker.engine.paged_engine import PagedEngine

    return PagedEngine(loaded.model, loaded.tokenizer, config)
