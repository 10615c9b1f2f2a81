"""The gateway in front of the default model (SmolLM2-135M-Instruct, paged engine): real answers, and
seeded sampling that repeats itself. Few, short requests (max_tokens <= 16): the model runs on CPU here."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import openai
import pytest
from gateway_process import GatewayProcess, start_worker

pytestmark = [pytest.mark.model, pytest.mark.timeout(900)]

MODEL = "SmolLM2-135M-Instruct"
CAPITAL = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def client(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[openai.OpenAI]:
    prefix = f"gwm{uuid.uuid4().hex[:8]}"
    logs = tmp_path_factory.mktemp("model")
    worker = start_worker(redis_url, prefix, logs, engine="paged", max_wait_ms=0)
    try:
        with GatewayProcess(redis_url, prefix, logs, LLM_GATEWAY_DEFAULT_MODEL=MODEL) as gateway:
            gateway.wait_model(MODEL)
            yield openai.OpenAI(base_url=gateway.v1, api_key="unused", max_retries=0, timeout=600)
    finally:
        worker.stop()


def test_the_model_answers_through_the_gateway(client: openai.OpenAI) -> None:
    assert MODEL in [m.id for m in client.models.list().data]
    reply = client.chat.completions.create(model=MODEL, messages=CAPITAL, max_tokens=16, temperature=0)
    assert "Paris" in (reply.choices[0].message.content or "")
    assert reply.usage is not None and reply.usage.prompt_tokens > 5
    streamed = client.chat.completions.create(
        model=MODEL, messages=CAPITAL, max_tokens=16, temperature=0, stream=True
    )
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == reply.choices[0].message.content


def test_a_seed_makes_sampling_repeat(client: openai.OpenAI) -> None:
    ask = [{"role": "user", "content": "Tell me a word."}]

    def sample() -> str:
        reply = client.chat.completions.create(
            model=MODEL, messages=ask, max_tokens=12, temperature=1.0, seed=1234
        )
        return reply.choices[0].message.content or ""

    first = sample()
    assert first and sample() == first


def test_a_json_schema_reply_always_validates_and_logprobs_come_back(client: openai.OpenAI) -> None:
    import json

    import jsonschema

    schema = {
        "type": "object",
        "properties": {"city": {"type": "string", "maxLength": 20}, "country": {"enum": ["France", "Spain"]}},
        "required": ["city", "country"],
        "additionalProperties": False,
    }
    response_format = {"type": "json_schema", "json_schema": {"name": "place", "schema": schema}}
    for temperature in (0.0, 1.0):
        reply = client.chat.completions.create(
            model=MODEL, messages=CAPITAL, max_tokens=40, temperature=temperature, seed=3,
            response_format=response_format,  # type: ignore[arg-type]
        )  # fmt: skip
        assert reply.choices[0].finish_reason == "stop"
        jsonschema.validate(json.loads(reply.choices[0].message.content or ""), schema)
    scored = client.chat.completions.create(
        model=MODEL, messages=CAPITAL, max_tokens=6, temperature=0, logprobs=True, top_logprobs=3
    )
    content = scored.choices[0].logprobs.content if scored.choices[0].logprobs else None
    assert content and len(content) == scored.usage.completion_tokens  # type: ignore[union-attr]
    assert "".join(t.token for t in content) == scored.choices[0].message.content
    for token in content:
        assert token.logprob <= 0 and len(token.top_logprobs) == 3
        assert token.top_logprobs[0].token == token.token  # greedy: the most likely one
    unique = {"type": "array", "uniqueItems": True}  # a keyword the grammar engine cannot enforce
    bad = {"type": "json_schema", "json_schema": {"name": "x", "schema": unique}}
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(
            model=MODEL, messages=CAPITAL, max_tokens=4, response_format=bad  # type: ignore[arg-type]
        )
    assert refused.value.param == "response_format" and "uniqueItems" in str(refused.value)


def test_n_choices_come_back_together_and_repeat_with_a_seed(client: openai.OpenAI) -> None:
    ask = [{"role": "user", "content": "Tell me a word."}]

    def sample() -> list[str]:
        reply = client.chat.completions.create(
            model=MODEL, messages=ask, max_tokens=8, temperature=1.0, seed=5, n=3  # type: ignore[arg-type]
        )
        assert [c.index for c in reply.choices] == [0, 1, 2]
        assert reply.usage is not None and reply.usage.completion_tokens >= 3  # every choice's tokens
        return [c.message.content or "" for c in reply.choices]

    first = sample()
    assert all(first) and len(set(first)) > 1  # each choice its own seed
    assert sample() == first
    streamed = client.chat.completions.create(
        model=MODEL, messages=ask, max_tokens=8, temperature=1.0, seed=5, n=3,  # type: ignore[arg-type]
        stream=True,
    )
    texts = ["", "", ""]
    for chunk in streamed:
        for c in chunk.choices:
            texts[c.index] += c.delta.content or ""
    assert texts == first
