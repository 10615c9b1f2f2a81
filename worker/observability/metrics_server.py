"""The worker's HTTP port (`LLM_METRICS_PORT`): `/metrics`, `/health` and `/ready`, on a daemon thread.

prometheus-client's own server answers every path with the metrics; a worker also needs its probes on
the same port (docs/metrics.md), so this is a small WSGI app on prometheus-client's threading server:
`/metrics` is its exposition app (text or OpenMetrics, gzip when asked), `/health` and `/ready` answer
from `WorkerHealth` (200 "ok", or 503 with the reason), anything else is 404. The server starts before
the engine loads, so probes see a starting worker (ready: 503) rather than a closed port.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, make_server

from prometheus_client import make_wsgi_app
from prometheus_client.exposition import ThreadingWSGIServer

from worker.observability.health import WorkerHealth
from worker.observability.metrics import WorkerMetrics

StartResponse = Callable[..., Any]


class _QuietHandler(WSGIRequestHandler):
    """No access log on stderr: probes and scrapes would flood it (the worker logs JSON on stdout)."""

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (the base class's name)
        pass


def _text(start_response: StartResponse, status: str, body: str) -> Iterable[bytes]:
    data = (body + "\n").encode()
    start_response(
        status, [("Content-Type", "text/plain; charset=utf-8"), ("Content-Length", str(len(data)))]
    )
    return [data]


class MetricsServer:
    """Serves one worker's metrics and probes until `close()`."""

    def __init__(self, metrics: WorkerMetrics, health: WorkerHealth, host: str, port: int) -> None:
        self.metrics = metrics
        self.health = health
        self._metrics_app = make_wsgi_app(metrics.registry)
        self._server = make_server(host, port, self._app, ThreadingWSGIServer, handler_class=_QuietHandler)
        self.port = int(self._server.server_port)
        self._thread = threading.Thread(target=self._server.serve_forever, name="metrics-http", daemon=True)
        self._thread.start()

    def _app(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if environ.get("REQUEST_METHOD") not in ("GET", "HEAD"):
            return _text(start_response, "405 Method Not Allowed", "only GET")
        if path == "/metrics":
            ready, _ = self.health.ready()
            self.metrics.ready.set(1 if ready else 0)
            return self._metrics_app(environ, start_response)  # type: ignore[no-any-return]
        if path in ("/health", "/ready"):
            ok, reason = self.health.live() if path == "/health" else self.health.ready()
            if path == "/ready":
                self.metrics.ready.set(1 if ok else 0)
            return _text(start_response, "200 OK" if ok else "503 Service Unavailable", reason)
        return _text(start_response, "404 Not Found", "not found: /metrics, /health, /ready")

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
