"""Open the engine the worker loop drives: in the loop's own process, or in one of its own."""

from __future__ import annotations

from worker.engine.base import Engine
from worker.engine.factory import create_engine
from worker.engine_process.client import EngineProcess
from worker.settings import WorkerSettings


def open_engine(settings: WorkerSettings) -> Engine:
    """The engine of `settings`: built here (`inline`), or in a child process (`separate`, `auto` on CUDA)."""
    config = settings.engine_config()
    if settings.uses_engine_process():
        return EngineProcess(config, settings.log_level)
    return create_engine(config)
