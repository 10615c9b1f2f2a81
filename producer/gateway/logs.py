"""The gateway's JSON log lines on stdout (structlog), in the workers' format (`event`, `level`, `timestamp`).

Events: `gateway_started`, `gateway_open_namespace` (no keys file), `gateway_request_done` (one per
HTTP request: request_id, tenant, method, path, status, ms, and for completions model, stream,
finish_reason, tokens, cancelled), `gateway_draining` (SIGTERM), `gateway_stopped`, and warnings of
Redis trouble (`gateway_stats_unreadable`, `gateway_reply_read_retry`, `gateway_cancel_failed`).
"""

from __future__ import annotations

import logging
import sys

import structlog


def configure_logging(level: str = "info") -> None:
    """Route structlog to stdout as JSON lines; stdlib logging (uvicorn's own) to stderr, warnings up."""
    numeric = logging.getLevelName(level.upper())
    if not isinstance(numeric, int):
        numeric = logging.INFO
    logging.basicConfig(stream=sys.stderr, level=max(numeric, logging.WARNING), format="%(message)s")
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stdout),
        cache_logger_on_first_use=True,
    )
