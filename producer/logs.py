"""Structured JSON logs on stdout, one event per line (`event`, `level`, `timestamp`): the format of the
workers and the gateway alike, for dashboards and on-call queries."""

from __future__ import annotations

import logging
import sys

import structlog

CLIENT_LOGGER = "producer"  # the client library's stdlib logger (producer/client.py)


def configure_logging(level: str = "info") -> None:
    """structlog's events and the client library's to stdout as JSON lines; other libraries' stdlib
    records (warnings and up) to stderr as plain text."""
    numeric = logging.getLevelName(level.upper())
    if not isinstance(numeric, int):
        numeric = logging.INFO
    logging.basicConfig(stream=sys.stderr, level=max(numeric, logging.WARNING), format="%(message)s")
    # The client library logs through stdlib logging (its fields in `extra`) so that any application
    # formats it its own way; in this project's processes its events are lines of the same JSON stream.
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                structlog.processors.JSONRenderer(),
            ],
            foreign_pre_chain=[
                structlog.stdlib.add_log_level,
                structlog.processors.TimeStamper(fmt="iso", utc=True),
                structlog.stdlib.ExtraAdder(),
            ],
        )
    )
    client = logging.getLogger(CLIENT_LOGGER)
    client.handlers = [handler]
    client.propagate = False
    client.setLevel(numeric)
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
