"""Build an engine from its `EngineConfig`: load the model, then the engine around it."""

from __future__ import annotations

import structlog

from worker.engine.base import Engine
from worker.engine.config import EngineConfig
from worker.engine.host_cpus import default_torch_threads

log = structlog.get_logger(__name__)


def create_engine(config: EngineConfig) -> Engine:
    """The engine named by `config.engine`, with its model loaded and warmed up."""
    threads = _set_torch_threads(config)
    engine = _build(config)
    # Weight and KV formats in force (also meant for the `worker_started` event: `engine.describe()`).
    log.info("engine_ready", engine=engine.name, torch_threads=threads, **engine.describe())
    return engine


def _set_torch_threads(config: EngineConfig) -> int:
    """Size torch's intra-op pool for a CPU engine (`host_cpus`); 0 where no torch runs (echo) or on a GPU,
    whose steps do not run on it (torch's default is kept)."""
    if config.engine == "echo" or config.device != "cpu":
        return 0
    import torch

    threads = config.torch_threads or default_torch_threads()
    torch.set_num_threads(threads)
    return threads


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
