"""Locust load test over HTTP: the W1 chat users of `locustfile.py`, through the OpenAI-compatible gateway.

    python -m producer.gateway --port 8000 &          # plus workers behind it
    locust -f loadtest/locustfile_openai.py --host http://127.0.0.1:8000 --headless -u 5 -r 5 -t 15s

Each task sends one `POST /v1/chat/completions` of the same workload as the Redis users (the same
options: `--seed`, `--system-tokens`, `--max-tokens-min/max`, `--llm-stream`, ...) and reports the
same three events, with request type `http`:

- `ttft`: request sent to the first content chunk of the server-sent events;
- `tpot`: mean time per output token after the first (replies of 2+ tokens; `usage` comes in the
  last chunk, `stream_options.include_usage`);
- `chat`: request sent to `data: [DONE]` (or to the JSON body with `--llm-stream false`); its
  response length is the number of completion tokens.

A non-2xx answer fails `chat` with the OpenAI error's `code` (or `type`, else the HTTP status) as the
failure, so Locust's failure table counts codes. `--api-key` (`LOADTEST_API_KEY`) is sent as
`Authorization: Bearer`; `--llm-model` (`LOADTEST_LLM_MODEL`) names the model, by default the first
one `GET /v1/models` lists.
"""

from __future__ import annotations

import json
import time
from typing import Any

from locust import HttpUser, between, events, task
from locust.env import Environment
from locustfile import ChatSlot, ServiceError  # the same workload, its options and reports


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


def _failure(response: Any) -> ServiceError:
    try:
        error = response.json()["error"]
        return ServiceError(str(error.get("code") or error.get("type") or response.status_code))
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
        self.model = options.llm_model

    def on_start(self) -> None:
        if not self.model:
            with self.client.get("/v1/models", headers=self.headers, name="models", catch_response=True) as r:
                models = r.json().get("data", []) if r.ok else []
                if not models:
                    r.failure(_failure(r) if not r.ok else ServiceError("no_model"))
                    self.model = "default"
                    return
                self.model = models[0]["id"]

    @task
    def chat(self) -> None:
        body = self.workload.next_request()
        body["model"] = self.model
        if self.stream:
            body["stream_options"] = {"include_usage": True}
        start = time.perf_counter()
        first_token_at: float | None = None
        tokens = 0
        try:
            with self.client.post(
                "/v1/chat/completions", json=body, headers=self.headers, stream=self.stream,
                timeout=self.timeout_s, catch_response=True, name="chat_http",
            ) as response:  # fmt: skip
                response.success()  # reported below as `chat`, with its code; keep Locust's own row quiet
                if not response.ok:
                    self._fire("chat", (time.perf_counter() - start) * 1000, exception=_failure(response))
                    return
                if not self.stream:
                    tokens = response.json()["usage"]["completion_tokens"]
                else:
                    done = False
                    for line in response.iter_lines():
                        if not line.startswith(b"data: "):
                            continue
                        data = line[len(b"data: ") :]
                        if data == b"[DONE]":
                            done = True
                            break
                        chunk = json.loads(data)
                        if "error" in chunk:
                            self._fire("chat", (time.perf_counter() - start) * 1000,
                                       exception=ServiceError(str(chunk["error"].get("code"))))  # fmt: skip
                            return
                        if chunk.get("usage"):
                            tokens = chunk["usage"]["completion_tokens"]
                        content = (
                            chunk["choices"][0]["delta"].get("content") if chunk.get("choices") else None
                        )
                        if content and first_token_at is None:
                            first_token_at = time.perf_counter()
                            self._fire("ttft", (first_token_at - start) * 1000)
                    if not done:
                        self._fire("chat", (time.perf_counter() - start) * 1000,
                                   exception=ServiceError("no_done"))  # fmt: skip
                        return
        except OSError as exc:  # connection refused or reset, read timeout
            self._fire(
                "chat", (time.perf_counter() - start) * 1000, exception=ServiceError(type(exc).__name__)
            )
            return
        self._fire_done(start, first_token_at, tokens)
