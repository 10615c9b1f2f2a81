"""Every refusal is an OpenAI error body with the right status, and hostile bodies do not hurt the gateway.

Against the shared echo deployment (its worker refuses prompts over `MAX_PROMPT_TOKENS`), plus a
gateway on a prefix no worker serves, with a backlog limit, for the timeout (504) and overload (429)
paths.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import redis
from conftest import MAX_PROMPT_TOKENS, Deployment
from gateway_process import GatewayProcess

from producer.wire.codec import decode_event
from producer.wire.models import ErrorCode, ErrorEvent

pytestmark = pytest.mark.timeout(120)

ERROR_KEYS = {"message", "type", "param", "code"}


def ask(text: str = "hi") -> list[dict]:
    return [{"role": "user", "content": text}]


def chat(**fields: Any) -> dict:
    return {"model": "echo", "messages": ask(), **fields}


@pytest.fixture(scope="module")
def gw(echo_deployment: Deployment) -> GatewayProcess:
    return echo_deployment.gateway


def check_error(response: httpx.Response, status: int, code: str, param: str | None = None) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == ERROR_KEYS, body
    error = body["error"]
    assert error["code"] == code, error
    assert error["param"] == param, error
    assert isinstance(error["message"], str) and error["message"] and "Traceback" not in response.text
    assert error["type"] in ("invalid_request_error", "rate_limit_error", "timeout_error", "api_error")
    return error


def post(gw: GatewayProcess, body: Any, path: str = "/chat/completions", **kwargs: Any) -> httpx.Response:
    if isinstance(body, (bytes, Iterator)):
        return httpx.post(f"{gw.v1}{path}", content=body, timeout=30, **kwargs)
    return httpx.post(f"{gw.v1}{path}", json=body, timeout=30, **kwargs)


INVALID = [
    ({"model": "echo"}, "messages", "missing_required_parameter"),
    ({"messages": ask()}, "model", "missing_required_parameter"),
    (chat(messages="hi"), "messages", "invalid_type"),
    (chat(messages=[]), "messages", "invalid_value"),
    (chat(bogus=1), "bogus", "unknown_parameter"),
    (chat(stream_options={"include_usage": True, "extra": 1}, stream=True), "stream_options.extra",
     "unknown_parameter"),
    # The sampling extras reach the worker, whose echo engine honours none of them: refused by name.
    (chat(n=2), "n", "invalid_request"),
    (chat(logprobs=True), "logprobs", "invalid_request"),
    (chat(logprobs=True, top_logprobs=3), "logprobs", "invalid_request"),
    (chat(presence_penalty=0.5), "presence_penalty", "invalid_request"),
    (chat(frequency_penalty=1), "frequency_penalty", "invalid_request"),
    (chat(logit_bias={"42": 5}), "logit_bias", "invalid_request"),
    (chat(response_format={"type": "json_object"}), "response_format", "invalid_request"),
    (chat(repetition_penalty=1.2), "repetition_penalty", "invalid_request"),
    (chat(min_tokens=2), "min_tokens", "invalid_request"),
    (chat(stop_token_ids=[7]), "stop_token_ids", "invalid_request"),
    # ... after the wire's limits, checked by the gateway.
    (chat(top_logprobs=3), "top_logprobs", "invalid_value"),
    (chat(logprobs=True, top_logprobs=21), "top_logprobs", "invalid_value"),
    (chat(logprobs="yes"), "logprobs", "invalid_type"),
    (chat(n=9), "n", "invalid_value"),
    (chat(n=0), "n", "invalid_value"),
    (chat(presence_penalty=2.5), "presence_penalty", "invalid_value"),
    (chat(frequency_penalty=-3), "frequency_penalty", "invalid_value"),
    (chat(repetition_penalty=0), "repetition_penalty", "invalid_value"),
    (chat(logit_bias={"x": 5}), "logit_bias.x", "invalid_value"),
    (chat(logit_bias={"42": 101}), "logit_bias.42", "invalid_value"),
    (chat(logit_bias={"42": "5"}), "logit_bias.42", "invalid_type"),
    (chat(min_tokens=9, max_tokens=8), "min_tokens", "invalid_value"),
    (chat(stop_token_ids=[-1]), "stop_token_ids[0]", "invalid_value"),
    (chat(ignore_eos="no"), "ignore_eos", "invalid_type"),
    (chat(response_format={"type": "xml"}), "response_format.type", "invalid_value"),
    (chat(response_format={"type": "json_schema"}), "response_format", "invalid_value"),
    (chat(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {}, "extra": 1}}),
     "response_format.json_schema.extra", "unknown_parameter"),
    (chat(tools=[{"type": "function", "function": {"name": "f"}}]), "tools", "unsupported_parameter"),
    (chat(tool_choice="auto"), "tool_choice", "unsupported_parameter"),
    (chat(max_tokens="5"), "max_tokens", "invalid_type"),
    (chat(max_tokens=True), "max_tokens", "invalid_type"),
    (chat(max_tokens=0), "max_tokens", "invalid_value"),
    (chat(max_tokens=10**6), "max_tokens", "invalid_value"),
    (chat(max_completion_tokens=10**6), "max_completion_tokens", "invalid_value"),
    (chat(max_tokens=5, max_completion_tokens=6), "max_tokens", "invalid_value"),
    (chat(temperature=3), "temperature", "invalid_value"),
    (chat(temperature="hot"), "temperature", "invalid_type"),
    (chat(top_p=0), "top_p", "invalid_value"),
    (chat(top_k=-1), "top_k", "invalid_value"),
    (chat(seed=-1), "seed", "invalid_value"),
    (chat(seed=2**70), "seed", "invalid_value"),
    (chat(stop=[f"s{i}" for i in range(9)]), "stop", "invalid_value"),
    (chat(stop=""), "stop[0]", "invalid_value"),
    (chat(stream="yes"), "stream", "invalid_type"),
    (chat(stream_options={"include_usage": True}), "stream_options", "invalid_value"),
    (chat(priority="urgent"), "priority", "invalid_value"),
    (chat(timeout_ms=0), "timeout_ms", "invalid_value"),
    (chat(user=5), "user", "invalid_type"),
    (chat(messages=[{"role": "wizard", "content": "hi"}]), "messages[0].role", "invalid_value"),
    (chat(messages=[{"role": "user", "content": 5}]), "messages[0].content", "invalid_type"),
    (chat(messages=[{"content": "hi"}]), "messages[0].role", "missing_required_parameter"),
    (chat(messages=[{"role": "user", "content": "hi", "tool_call_id": "x"}]), "messages[0].tool_call_id",
     "unknown_parameter"),
    (chat(messages=[{"role": "tool", "content": "42"}]), "messages[0].role", "unsupported_parameter"),
    (chat(messages=[{"role": "assistant", "content": "", "tool_calls": [{"id": "c1"}]}, *ask()]),
     "messages[0].tool_calls", "unsupported_parameter"),
]  # fmt: skip


@pytest.mark.parametrize(("body", "param", "code"), INVALID, ids=[f"{p}-{c}" for _, p, c in INVALID])
def test_invalid_requests_get_400_naming_the_field(
    gw: GatewayProcess, body: dict, param: str, code: str
) -> None:
    check_error(post(gw, body), 400, code, param)


def test_non_text_content_parts_are_refused_by_name(gw: GatewayProcess) -> None:
    image = {"type": "image_url", "image_url": {"url": "https://example.invalid/cat.png"}}
    refused = post(gw, chat(messages=[{"role": "user", "content": [image]}]))
    error = check_error(refused, 400, "invalid_value", "messages[0].content[0]")
    assert "text" in error["message"]


COMPLETIONS_INVALID = [
    ({"model": "echo", "prompt": ["a", "b"]}, "prompt", "unsupported_parameter"),
    ({"model": "echo", "prompt": [1, 2, 3]}, "prompt", "invalid_type"),
    ({"model": "echo", "prompt": "a", "echo": True}, "echo", "unsupported_parameter"),
    ({"model": "echo", "prompt": "a", "best_of": 3}, "best_of", "unsupported_parameter"),
    ({"model": "echo", "prompt": "a", "suffix": "z"}, "suffix", "unsupported_parameter"),
    ({"model": "echo", "prompt": "a", "logprobs": 6}, "logprobs", "invalid_value"),
    ({"model": "echo", "prompt": "a", "logprobs": True}, "logprobs", "invalid_type"),
    ({"model": "echo", "prompt": "a", "logprobs": 2}, "logprobs", "invalid_request"),  # the worker's
    ({"model": "echo", "prompt": "a", "n": 2}, "n", "invalid_request"),
    ({"model": "echo", "prompt": ""}, "prompt", "invalid_value"),
    ({"model": "echo"}, "prompt", "missing_required_parameter"),
]


@pytest.mark.parametrize(
    ("body", "param", "code"), COMPLETIONS_INVALID, ids=[p for _, p, _ in COMPLETIONS_INVALID]
)
def test_invalid_completions_get_400(gw: GatewayProcess, body: dict, param: str, code: str) -> None:
    check_error(post(gw, body, "/completions"), 400, code, param)


def test_the_sdk_sees_the_error_fields(gw: GatewayProcess) -> None:
    client = openai.OpenAI(base_url=gw.v1, api_key="unused", max_retries=0)
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model="echo", messages=ask(), tools=[{"type": "function",
                                       "function": {"name": "f"}}])  # fmt: skip
    assert (refused.value.status_code, refused.value.code, refused.value.param) == (
        400,
        "unsupported_parameter",
        "tools",
    )


def test_a_prompt_over_the_workers_limit_is_context_length_exceeded(gw: GatewayProcess) -> None:
    long_text = "word " * (MAX_PROMPT_TOKENS // 4)
    check_error(post(gw, chat(messages=ask(long_text))), 400, "context_length_exceeded")
    # Streaming too: the status waits for the first event, so the refusal is still a 400, not a 200 stream.
    check_error(post(gw, chat(messages=ask(long_text), stream=True)), 400, "context_length_exceeded")
    check_error(
        post(gw, {"model": "echo", "prompt": long_text}, "/completions"), 400, "context_length_exceeded"
    )


HOSTILE: list[tuple[str, bytes, int, str]] = [
    ("malformed", b'{"model": "echo", "messages": [', 400, "invalid_json"),
    ("empty", b"", 400, "invalid_json"),
    ("array", b"[1, 2, 3]", 400, "invalid_type"),
    ("string", b'"hello"', 400, "invalid_type"),
    ("null", b"null", 400, "invalid_type"),
    ("deep_nesting", b"[" * 200_000 + b"]" * 200_000, 400, "invalid_json"),
    ("huge_integer", b'{"model": "echo", "messages": [], "max_tokens": 1' + b"0" * 5000 + b"}", 400,
     "invalid_json"),
    ("nan", b'{"model": "echo", "messages": [{"role": "user", "content": "x"}], "temperature": NaN}', 400,
     "invalid_json"),
    ("invalid_utf8", b'{"model": "echo", "messages": [{"role": "user", "content": "\xff\xfe\xfd"}]}', 400,
     "invalid_json"),
]  # fmt: skip


@pytest.mark.parametrize(("name", "raw", "status", "code"), HOSTILE, ids=[h[0] for h in HOSTILE])
def test_hostile_bodies_get_openai_errors(
    gw: GatewayProcess, name: str, raw: bytes, status: int, code: str
) -> None:
    check_error(post(gw, raw, headers={"Content-Type": "application/json"}), status, code)


def test_infinite_and_deeply_nested_values_are_refused(gw: GatewayProcess) -> None:
    inf_tokens = b'{"model": "echo", "messages": [{"role": "user", "content": "x"}], "max_tokens": 1e400}'
    check_error(post(gw, inf_tokens), 400, "invalid_type", "max_tokens")
    inf_temperature = (
        b'{"model": "echo", "messages": [{"role": "user", "content": "x"}], "temperature": -1e400}'
    )
    check_error(post(gw, inf_temperature), 400, "invalid_value", "temperature")
    nested: Any = "x"
    for _ in range(500):
        nested = [nested]
    body = chat(messages=[{"role": "user", "content": nested}])
    error = check_error(post(gw, body), 400, "invalid_value", "messages[0].content[0]")
    assert len(error["message"]) < 600


def test_a_10_mb_body_is_413_with_or_without_content_length(gw: GatewayProcess) -> None:
    big = b'{"model": "echo", "messages": [{"role": "user", "content": "' + b"a" * 10_000_000 + b'"}]}'
    check_error(post(gw, big), 413, "request_too_large")

    def chunked() -> Iterator[bytes]:
        for i in range(0, len(big), 65536):
            yield big[i : i + 65536]

    check_error(post(gw, chunked()), 413, "request_too_large")


def test_unknown_routes_and_methods_are_openai_errors(gw: GatewayProcess) -> None:
    check_error(httpx.get(f"{gw.v1}/engines"), 404, "not_found")
    check_error(httpx.get(f"{gw.v1}/chat/completions"), 405, "method_not_allowed")


def test_the_gateway_keeps_serving_after_all_that(gw: GatewayProcess) -> None:
    assert gw.proc.poll() is None
    r = post(gw, chat(messages=ask("still here")))
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == "still here"
    assert "Traceback" not in gw.output()
    assert not gw.events("gateway_request_failed")


@pytest.fixture(scope="module")
def unserved(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    """A gateway on a prefix no worker serves, admitting at most 2 waiting requests."""
    prefix = f"gwq{uuid.uuid4().hex[:8]}"
    logs: Path = tmp_path_factory.mktemp("unserved")
    with GatewayProcess(redis_url, prefix, logs, LLM_MAX_BACKLOG_REQUESTS="2") as gateway:
        gateway.prefix = prefix  # type: ignore[attr-defined]
        yield gateway


def test_no_answer_in_time_is_504_and_cancels_on_the_wire(unserved: GatewayProcess, redis_url: str) -> None:
    prefix = unserved.prefix  # type: ignore[attr-defined]
    admin = redis.Redis.from_url(redis_url)
    try:
        by_body = post(unserved, chat(timeout_ms=300), headers={"X-Request-Id": "late-body"})
        check_error(by_body, 504, "timeout")
        by_header = post(unserved, chat(), headers={"X-Request-Id": "late-header", "X-Timeout-Ms": "300"})
        check_error(by_header, 504, "timeout")
        for rid in ("late-body", "late-header"):
            # The client library's cancel: its own `cancelled` final under the guard, and the broadcast.
            final = decode_event(admin.xrange(f"{prefix}:reply:{rid}")[-1][1])
            assert isinstance(final, ErrorEvent) and final.code == ErrorCode.CANCELLED
            assert rid.encode() in [f[b"id"] for _, f in admin.xrange(f"{prefix}:cancel")]
        check_error(
            post(unserved, chat(), headers={"X-Timeout-Ms": "soon"}), 400, "invalid_value", "X-Timeout-Ms"
        )
    finally:
        admin.close()


def test_a_full_backlog_is_429_with_retry_after(unserved: GatewayProcess) -> None:
    for _ in range(2):  # fill the backlog to its limit (each request waits, then times out)
        post(unserved, chat(timeout_ms=100))
    refused = post(unserved, chat())
    error = check_error(refused, 429, "overloaded")
    assert error["type"] == "rate_limit_error"
    assert refused.headers["retry-after"] == "1"
    client = openai.OpenAI(base_url=unserved.v1, api_key="unused", max_retries=0)
    with pytest.raises(openai.RateLimitError):
        client.chat.completions.create(model="echo", messages=ask())


def test_without_live_workers_only_the_default_model_is_taken_and_not_ready(unserved: GatewayProcess) -> None:
    check_error(post(unserved, {"model": "other", "messages": ask()}), 404, "model_not_found", "model")
    assert httpx.get(f"{unserved.v1}/models").json() == {"object": "list", "data": []}
    not_ready = httpx.get(f"{unserved.url}/ready")
    check_error(not_ready, 503, "not_ready")
    assert not_ready.headers["retry-after"] == "1"
