"""One HTTP request's life on the wire: sent, its reply events awaited, cancelled when nobody waits any more.

`Call.start` opens the request's reply stream in the multiplexer (before sending, so the read is on
the wire first), arms its deadline, watches the HTTP connection for a disconnect, and sends the
request with the client library (`AsyncChatClient.send`: admission script or a tenant's XADD, the
shard, retries). Everything the request can still get arrives in one queue: reply events, the
deadline (`Interrupt.TIMED_OUT`), the client's disconnect (`Interrupt.DISCONNECTED`), a read failure.
`Call.finish` (always called) cancels the request on the wire (`AsyncChatClient.cancel`) unless its
final event came, so no worker keeps generating for a caller that left or timed out.

The status is decided by the first event: a streamed response starts (200) only once the first
token or final event is in, so a refusal before any output (`too_long`, `overloaded`, ...) still gets
its own HTTP status. `EventStreamResponse` then writes server-sent events, several chunks per write
when several events are waiting; its first write (the opening chunk with the first event's) is the
time to first token the gateway reports (`first_token_ms`, `llm_gateway_time_to_first_token_seconds`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Callable, Mapping
from typing import Any

import redis
import structlog
from starlette.requests import ClientDisconnect
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from producer.client import ChatError, PreparedRequest, TokenRuns
from producer.gateway.backends import Backend
from producer.gateway.errors import ApiError, from_wire, internal, timed_out, unavailable
from producer.gateway.reply_mux import DuplicateRequest, Interrupt, Item, ReadFailure, Subscription
from producer.gateway.translate import DONE, Renderer, choices_of, sse
from producer.wire.models import DoneEvent, ErrorEvent, TokenEvent

log = structlog.get_logger("producer.gateway")

CANCEL_TIMEOUT_S = 2.0


class Call:
    """A request sent for one HTTP request, until `finish`."""

    def __init__(
        self, backend: Backend, prepared: PreparedRequest, timeout_s: float, retry_after_s: int,
        names: Mapping[str, str] | None = None,
    ):  # fmt: skip
        self.backend = backend
        self.prepared = prepared
        self.id = prepared.id
        self.timeout_s = timeout_s
        self.retry_after_s = retry_after_s
        self.names = names or {}  # wire field -> the request field it came from, for an error's `param`
        self.sub: Subscription | None = None
        self.sent = False
        self.ended = False  # the final event (or a read failure) came: nothing to cancel
        self.finished = False
        self.cancelled = False
        self._timer: asyncio.TimerHandle | None = None
        self._watcher: asyncio.Task[None] | None = None

    async def start(self, receive: Receive) -> None:
        """Open the reply stream, arm the deadline and the disconnect watch, send; ApiError if refused."""
        try:
            self.sub = self.backend.mux.open(self.id, self.prepared.reply_key)
        except DuplicateRequest:
            raise ApiError(
                409, f"request {self.id} is already in progress", code="duplicate_request_id"
            ) from None
        self.backend.active.add(self)
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(self.timeout_s, self._interrupt, Interrupt.TIMED_OUT)
        self._watcher = loop.create_task(self._watch(receive))
        try:
            await asyncio.wait_for(self.backend.client.send(self.prepared), self.timeout_s)
        except ChatError as exc:
            await self.finish()
            raise from_wire(exc.code, exc.message, self.retry_after_s) from None
        except (asyncio.TimeoutError, redis.ConnectionError, redis.TimeoutError) as exc:
            await self.finish()
            log.warning("gateway_send_failed", request_id=self.id, error=f"{type(exc).__name__}: {exc}"[:200])
            raise unavailable("the request queue is unreachable; retry later", self.retry_after_s) from None
        except redis.RedisError as exc:
            await self.finish()
            log.error("gateway_send_failed", request_id=self.id, error=f"{type(exc).__name__}: {exc}"[:200])
            raise internal() from None
        except BaseException:
            await self.finish()
            raise
        self.sent = True

    def _interrupt(self, why: Interrupt) -> None:
        if self.sub is not None and not self.finished:
            self.sub.queue.put_nowait(why)

    async def _watch(self, receive: Receive) -> None:
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                self._interrupt(Interrupt.DISCONNECTED)
                return

    def _seen(self, item: Item) -> Item:
        if isinstance(item, (DoneEvent, ErrorEvent, ReadFailure)):
            self.ended = True
        return item

    async def next(self) -> Item:
        assert self.sub is not None
        return self._seen(await self.sub.queue.get())

    def next_nowait(self) -> Item | None:
        assert self.sub is not None
        try:
            return self._seen(self.sub.queue.get_nowait())
        except asyncio.QueueEmpty:
            return None

    async def final(self) -> Item:
        """The next item that is not a token event: the final event, or an interrupt."""
        while True:
            item = await self.next()
            if not isinstance(item, TokenEvent):
                return item

    async def finish(self) -> None:
        """Stop reading and watching; cancel on the wire unless the request ended. Idempotent."""
        if self.finished:
            return
        self.finished = True
        # Dropped, not only cancelled: the cancelled watcher keeps its CancelledError, whose traceback
        # holds this call, and the timer its bound method; kept here they make a reference cycle of
        # the whole request that only the (slow, process-pausing) full GC would free.
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._watcher is not None:
            self._watcher.cancel()
            self._watcher = None
        if self.sub is not None:
            self.backend.mux.close(self.sub)
        client = self.backend.client
        try:
            if self.sent and not self.ended:
                self.cancelled = True
                await asyncio.wait_for(client.cancel(self.id), CANCEL_TIMEOUT_S)
        except (asyncio.TimeoutError, redis.RedisError) as exc:
            # The request's own deadline (sent as its timeout_ms) still stops it on the worker.
            log.warning(
                "gateway_cancel_failed", request_id=self.id, error=f"{type(exc).__name__}: {exc}"[:200]
            )
        finally:
            client.forget(self.id)
            self.backend.active.discard(self)


def error_of(item: Item, call: Call) -> ApiError:
    """The HTTP error for a queue item that ends a request without an answer."""
    if isinstance(item, ErrorEvent):
        param = None if item.param is None else call.names.get(item.param, item.param)
        return from_wire(item.code, item.message, call.retry_after_s, param)
    if item is Interrupt.TIMED_OUT:
        return timed_out(call.timeout_s)
    if isinstance(item, ReadFailure):
        return internal(item.message)
    return internal()


class Streamed:
    """What a streamed reply has shown so far: the run of tokens followed, and each choice's text."""

    def __init__(self) -> None:
        self.runs = TokenRuns()
        self.text: dict[int, list[str]] = {}
        self.chars = 0
        self._chars: dict[int, int] = {}

    def accept(self, event: TokenEvent) -> bool:
        """Whether a token event continues the followed run; its text is then shown."""
        if not self.runs.accept(event):
            return False
        if event.text:
            self.text.setdefault(event.choice, []).append(event.text)
            self.chars += len(event.text)
            self._chars[event.choice] = self._chars.get(event.choice, 0) + len(event.text)
        return True

    def token(self, event: TokenEvent) -> str | None:
        """The text to show for a token event (None: another run's, or empty)."""
        return event.text if self.accept(event) and event.text else None

    def shown(self, choice: int) -> int:
        """How many characters of a choice were shown."""
        return self._chars.get(choice, 0)

    def rest(self, text: str, choice: int = 0) -> str:
        """What a choice's final text adds to what was shown (all of it when another run won and nothing
        of it was shown; nothing when what was shown is not a prefix of it)."""
        shown = "".join(self.text.get(choice, ()))
        return text[len(shown) :] if text.startswith(shown) else ""


class EventStreamResponse(Response):
    """`text/event-stream` of one call: the chunks of its events, then `data: [DONE]`.

    `on_first_token` gets the seconds from `started` (the request received, `time.perf_counter`) to the
    first chunk written; the outcome handed to `on_end` has them as `first_token_ms`."""

    media_type = "text/event-stream"

    def __init__(
        self,
        call: Call,
        first: Item,
        renderer: Renderer,
        include_usage: bool,
        headers: dict[str, str],
        on_end: Callable[[dict[str, Any]], None],
        started: float,
        on_first_token: Callable[[float], None],
    ):
        self.status_code = 200
        self.background = None
        self.call, self.first, self.renderer = call, first, renderer
        self.include_usage = include_usage
        self.on_end = on_end
        self.started = started
        self.on_first_token = on_first_token
        self.init_headers({"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **headers})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        call, renderer, streamed = self.call, self.renderer, Streamed()
        outcome: dict[str, Any] = {"stream": True}
        gone = False
        try:
            await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
            out: list[bytes] = [sse(d) for d in renderer.opening()]
            item: Item | None = self.first
            ended = False
            first_write = True
            while True:
                while item is not None and not ended:
                    ended = self._render(item, streamed, out, outcome)
                    item = None if ended else call.next_nowait()
                if outcome.get("disconnected"):
                    gone = True
                    break
                if out:
                    await send({"type": "http.response.body", "body": b"".join(out), "more_body": True})
                    out = []
                    if first_write:
                        first_write = False
                        seconds = time.perf_counter() - self.started
                        outcome["first_token_ms"] = round(seconds * 1000, 3)
                        self.on_first_token(seconds)
                if ended:
                    break
                item = await call.next()
        except (OSError, ClientDisconnect):
            gone = True
            outcome["disconnected"] = True
        finally:
            await call.finish()
            outcome["cancelled"] = call.cancelled
            outcome["completion_chars"] = streamed.chars
            self.on_end(outcome)
        if not gone:
            with contextlib.suppress(OSError, ClientDisconnect):
                await send({"type": "http.response.body", "body": b"", "more_body": False})

    def _render(self, item: Item, streamed: Streamed, out: list[bytes], outcome: dict[str, Any]) -> bool:
        """Append the chunks of one item to `out`; True when the stream ends with it."""
        renderer = self.renderer
        if isinstance(item, TokenEvent):
            if item.logprobs is None and item.choice == 0:
                text = streamed.token(item)
                if text is not None:
                    out.append(sse(renderer.content(text)))
            else:
                # Logprobs are shown with their tokens, whose text may still be held back (empty).
                offset = streamed.shown(item.choice)
                if streamed.accept(item) and (item.text or item.logprobs):
                    out.append(sse(renderer.piece(item.text, item.choice, item.logprobs, offset)))
            return False
        if isinstance(item, DoneEvent):
            for choice in choices_of(item):
                rest = streamed.rest(choice.text, choice.index)
                if rest:
                    out.append(sse(renderer.piece(rest, choice.index, None, streamed.shown(choice.index))))
                out.append(sse(renderer.finish(choice.finish_reason, choice.index)))
            if self.include_usage:
                out.append(sse(renderer.usage(item.usage)))
            out.append(DONE)
            outcome.update(done_fields(item))
            return True
        if item is Interrupt.DISCONNECTED:
            outcome["disconnected"] = True
            return True
        error = error_of(item, self.call)
        out.append(sse(_json(error.body())))
        outcome.update(status_after_start=error.status, error=error.code)
        return True


def done_fields(done: DoneEvent) -> dict[str, Any]:
    """What `gateway_request_done` logs of a final reply."""
    return {
        "finish_reason": done.finish_reason,
        "prompt_tokens": done.usage.prompt_tokens,
        "completion_tokens": done.usage.completion_tokens,
        "worker": done.timings.worker,
        "queue_ms": done.timings.queue_ms,
        "ttft_ms": done.timings.ttft_ms,
    }


def _json(body: dict[str, Any]) -> str:
    return json.dumps(body, separators=(",", ":"))
