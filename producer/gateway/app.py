"""The FastAPI app of the gateway: `create_app(settings)`.

Routes: `POST /v1/chat/completions`, `POST /v1/completions`, `GET /v1/models`, `GET /v1/models/{id}`,
`GET /health` (the process answers), `GET /ready` (Redis answers and a worker is live, else 503),
`GET /metrics` (Prometheus, `metrics.py`).

Every answer that is not a success is an OpenAI error body (`errors.py`); `RequestMiddleware` (the
outermost of the app's own layers) gives every response its `X-Request-Id`, logs
`gateway_request_done` and counts it in the metrics, and turns anything unexpected into a 500
without a stack trace.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import redis
import redis.asyncio as aioredis
import structlog
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from pydantic import TypeAdapter, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from producer.gateway.backends import Backend, Backends
from producer.gateway.calls import Call, EventStreamResponse, done_fields, error_of
from producer.gateway.errors import ApiError, from_errors, from_validation, internal
from producer.gateway.live_workers import WorkerDirectory
from producer.gateway.metrics import GatewayMetrics
from producer.gateway.openai_schema import ChatCompletionRequest, CompletionRequest, Model, ModelList
from producer.gateway.reply_mux import Interrupt
from producer.gateway.settings import GatewaySettings
from producer.gateway.translate import (
    ChatRenderer,
    CompletionRenderer,
    Renderer,
    chat_params,
    completion_params,
    completion_prompt,
    wire_names,
)
from producer.messages import MessageError
from producer.settings import ProducerSettings
from producer.wire.keys import stats_stream
from producer.wire.models import DoneEvent, RequestId, TokenEvent, new_request_id
from producer.wire.redis_factory import connect_async

log = structlog.get_logger("producer.gateway")

_REQUEST_ID = TypeAdapter(RequestId)
TIMEOUT_HEADER = "x-timeout-ms"
MAX_TIMEOUT_MS = 24 * 3600 * 1000
SHUTDOWN_WAIT_S = 3.0
QUIET_PATHS = ("/health", "/ready", "/metrics")  # logged at debug: probes and scrapes would flood the log


@dataclass
class Gateway:
    """What the routes share: settings, the backends, the live workers, the gateway's own connection."""

    settings: GatewaySettings
    producer: ProducerSettings
    backends: Backends
    workers: WorkerDirectory
    redis: aioredis.Redis
    metrics: GatewayMetrics
    started_s: float = field(default_factory=time.monotonic)
    requests: int = 0


def _gateway(request: Request) -> Gateway:
    return request.app.state.gateway  # type: ignore[no-any-return]


def _json_response(status: int, body: Any, headers: dict[str, str] | None = None) -> Response:
    return Response(json.dumps(body, separators=(",", ":")), status, headers, media_type="application/json")


def error_response(error: ApiError) -> Response:
    return _json_response(error.status, error.body(), error.headers)


class RequestMiddleware:
    """X-Request-Id (validated, echoed or generated), one `gateway_request_done` line and the request
    metrics from the same values, and no stack trace."""

    def __init__(self, app: ASGIApp, metrics: GatewayMetrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        path = scope.get("path", "")
        route = self.metrics.route(path)
        in_flight = self.metrics.begin(route)
        state = scope.setdefault("state", {})
        info: dict[str, Any] = {}
        state["log"] = info
        state["started"] = started
        given = _header(scope, b"x-request-id")
        bad_id = given is not None and not _valid_request_id(given)
        request_id = given if given is not None and not bad_id else new_request_id()
        state["request_id"] = request_id
        status: int | None = None

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = [h for h in message.get("headers", []) if h[0].lower() != b"x-request-id"]
                headers.append((b"x-request-id", request_id.encode()))
                message = {**message, "headers": headers}
            await send(message)

        try:
            if bad_id:
                info["error"] = "invalid_value"
                error = ApiError(
                    400,
                    "Invalid 'X-Request-Id': 1-128 characters of A-Za-z0-9_.:- expected.",
                    code="invalid_value",
                    param="X-Request-Id",
                )
                await error_response(error)(scope, receive, send_with_id)
            else:
                await self.app(scope, receive, send_with_id)
        except ClientDisconnect:
            info["disconnected"] = True
        except Exception as exc:
            log.error(
                "gateway_request_failed", request_id=request_id, error=f"{type(exc).__name__}: {exc}"[:300]
            )
            if status is None:
                info["error"] = "internal_error"
                with contextlib.suppress(Exception):
                    await error_response(internal())(scope, receive, send_with_id)
        finally:
            elapsed = time.perf_counter() - started
            final_status = info.pop("status_after_start", None) or status or 499
            self.metrics.done(route, final_status, elapsed, info.get("error"), in_flight)
            level = log.debug if path in QUIET_PATHS else log.info
            level(
                "gateway_request_done",
                request_id=request_id,
                method=scope.get("method"),
                path=path,
                status=final_status,
                ms=round(elapsed * 1000, 3),
                **info,
            )


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", []):
        if key.lower() == name:
            return value.decode("latin-1")
    return None


def _valid_request_id(value: str) -> bool:
    try:
        _REQUEST_ID.validate_python(value)
    except ValidationError:
        return False
    return True


async def read_json(request: Request, limit: int) -> Any:
    """The request body as JSON; ApiError 413 past `limit` bytes (read no further), 400 if not JSON."""
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise _too_large(limit)
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _too_large(limit)
        chunks.append(chunk)
    raw = b"".join(chunks)
    if not raw.strip():
        raise ApiError(400, "The request body is empty; a JSON object is expected.", code="invalid_json")
    try:
        return json.loads(raw, parse_constant=_no_constant)
    except (ValueError, RecursionError) as exc:
        # UnicodeDecodeError and JSONDecodeError are ValueErrors; RecursionError: nesting too deep.
        reason = "nesting too deep" if isinstance(exc, RecursionError) else str(exc)[:200]
        raise ApiError(400, f"The request body is not valid JSON: {reason}", code="invalid_json") from None


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _too_large(limit: int) -> ApiError:
    return ApiError(413, f"The request body exceeds {limit} bytes.", code="request_too_large")


def _timeout_s(request: Request, body_ms: int | None, default_s: float) -> float:
    """The request's deadline: the smaller of `timeout_ms` and the X-Timeout-Ms header, else the default."""
    given: list[int] = []
    header = request.headers.get(TIMEOUT_HEADER)
    if header is not None:
        if not header.strip().isdigit() or not 1 <= int(header) <= MAX_TIMEOUT_MS:
            raise ApiError(
                400,
                f"Invalid 'X-Timeout-Ms': an integer from 1 to {MAX_TIMEOUT_MS} expected.",
                code="invalid_value",
                param="X-Timeout-Ms",
            )
        given.append(int(header))
    if body_ms is not None:
        if not 1 <= body_ms <= MAX_TIMEOUT_MS:
            raise ApiError(
                400,
                f"Invalid 'timeout_ms': an integer from 1 to {MAX_TIMEOUT_MS} expected.",
                code="invalid_value",
                param="timeout_ms",
            )
        given.append(body_ms)
    return min(given) / 1000 if given else default_s


# Fields of an assistant message as this gateway answers it (`refusal`), or as OpenAI may, that a caller
# sends back with the conversation: dropped while empty; set, they are later work (tools, audio).
REPLY_FIELDS = ("refusal", "tool_calls", "function_call", "audio", "annotations")


def _reply_fields_dropped(message: Any, index: int) -> Any:
    """A chat message without the empty reply fields; 400 for tool messages and set reply fields."""
    if not isinstance(message, dict):
        return message  # the normalisation and the wire's validation name what is wrong with it
    if message.get("role") == "tool":
        raise ApiError(
            400,
            "Unsupported parameter: tool messages are not supported by this server yet.",
            code="unsupported_parameter",
            param=f"messages[{index}].role",
        )
    for name in REPLY_FIELDS:
        if message.get(name) not in (None, []):
            raise ApiError(
                400,
                f"Unsupported parameter: '{name}' in messages is not supported by this server yet.",
                code="unsupported_parameter",
                param=f"messages[{index}].{name}",
            )
    return {k: v for k, v in message.items() if k not in REPLY_FIELDS}


async def _completion(request: Request, chat: bool) -> Response:
    gw = _gateway(request)
    info: dict[str, Any] = request.state.log
    backend = gw.backends.authenticate(request.headers.get("authorization"))
    info["tenant"] = backend.tenant
    body = await read_json(request, gw.settings.max_body_bytes)
    if not isinstance(body, dict):
        raise ApiError(400, "The request body must be a JSON object.", code="invalid_type")
    req: ChatCompletionRequest | CompletionRequest
    try:
        req = ChatCompletionRequest.model_validate(body) if chat else CompletionRequest.model_validate(body)
    except ValidationError as exc:
        raise from_validation(exc) from None
    info.update(model=req.model, stream=bool(req.stream))
    if isinstance(req, ChatCompletionRequest):
        params = chat_params(req, gw.settings)
        messages = [_reply_fields_dropped(m, i) for i, m in enumerate(req.messages)]
    else:
        params = completion_params(req, gw.settings)
    if not gw.workers.accepts(req.model):
        raise ApiError(
            404,
            f"The model `{req.model[:256]}` does not exist or you do not have access to it.",
            code="model_not_found",
            param="model",
        )
    timeout_s = _timeout_s(request, req.timeout_ms, gw.settings.request_timeout_s)
    request_id: str = request.state.request_id
    params.update(id=request_id, timeout_ms=max(1, int(timeout_s * 1000)))
    try:
        if isinstance(req, ChatCompletionRequest):
            prepared = backend.client.prepare(messages, **params)
        else:
            prepared = backend.client.prepare(prompt=completion_prompt(req), **params)
    except MessageError as exc:
        raise ApiError(400, f"Invalid '{exc.param}': {exc}.", code="invalid_value", param=exc.param) from None
    except ValidationError as exc:
        raise from_validation(exc, wire_names(req)) from None
    except ValueError as exc:
        raise ApiError(400, str(exc)[:300], code="invalid_value") from None
    renderer: Renderer = (ChatRenderer if chat else CompletionRenderer)(request_id, req.model, req.n or 1)
    gw.requests += 1
    call = Call(backend, prepared, timeout_s, gw.settings.retry_after_s, wire_names(req))
    started: float = request.state.started
    await call.start(request.receive)
    info["sent_ms"] = _ms_since(started)
    try:
        first = await (call.next() if req.stream else call.final())
    except BaseException:
        await call.finish()
        raise
    info["first_event_ms"] = _ms_since(started)
    if isinstance(first, DoneEvent) and not req.stream:
        await call.finish()
        info.update(done_fields(first))
        return Response(renderer.whole(first), 200, media_type="application/json")
    if first is Interrupt.DISCONNECTED or not isinstance(first, (DoneEvent, TokenEvent)):
        await call.finish()
        info["cancelled"] = call.cancelled
        if first is Interrupt.DISCONNECTED:
            info["disconnected"] = True
            return Response(status_code=499)
        error = error_of(first, call)
        info["error"] = error.code
        raise error
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    return EventStreamResponse(
        call, first, renderer, include_usage, {}, info.update, started, gw.metrics.ttft.observe
    )


def _ms_since(started: float) -> float:
    return round((time.perf_counter() - started) * 1000, 3)


def _backend_of(request: Request) -> Backend:
    return _gateway(request).backends.authenticate(request.headers.get("authorization"))


def create_app(settings: GatewaySettings | None = None, producer: ProducerSettings | None = None) -> FastAPI:
    """The gateway's app; its Redis connections open at startup (lifespan), close at shutdown."""
    settings = settings or GatewaySettings()
    producer = producer or ProducerSettings()
    keys = settings.key_ring()
    metrics = GatewayMetrics()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        own = connect_async(
            producer.redis_url, producer.redis_cluster, socket_timeout=10, socket_connect_timeout=5
        )
        workers = WorkerDirectory(
            own,
            stats_stream(producer.prefix),
            liveness_s=settings.worker_liveness_s,
            refresh_s=settings.stats_refresh_s,
            default_model=settings.default_model,
        )
        gw = Gateway(settings, producer, Backends(producer, settings, keys), workers, own, metrics)
        app.state.gateway = gw
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(workers.refresh(), 2.0)
        workers.start()
        if keys is None:
            log.warning(
                "gateway_open_namespace",
                tenant=producer.tenant,
                message="no keys file (LLM_GATEWAY_KEYS_FILE): no authentication, every caller writes into "
                "one namespace as REDIS_URL's user",
            )
        log.info(
            "gateway_started",
            host=settings.host,
            port=settings.port,
            prefix=producer.prefix,
            shards=producer.stream_shards,
            tenants=sorted(t for t in gw.backends.by_tenant if t is not None),
            keys=0 if keys is None else len(keys.keys),
            live_workers=len(workers.live()),
            models=sorted(workers.models()),
        )
        try:
            yield
        finally:
            # Requests cancelled at the end of the drain are still cancelling on the wire: let them.
            deadline = time.monotonic() + SHUTDOWN_WAIT_S
            while gw.backends.open_requests() and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            await workers.aclose()
            await gw.backends.aclose()
            await own.aclose()
            reads = sum(b.mux.reads for b in gw.backends.by_tenant.values())
            streams = sum(b.mux.streams_read for b in gw.backends.by_tenant.values())
            log.info(
                "gateway_stopped",
                requests=gw.requests,
                reply_reads=reads,
                streams_per_read=round(streams / reads, 2) if reads else 0,
                open_requests=gw.backends.open_requests(),
                uptime_s=round(time.monotonic() - gw.started_s, 3),
            )

    app = FastAPI(
        title="llm-stream-serve gateway", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None
    )
    app.add_middleware(RequestMiddleware, metrics=metrics)

    # Every handler answers through `_answer`, so `gateway_request_done` names the error code.
    def _answer(request: Request, error: ApiError, headers: dict[str, str] | None = None) -> Response:
        request.state.log.setdefault("error", error.code)
        return _json_response(error.status, error.body(), {**error.headers, **(headers or {})})

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> Response:
        return _answer(request, exc)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> Response:
        errors = [{**e, "loc": tuple(e.get("loc", ()))[1:]} for e in exc.errors()]
        return _answer(request, from_errors(errors))

    @app.exception_handler(json.JSONDecodeError)
    async def _json_error(request: Request, exc: json.JSONDecodeError) -> Response:
        return _answer(
            request, ApiError(400, f"The request body is not valid JSON: {exc.msg}", code="invalid_json")
        )

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
        codes = {404: "not_found", 405: "method_not_allowed"}
        message = f"{request.method} {request.url.path}: {exc.detail}"
        error = ApiError(exc.status_code, message, code=codes.get(exc.status_code, "http_error"))
        return _answer(request, error, dict(exc.headers or {}))

    # Reached only if `RequestMiddleware` itself fails (it turns every other exception into a 500).
    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> Response:
        log.error(
            "gateway_request_failed",
            request_id=getattr(request.state, "request_id", None),
            error=f"{type(exc).__name__}: {exc}"[:300],
        )
        return error_response(internal())

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await _completion(request, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await _completion(request, chat=False)

    @app.get("/v1/models")
    async def list_models(request: Request) -> Response:
        _backend_of(request)
        workers = _gateway(request).workers
        data = [Model(id=m, created=workers.first_seen(m)) for m in sorted(workers.models())]
        return Response(ModelList(data=data).model_dump_json(), media_type="application/json")

    @app.get("/v1/models/{model:path}")
    async def get_model(request: Request, model: str) -> Response:
        _backend_of(request)
        workers = _gateway(request).workers
        if model not in workers.models():
            raise ApiError(
                404,
                f"The model `{model[:256]}` does not exist or you do not have access to it.",
                code="model_not_found",
                param="model",
            )
        return Response(
            Model(id=model, created=workers.first_seen(model)).model_dump_json(),
            media_type="application/json",
        )

    @app.get("/health")
    async def health() -> Response:
        return _json_response(200, {"status": "ok"})

    @app.get("/ready")
    async def ready(request: Request) -> Response:
        gw = _gateway(request)
        reason = await _not_ready_reason(gw)
        if reason is not None:
            request.state.log["error"] = "not_ready"
            error = ApiError(503, reason, type="api_error", code="not_ready")
            return _json_response(503, error.body(), {"Retry-After": str(gw.settings.retry_after_s)})
        live = gw.workers.live()
        return _json_response(
            200, {"status": "ready", "workers": len(live), "models": sorted(gw.workers.models())}
        )

    @app.get("/metrics")
    async def prometheus_metrics(request: Request) -> Response:
        # `llm_gateway_ready` is what /ready would answer now, not what it last answered to a probe.
        await _not_ready_reason(_gateway(request))
        body, content_type = metrics.exposition(request.headers.get("accept"))
        return Response(body, 200, {"Content-Type": content_type})

    metrics.label_routes(app.routes)
    app.state.metrics = metrics
    return app


async def _not_ready_reason(gw: Gateway) -> str | None:
    """Why /ready answers 503 now (None: it answers 200); sets `llm_gateway_ready` to match."""
    reason: str | None = None
    try:
        await asyncio.wait_for(gw.redis.ping(), 1.0)
    except (asyncio.TimeoutError, redis.RedisError, OSError) as exc:
        reason = f"Redis does not answer: {type(exc).__name__}"
    else:
        if not gw.workers.live():
            why = gw.workers.last_error or f"no worker reported within {gw.settings.worker_liveness_s:g} s"
            reason = f"no live worker ({why})"
    gw.metrics.ready.set(reason is None)
    return reason
