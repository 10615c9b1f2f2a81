"""`python -m producer.gateway` (`llm-gateway`): the OpenAI-compatible gateway on uvicorn.

    python -m producer.gateway --host 0.0.0.0 --port 8000 --keys-file keys.jsonl

Every `LLM_GATEWAY_*` setting has an option of the same name (`LLM_GATEWAY_DRAIN_S` -> `--drain-s`),
and the wire's `REDIS_URL`, `LLM_PREFIX` and `LLM_STREAM_SHARDS` have `--redis-url`, `--prefix` and
`--stream-shards`; an option wins over the variable. A bad value exits 2 with one `config_invalid` JSON
line, as `python -m producer` does. uvicorn runs with uvloop and httptools when they are installed
(`uvicorn[standard]`); SIGTERM stops accepting connections and lets open requests finish for up to
`--drain-s` seconds (uvicorn's graceful shutdown), then cancels the rest on the wire.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib.util
import math
import signal
import sys
from collections.abc import Iterator
from types import FrameType
from typing import Any

import pydantic
import structlog
import uvicorn

from producer.config_errors import CONFIG_ERROR_EXIT, print_config_error, print_config_event
from producer.gateway.api_keys import KeysFileError
from producer.gateway.app import create_app
from producer.gateway.settings import GatewaySettings
from producer.logs import configure_logging
from producer.settings import ProducerSettings

log = structlog.get_logger("producer.gateway")

PRODUCER_OPTIONS = ("redis_url", "prefix", "stream_shards")


def _option(field: str) -> str:
    return "--" + field.replace("_", "-")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m producer.gateway", description="OpenAI-compatible HTTP gateway."
    )
    for name, info in GatewaySettings.model_fields.items():
        env = f"LLM_GATEWAY_{name.upper()}"
        p.add_argument(_option(name), dest=name, default=None, help=f"{info.description} (env {env})")
    p.add_argument("--redis-url", dest="redis_url", default=None, help="the service's Redis (env REDIS_URL)")
    p.add_argument("--prefix", dest="prefix", default=None, help="key prefix of the workers (env LLM_PREFIX)")
    p.add_argument(
        "--stream-shards", dest="stream_shards", default=None, help="request streams, as the workers' (env "
        "LLM_STREAM_SHARDS)"
    )  # fmt: skip
    return p


class GatewayServer(uvicorn.Server):
    """uvicorn's server, logging the start of the drain, and exiting 0 after it (uvicorn re-raises the
    signal once shut down, so the process would end killed by it)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        with super().capture_signals():
            try:
                yield
            finally:
                captured = getattr(self, "_captured_signals", None)
                if isinstance(captured, list):
                    captured.clear()

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if not self.should_exit:
            log.info(
                "gateway_draining",
                signal=signal.Signals(sig).name,
                drain_s=self.config.timeout_graceful_shutdown,
            )
        super().handle_exit(sig, frame)


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def main(argv: list[str] | None = None) -> int:
    args = vars(parser().parse_args(argv))
    given = {k: v for k, v in args.items() if v is not None}
    gateway_overrides: dict[str, Any] = {k: v for k, v in given.items() if k not in PRODUCER_OPTIONS}
    producer_overrides: dict[str, Any] = {k: v for k, v in given.items() if k in PRODUCER_OPTIONS}
    try:
        producer = ProducerSettings(**producer_overrides)
    except pydantic.ValidationError as exc:
        print_config_error(exc, ProducerSettings, {k: _option(k) for k in producer_overrides})
        return CONFIG_ERROR_EXIT
    try:
        settings = GatewaySettings(**gateway_overrides)
        app = create_app(settings, producer)
    except pydantic.ValidationError as exc:
        print_config_error(exc, GatewaySettings, {k: _option(k) for k in gateway_overrides})
        return CONFIG_ERROR_EXIT
    except KeysFileError as exc:  # the keys file changed between validation and loading
        error = {"env": "LLM_GATEWAY_KEYS_FILE", "value": str(settings.keys_file), "expected": str(exc)}
        print_config_event({**error, "settings": GatewaySettings.__name__, "errors": [error]})
        return CONFIG_ERROR_EXIT
    configure_logging(settings.log_level)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        loop="uvloop" if _installed("uvloop") else "asyncio",
        http="httptools" if _installed("httptools") else "h11",
        lifespan="on",
        log_config=None,
        log_level="warning",
        access_log=False,
        server_header=False,
        timeout_graceful_shutdown=math.ceil(settings.drain_s),
    )
    # What is alive now (modules, the app, settings) lives as long as the process: out of the GC's
    # scans, a full collection (which pauses every open stream) walks only the objects of requests.
    gc.collect()
    gc.freeze()
    GatewayServer(config).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
