"""Locust load test over HTTP: the W1 chat users of `locustfile.py`, through the OpenAI-compatible gateway.

    python -m producer.gateway --port 8000 &          # plus workers behind it
    locust -f loadtest/locustfile_openai.py --host http://127.0.0.1:8000 --headless -u 5 -r 5 -t 15s

Each task sends one `POST /v1/chat/completions` of the same workload as the Redis users (the same
options: `--seed`, `--system-tokens`, `--max-tokens-min/max`, `--llm-stream`, ...) and reports one
Locust request, `chat` (type `http`): request sent to `data: [DONE]` (or to the JSON body with
`--llm-stream false`); its response length is the number of completion tokens. So Locust's request
count, RPS and failure ratio count chats, as over Redis, and nothing else.

The rest are latency samples, not requests, in the same table as the Redis users' (`LATENCIES`:
`<--csv prefix>_latency.csv` and the end of the `--html` report), type `http`:

- `ttft`: request sent to the first content chunk of the server-sent events;
- `tpot`: mean time per output token after the first (replies of 2+ tokens; `usage` comes in the
  last chunk, `stream_options.include_usage`);
- `chat_http`: the HTTP exchange as Locust times it, request sent to the response's status line
  and headers when streaming (the whole body with `--llm-stream false`), 2xx responses only;
- `models`: the `GET /v1/models` that looks up the model to ask for (once per user).

A non-2xx answer fails `chat` with the OpenAI error's `code` (or `type`, else `http_<status>`) as
the failure, so Locust's failure table counts codes; so does an error chunk in the stream. A chat
that could not be sent or read fails with what stopped it: the connection's error (`ConnectionError`,
`ReadTimeout`...), `no_done` (the stream ended without `[DONE]`), `bad_response` (a body or chunk
that is not the OpenAI shape). `--api-key` (`LOADTEST_API_KEY`) is sent as `Authorization: Bearer`;
`--llm-model` (`LOADTEST_LLM_MODEL`) names the model, by default the first one `GET /v1/models`
lists, looked up when the user starts and again before each chat until one is found (a chat
that finds none fails with the lookup's error, or `no_model`).
"""

from __future__ import annotations

import json
import time
from typing import Any

from locust import HttpUser, between, events, task
from locust.clients import HttpSession
from locust.env import Environment
from locust.event import EventHook
from locustfile import LATENCIES, ChatSlot, ServiceError  # the same workload, its options and reports


@events.init_command_line_parser.add_listener
def _add_options(parser: Any) -> None:
    group = parser.add_argument_group("OpenAI-compatible gateway")
    group.add_argument(
        "--api-key",
        default="",
        env_var="LOADTEST_API_KEY",
        help="Bearer key of the gateway (LOADTEST_API_KEY; empty: none).",
    )
    group.add_argument(
        "--llm-model",
        default="",
        env_var="LOADTEST_LLM_MODEL",
        help="Model to request (LOADTEST_LLM_MODEL; empty: the first of GET /v1/models).",
    )


def _ok(response: Any) -> bool:
    """A 2xx answer (`Response.ok` raises, not answers, when no response came: status 0)."""
    return 200 <= int(response.status_code or 0) < 300


def _failure(response: Any) -> ServiceError:
    """A non-2xx answer (or none: status 0, the connection's error) named by its stable code."""
    error = getattr(response, "error", None)
    if not response.status_code and error is not None:
        return ServiceError(type(error).__name__)
    try:
        body = response.json()["error"]
        return ServiceError(str(body.get("code") or body.get("type") or f"http_{response.status_code}"))
    except (ValueError, KeyError, TypeError, AttributeError):
        return ServiceError(f"http_{response.status_code}")


class OpenAIChatUser(ChatSlot, HttpUser):
    """One chatbot conversation slot over HTTP: send a chat completion, read it, think, repeat."""

    wait_time = between(0.1, 1.0)
    request_type = "http"

    def __init__(self, environment: Environment):
        super().__init__(environment)
        options = self.join_workload(environment)
        self.headers = {"Authorization": f"Bearer {options.api_key}"} if options.api_key else {}
        self.model: str = options.llm_model
        # Locust reports every HTTP exchange of `self.client` as a request; here they are samples of the
        # latency table, so the request table holds the chats only.
        exchanges = EventHook()
        exchanges.add_listener(self._exchange)
        self.client = HttpSession(
            base_url=self.host, request_event=exchanges, user=self, pool_manager=self.pool_manager
        )
        self.client.trust_env = False

    def _exchange(
        self, name: str, response_time: float, response_length: int, exception: Any, **_: Any
    ) -> None:
        if exception is None:
            LATENCIES.log_request(self.request_type, name, round(response_time), response_length)

    def on_start(self) -> None:
        self._find_model()

    def _find_model(self) -> ServiceError | None:
        """The first model `GET /v1/models` lists, unless one is set; why there is none, else None."""
        if self.model:
            return None
        response = self.client.get("/v1/models", headers=self.headers, name="models", timeout=self.timeout_s)
        if not _ok(response):
            return _failure(response)
        try:
            models = response.json()["data"]
            self.model = str(models[0]["id"]) if models else ""
        except (ValueError, KeyError, TypeError, IndexError):
            return ServiceError("bad_response")
        return None if self.model else ServiceError("no_model")

    @task
    def chat(self) -> None:
        body = self.workload.next_request()  # drawn first: a failed lookup does not shift the sequence
        start = time.perf_counter()
        missing = self._find_model()
        if missing is not None:
            self._fire("chat", (time.perf_counter() - start) * 1000, exception=missing)
            return
        body["model"] = self.model
        if self.stream:
            body["stream_options"] = {"include_usage": True}
        try:
            outcome = self._send(body, start)
        except OSError as exc:  # the connection reset or timed out while the body was read
            outcome = ServiceError(type(exc).__name__)
        except (ValueError, KeyError, TypeError, IndexError, AttributeError):  # not the OpenAI shape
            outcome = ServiceError("bad_response")
        if isinstance(outcome, ServiceError):
            self._fire("chat", (time.perf_counter() - start) * 1000, exception=outcome)
            return
        first_token_at, tokens = outcome
        self._fire_done(start, first_token_at, tokens)

    def _send(self, body: dict[str, Any], start: float) -> ServiceError | tuple[float | None, int]:
        """One chat completion, read to its end: (first content chunk's time, completion tokens), or why
        it failed. Fires `ttft` on the first content chunk."""
        response = self.client.post(
            "/v1/chat/completions", json=body, headers=self.headers, stream=self.stream,
            timeout=self.timeout_s, name="chat_http",
        )  # fmt: skip
        try:
            if not _ok(response):
                return _failure(response)
            if not self.stream:
                return None, int(response.json()["usage"]["completion_tokens"])
            first_token_at: float | None = None
            tokens = 0
            for line in response.iter_lines():
                if not line.startswith(b"data: "):
                    continue
                data = line[len(b"data: ") :]
                if data == b"[DONE]":
                    return first_token_at, tokens
                chunk = json.loads(data)
                if "error" in chunk:
                    error = chunk["error"]
                    return ServiceError(str(error.get("code") or error.get("type") or "error"))
                if chunk.get("usage"):
                    tokens = int(chunk["usage"]["completion_tokens"])
                content = chunk["choices"][0]["delta"].get("content") if chunk.get("choices") else None
                if content and first_token_at is None:
                    first_token_at = time.perf_counter()
                    self._fire("ttft", (first_token_at - start) * 1000)
            return ServiceError("no_done")
        finally:
            if response.raw is not None:  # None: no response came (status 0)
                response.close()
