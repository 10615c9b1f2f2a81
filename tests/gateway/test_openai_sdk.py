"""The official `openai` package (sync and async, streaming and not) and curl against a real gateway,
in front of a real echo worker (it answers with the words of the last user message, one per token)."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess

import httpx
import openai
import pytest
from conftest import Deployment
from gateway_process import GatewayProcess

from producer.client import AsyncChatClient, ChatClient
from producer.messages import MessageError, normalize_messages

pytestmark = pytest.mark.timeout(120)


def ask(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


@pytest.fixture(scope="module")
def gw(echo_deployment: Deployment) -> GatewayProcess:
    return echo_deployment.gateway


@pytest.fixture(scope="module")
def client(gw: GatewayProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.v1, api_key="unused", max_retries=0)


def test_chat_answers_with_usage_and_finish_reasons(client: openai.OpenAI) -> None:
    text = "the quick brown fox"
    r = client.chat.completions.create(model="echo", messages=ask(text))
    assert r.object == "chat.completion" and r.model == "echo" and r.id.startswith("chatcmpl-")
    choice = r.choices[0]
    assert (choice.index, choice.message.role, choice.message.content) == (0, "assistant", text)
    assert choice.finish_reason == "stop"
    assert r.usage is not None
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(text.encode()), 4)
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert r.usage.prompt_tokens_details is not None and r.usage.prompt_tokens_details.cached_tokens == 0

    short = client.chat.completions.create(model="echo", messages=ask(text), max_tokens=2)
    assert (short.choices[0].message.content, short.choices[0].finish_reason) == ("the quick", "length")
    newer = client.chat.completions.create(model="echo", messages=ask(text), max_completion_tokens=3)
    assert (newer.choices[0].message.content, newer.choices[0].finish_reason) == ("the quick brown", "length")
    assert newer.usage is not None and newer.usage.completion_tokens == 3


def test_streamed_chunks_role_first_finish_reason_last_then_usage(client: openai.OpenAI) -> None:
    text = "one two three four five"
    chunks = list(
        client.chat.completions.create(
            model="echo", messages=ask(text), stream=True, stream_options={"include_usage": True}
        )
    )
    assert {c.object for c in chunks} == {"chat.completion.chunk"}
    assert len({c.id for c in chunks}) == 1 and chunks[0].id.startswith("chatcmpl-")
    assert chunks[0].choices[0].delta.role == "assistant"
    *content, finish, usage = chunks
    assert "".join(c.choices[0].delta.content or "" for c in content) == text
    assert all(c.choices[0].finish_reason is None for c in content)
    assert all(c.choices[0].delta.role is None for c in content[1:])
    assert finish.choices[0].finish_reason == "stop" and not finish.choices[0].delta.content
    assert usage.choices == [] and usage.usage is not None
    assert (usage.usage.prompt_tokens, usage.usage.completion_tokens) == (len(text.encode()), 5)

    plain = list(client.chat.completions.create(model="echo", messages=ask(text), stream=True, max_tokens=2))
    assert plain[-1].choices[0].finish_reason == "length"
    assert "".join(c.choices[0].delta.content or "" for c in plain) == "one two"
    assert all(c.usage is None for c in plain)


def test_stop_strings_end_the_answer_before_them(client: openai.OpenAI) -> None:
    text = "alpha beta gamma delta"
    one = client.chat.completions.create(model="echo", messages=ask(text), stop="gamma")
    assert one.choices[0].finish_reason == "stop"
    assert one.choices[0].message.content.rstrip() == "alpha beta"
    several = client.chat.completions.create(model="echo", messages=ask(text), stop=["delta", "beta"])
    assert several.choices[0].message.content.rstrip() == "alpha"
    streamed = client.chat.completions.create(model="echo", messages=ask(text), stop=["gamma"], stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == one.choices[0].message.content


def test_async_client_streams_and_answers(gw: GatewayProcess) -> None:
    async def main() -> tuple[str, str, list[str | None]]:
        async with openai.AsyncOpenAI(base_url=gw.v1, api_key="unused", max_retries=0) as client:
            whole, stream = await asyncio.gather(
                client.chat.completions.create(model="echo", messages=ask("red green blue")),
                client.chat.completions.create(model="echo", messages=ask("cyan magenta"), stream=True),
            )
            texts, reasons = [], []
            async for chunk in stream:
                texts.append(chunk.choices[0].delta.content or "")
                reasons.append(chunk.choices[0].finish_reason)
            return whole.choices[0].message.content or "", "".join(texts), reasons

    whole, streamed, reasons = asyncio.run(main())
    assert (whole, streamed) == ("red green blue", "cyan magenta")
    assert reasons[-1] == "stop"


def test_openai_message_shapes_are_accepted(client: openai.OpenAI) -> None:
    messages = [
        {"role": "developer", "content": "Answer briefly."},
        {"role": "system", "content": [{"type": "text", "text": "Be kind."}]},
        {"role": "user", "name": "ann", "content": [{"type": "text", "text": "first"},
                                                     {"type": "text", "text": "second"}]},
    ]  # fmt: skip
    r = client.chat.completions.create(model="echo", messages=messages)  # type: ignore[arg-type]
    wire = normalize_messages(messages)
    assert [m["role"] for m in wire] == ["system", "system", "user"]
    assert r.choices[0].message.content == " ".join(wire[-1]["content"].split())


def test_a_conversation_sends_the_previous_reply_back(client: openai.OpenAI) -> None:
    first = client.chat.completions.create(model="echo", messages=ask("hello again"))
    history = [*ask("hello again"), first.choices[0].message, *ask("and once more")]
    second = client.chat.completions.create(model="echo", messages=history)  # type: ignore[arg-type]
    assert second.choices[0].message.content == "and once more"


def test_the_client_library_takes_the_same_shapes(echo_deployment: Deployment) -> None:
    messages = [
        {"role": "developer", "content": "Answer briefly."},
        {"role": "user", "name": "ann", "content": [{"type": "text", "text": "parts"},
                                                     {"type": "text", "text": "too"}]},
    ]  # fmt: skip
    expected = " ".join(normalize_messages(messages)[-1]["content"].split())
    redis_url, prefix = echo_deployment.redis_url, echo_deployment.prefix
    with ChatClient(redis_url, prefix=prefix, timeout_s=30) as sync_client:
        assert sync_client.chat(messages).text == expected

    async def main() -> str:
        async with AsyncChatClient(
            echo_deployment.redis_url, prefix=echo_deployment.prefix, timeout_s=30
        ) as c:
            return (await c.chat(messages)).text

    assert asyncio.run(main()) == expected
    with ChatClient(echo_deployment.redis_url, prefix=echo_deployment.prefix) as sync_client:
        with pytest.raises(MessageError) as refused:  # a ValueError naming the place, not pydantic's
            sync_client.submit(
                [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]
            )
        assert refused.value.param.startswith("messages[0].content")


def test_ids_and_x_request_id(client: openai.OpenAI, gw: GatewayProcess) -> None:
    raw = client.chat.completions.with_raw_response.create(
        model="echo", messages=ask("hi"), extra_headers={"X-Request-Id": "my-req.1:a_b"}
    )
    assert raw.headers["x-request-id"] == "my-req.1:a_b"
    assert raw.parse().id == "chatcmpl-my-req.1:a_b"
    generated = client.chat.completions.with_raw_response.create(model="echo", messages=ask("hi"))
    rid = generated.headers["x-request-id"]
    assert len(rid) == 32 and generated.parse().id == f"chatcmpl-{rid}"
    body = {"model": "echo", "messages": ask("hi")}
    bad = httpx.post(f"{gw.v1}/chat/completions", json=body, headers={"X-Request-Id": "no spaces!"})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "X-Request-Id"
    done = [e for e in gw.events("gateway_request_done") if e["request_id"] == "my-req.1:a_b"]
    assert done and done[0]["status"] == 200 and done[0]["finish_reason"] == "stop"
    # The gateway's own timings: the request on the wire, then its first reply event, then the answer.
    assert 0 < done[0]["sent_ms"] <= done[0]["first_event_ms"] <= done[0]["ms"]


def test_completions_endpoint(client: openai.OpenAI) -> None:
    r = client.completions.create(model="echo", prompt="x y z")
    assert r.object == "text_completion" and r.id.startswith("cmpl-")
    assert (r.choices[0].text, r.choices[0].finish_reason) == ("x y z", "stop")
    assert r.usage is not None and r.usage.completion_tokens == 3
    words = " ".join(f"w{i}" for i in range(20))
    default = client.completions.create(model="echo", prompt=words)  # OpenAI's default max_tokens: 16
    assert default.choices[0].finish_reason == "length" and len(default.choices[0].text.split()) == 16
    chunks = list(
        client.completions.create(
            model="echo", prompt=["a b c"], stream=True, stream_options={"include_usage": True}, max_tokens=2
        )
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == "a b"
    assert chunks[-2].choices[0].finish_reason == "length"
    assert (
        chunks[-1].choices == [] and chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 2
    )


def test_models_list_and_unknown_model(client: openai.OpenAI) -> None:
    models = client.models.list()
    assert "echo" in [m.id for m in models.data]
    assert client.models.retrieve("echo").owned_by == "llm-stream-serve"
    with pytest.raises(openai.NotFoundError) as missing:
        client.models.retrieve("gpt-none")
    assert missing.value.code == "model_not_found"
    with pytest.raises(openai.NotFoundError) as chat_missing:
        client.chat.completions.create(model="gpt-none", messages=ask("hi"))
    assert (chat_missing.value.code, chat_missing.value.param) == ("model_not_found", "model")


def test_health_and_ready(gw: GatewayProcess) -> None:
    assert httpx.get(f"{gw.url}/health").json() == {"status": "ok"}
    ready = httpx.get(f"{gw.url}/ready")
    assert ready.status_code == 200
    assert (
        ready.json()["status"] == "ready"
        and ready.json()["workers"] >= 1
        and "echo" in ready.json()["models"]
    )


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_curl_shows_server_sent_events(gw: GatewayProcess) -> None:
    body = json.dumps({"model": "echo", "messages": ask("curl sees chunks"), "stream": True})
    out = subprocess.run(
        ["curl", "-sN", f"{gw.v1}/chat/completions", "-H", "Content-Type: application/json", "-d", body],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout
    events = [line for line in out.split("\n\n") if line]
    assert all(e.startswith("data: ") for e in events), out
    assert events[-1] == "data: [DONE]"
    chunks = [json.loads(e[len("data: ") :]) for e in events[:-1]]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == "curl sees chunks"
    assert chunks[-1]["choices"][0] == {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}
