"""The gateway's Prometheus metrics (docs/metrics.md, "Gateway"), in a registry each app owns.

`GatewayMetrics` holds one `CollectorRegistry`: the `llm_gateway_*` metrics and prometheus-client's
process, platform and GC collectors. It is the app's own, not the library's global one, so several apps
in one process (tests) do not share series; `GET /metrics` serves it (`exposition`).

The request metrics are observed by `RequestMiddleware` where it logs `gateway_request_done`, from the
values of that line (`status`, `ms`, `error`), so the log and the metrics agree request for request;
the time to first token where a stream writes its first chunk (the line's `first_token_ms`). The cost
is a few dictionary lookups and prometheus-client's locked increments per request; no object of the
request is kept.

Labels are bounded whatever a client sends: `route` is the template of the app's route whose pattern
the path matches (`/v1/models/{model}`, converters dropped), else `other`, never the path itself;
`status` is a status the gateway answers with; `code` one of `errors.CODES`, else `other`. The probes
and `/metrics` are counted under their own routes but kept out of `llm_gateway_requests_in_flight`,
so that gauge reads 0 on an idle gateway, scrapes included.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
)
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4, choose_encoder, generate_latest
from starlette.routing import BaseRoute

from producer.gateway.errors import CODES

OTHER = "other"
NOT_IN_FLIGHT = frozenset({"/health", "/ready", "/metrics"})
# Request received to last byte sent: probes and refusals take a millisecond, streams up to the deadline.
DURATION_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0,
    320.0, 640.0,
)  # fmt: skip
# vLLM's buckets of `vllm:time_to_first_token_seconds`, so the two read alike.
TTFT_BUCKETS = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0,
    80.0, 160.0, 640.0, 2560.0,
)  # fmt: skip
_CONVERTER = re.compile(r"\{(\w+):[^}]*\}")


class GatewayMetrics:
    """The `llm_gateway_*` metrics of one app, and the route labels of its paths."""

    def __init__(self) -> None:
        self.registry = registry = CollectorRegistry(auto_describe=True)
        ProcessCollector(registry=registry)
        PlatformCollector(registry=registry)
        GCCollector(registry=registry)
        self.requests = Counter(
            "llm_gateway_requests_total",
            "HTTP requests answered, by route template and status.",
            ("route", "status"),
            registry=registry,
        )
        self.errors = Counter(
            "llm_gateway_errors_total",
            "Error answers by their OpenAI error code.",
            ("code",),
            registry=registry,
        )
        self.duration = Histogram(
            "llm_gateway_request_duration_seconds",
            "Request received to last byte sent (a stream: to its end).",
            ("route",),
            buckets=DURATION_BUCKETS,
            registry=registry,
        )
        self.ttft = Histogram(
            "llm_gateway_time_to_first_token_seconds",
            "Streamed completions: request received to the first token chunk sent.",
            buckets=TTFT_BUCKETS,
            registry=registry,
        )
        self.in_flight = Gauge(
            "llm_gateway_requests_in_flight",
            "Requests being answered now (not /health, /ready, /metrics).",
            registry=registry,
        )
        self.ready = Gauge("llm_gateway_ready", "1 while /ready answers 200.", registry=registry)
        self._static: dict[str, str] = {}
        self._patterns: list[tuple[re.Pattern[str], str]] = []
        # The labelled children, looked up once: prometheus-client's `labels()` locks on every call.
        self._answered: dict[tuple[str, int], Counter] = {}
        self._durations: dict[str, Histogram] = {}
        self._errors: dict[str, Counter] = {}

    def label_routes(self, routes: Iterable[BaseRoute]) -> None:
        """Learn the app's routes: exact paths by dictionary, templated ones by their pattern."""
        for route in routes:
            path = getattr(route, "path", None)
            regex = getattr(route, "path_regex", None)
            if not isinstance(path, str) or not isinstance(regex, re.Pattern):
                continue
            if getattr(route, "param_convertors", None):
                self._patterns.append((regex, _CONVERTER.sub(r"{\1}", path)))
            else:
                self._static[path] = path

    def route(self, path: str) -> str:
        """The route label of a request path: its route's template, or `other`."""
        label = self._static.get(path)
        if label is not None:
            return label
        for regex, template in self._patterns:
            if regex.match(path):
                return template
        return OTHER

    def begin(self, route: str) -> bool:
        """A request came in; True when it counts in the in-flight gauge (pass it to `done`)."""
        if route in NOT_IN_FLIGHT:
            return False
        self.in_flight.inc()
        return True

    def done(self, route: str, status: int, seconds: float, error: str | None, in_flight: bool) -> None:
        """A request's response ended: its status, its duration, its error code (None if it succeeded)."""
        if in_flight:
            self.in_flight.dec()
        answered = self._answered.get((route, status))
        if answered is None:
            answered = self._answered[(route, status)] = self.requests.labels(route, str(status))
        answered.inc()
        duration = self._durations.get(route)
        if duration is None:
            duration = self._durations[route] = self.duration.labels(route)
        duration.observe(seconds)
        if error is not None:
            code = error if error in CODES else OTHER
            errors = self._errors.get(code)
            if errors is None:
                errors = self._errors[code] = self.errors.labels(code)
            errors.inc()

    def exposition(self, accept: str | None) -> tuple[bytes, str]:
        """The registry in the format `accept` asks for (the 0.0.4 text format by default), and its
        content type."""
        try:
            encoder, content_type = choose_encoder(accept or "")
        except (TypeError, ValueError):  # a version that is not a number: prometheus-client trips on it
            encoder, content_type = generate_latest, CONTENT_TYPE_PLAIN_0_0_4
        return encoder(self.registry), content_type
