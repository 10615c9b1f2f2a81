"""The sampling extras through the gateway: the official `openai` package against a real gateway and echo
worker (whose engine honours none of them: each is a 400 naming it), and the OpenAI shapes of logprobs
and of several choices, rendered from wire events in process and parsed by the SDK's own types."""

from __future__ import annotations

import json
from typing import Any

import openai
import pytest
from conftest import Deployment
from openai.types import Completion
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from producer.gateway.calls import Call, EventStreamResponse, Streamed, error_of
from producer.gateway.openai_schema import ChatCompletionRequest, CompletionRequest
from producer.gateway.settings import GatewaySettings
from producer.gateway.translate import (
    ChatRenderer,
    CompletionRenderer,
    chat_params,
    completion_params,
    wire_names,
)
from producer.wire import models as wire
from producer.wire.models import ErrorCode

pytestmark = pytest.mark.timeout(120)


def ask(text: str = "hi") -> list[dict]:
    return [{"role": "user", "content": text}]


@pytest.fixture(scope="module")
def client(echo_deployment: Deployment) -> openai.OpenAI:
    return openai.OpenAI(base_url=echo_deployment.gateway.v1, api_key="unused", max_retries=0)


# -- against the echo worker -----------------------------------------------------------------------------

REFUSED_BY_THE_WORKER: list[tuple[dict[str, Any], str]] = [
    ({"n": 2}, "n"),
    ({"logprobs": True}, "logprobs"),
    ({"logprobs": True, "top_logprobs": 3}, "logprobs"),
    ({"presence_penalty": 0.5}, "presence_penalty"),
    ({"frequency_penalty": -0.5}, "frequency_penalty"),
    ({"logit_bias": {"104": 10}}, "logit_bias"),
    ({"response_format": {"type": "json_object"}}, "response_format"),
    (
        {
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": "a", "schema": {"type": "object"}},
            }
        },
        "response_format",
    ),
    ({"extra_body": {"repetition_penalty": 1.2}}, "repetition_penalty"),
    ({"extra_body": {"min_tokens": 1}}, "min_tokens"),
    ({"extra_body": {"stop_token_ids": [104]}}, "stop_token_ids"),
    ({"extra_body": {"response_format": {"type": "regex", "regex": "[a-z]+"}}}, "response_format"),
]


@pytest.mark.parametrize(
    ("fields", "param"), REFUSED_BY_THE_WORKER, ids=[p for _, p in REFUSED_BY_THE_WORKER]
)
@pytest.mark.parametrize("stream", [False, True])
def test_an_extra_no_engine_honours_yet_is_400_naming_it(
    client: openai.OpenAI, fields: dict[str, Any], param: str, stream: bool
) -> None:
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model="echo", messages=ask(), stream=stream, **fields)
    error = refused.value
    assert (error.status_code, error.code, error.param) == (400, "invalid_request", param)
    assert f"{param}: not supported by this worker's engine (echo)" in error.message


def test_completions_extras_are_400_naming_them(client: openai.OpenAI) -> None:
    for fields, param in [
        ({"logprobs": 2}, "logprobs"),
        ({"logprobs": 0}, "logprobs"),
        ({"n": 3}, "n"),
        ({"presence_penalty": 1}, "presence_penalty"),
    ]:
        with pytest.raises(openai.BadRequestError) as refused:
            client.completions.create(model="echo", prompt="hi there", **fields)  # type: ignore[call-overload]
        assert (refused.value.code, refused.value.param) == ("invalid_request", param)


def test_extras_at_their_neutral_values_are_served(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(
        model="echo",
        messages=ask("a b c"),
        n=1,
        logprobs=False,
        presence_penalty=0,
        frequency_penalty=0,
        logit_bias={},
        response_format={"type": "text"},
        extra_body={"ignore_eos": True, "min_tokens": 0},
    )
    assert r.choices[0].message.content == "a b c" and r.choices[0].logprobs is None
    c = client.completions.create(model="echo", prompt="x y", n=1, max_tokens=4)
    assert c.choices[0].text == "x y" and c.choices[0].logprobs is None


# -- mapping to the wire ---------------------------------------------------------------------------------


def test_the_extras_map_to_the_wire() -> None:
    settings = GatewaySettings()
    chat = ChatCompletionRequest.model_validate(
        {
            "model": "m",
            "messages": ask(),
            "n": 2,
            "logprobs": True,
            "top_logprobs": 3,
            "presence_penalty": 0.5,
            "frequency_penalty": -1,
            "logit_bias": {"42": -100},
            "response_format": {"type": "json_object"},
            "repetition_penalty": 1.1,
            "min_tokens": 2,
            "stop_token_ids": [7],
            "ignore_eos": True,
        }
    )
    params = chat_params(chat, settings)
    assert {k: params[k] for k in wire.REQUEST_EXTRAS} == {
        "n": 2,
        "logprobs": True,
        "top_logprobs": 3,
        "presence_penalty": 0.5,
        "frequency_penalty": -1,
        "logit_bias": {"42": -100},
        "response_format": {"type": "json_object"},
        "repetition_penalty": 1.1,
        "min_tokens": 2,
        "stop_token_ids": [7],
        "ignore_eos": True,
    }
    wire.ChatRequest.model_validate({"messages": ask(), **params})  # the wire takes them as they are
    neutral = ChatCompletionRequest.model_validate(
        {
            "model": "m",
            "messages": ask(),
            "logprobs": False,
            "response_format": {"type": "text"},
            "logit_bias": {},
        }
    )
    assert not set(chat_params(neutral, settings)) & set(wire.REQUEST_EXTRAS)
    legacy = CompletionRequest.model_validate({"model": "m", "prompt": "p", "logprobs": 0})
    assert (
        completion_params(legacy, settings)["logprobs"],
        completion_params(legacy, settings)["top_logprobs"],
    ) == (True, 0)


def test_a_worker_refusal_names_the_field_the_caller_used() -> None:
    legacy = CompletionRequest.model_validate({"model": "m", "prompt": "p", "logprobs": 3})
    call = Call.__new__(Call)
    call.retry_after_s, call.names = 1, wire_names(legacy)
    refusal = wire.ErrorEvent(
        id="r", code=ErrorCode.INVALID_REQUEST, message="top_logprobs: no", param="top_logprobs"
    )
    error = error_of(refusal, call)
    assert (error.status, error.code, error.param) == (400, "invalid_request", "logprobs")
    plain = wire.ErrorEvent(id="r", code=ErrorCode.TOO_LONG, message="long")
    assert error_of(plain, call).param is None


# -- the OpenAI shapes -----------------------------------------------------------------------------------


def lp(token_id: int, logprob: float, token: str | None = None) -> wire.Logprob:
    top = [
        wire.TopLogprob(token_id=token_id, token=token, logprob=logprob),
        wire.TopLogprob(token_id=token_id + 1, logprob=logprob - 1),
    ]
    return wire.Logprob(token_id=token_id, token=token, logprob=logprob, top=top)


def done(
    choices: list[wire.Choice] | None = None, logprobs: list[wire.Logprob] | None = None
) -> wire.DoneEvent:
    first = choices[0] if choices else None
    return wire.DoneEvent(
        id="r1",
        text=first.text if first else "hi",
        finish_reason="stop",
        usage=wire.Usage(prompt_tokens=3, completion_tokens=4),
        attempt="w:1",
        logprobs=logprobs,
        timings=wire.Timings(queue_ms=1, ttft_ms=1, tpot_ms=1, total_ms=2, worker="w"),
        choices=choices,
    )


def test_chat_logprobs_in_openai_shape() -> None:
    body = ChatRenderer("r1", "m").whole(done(logprobs=[lp(104, -0.5, "h"), lp(105, -0.25)]))
    parsed = ChatCompletion.model_validate_json(body)
    content = parsed.choices[0].logprobs.content  # type: ignore[union-attr]
    assert content is not None and [c.token for c in content] == ["h", "token_id:105"]
    assert (content[0].logprob, content[0].bytes) == (-0.5, [104])
    assert content[1].bytes is None
    assert [(t.token, t.logprob) for t in content[0].top_logprobs] == [("h", -0.5), ("token_id:105", -1.5)]
    assert json.loads(body)["choices"][0]["logprobs"]["refusal"] is None
    assert json.loads(ChatRenderer("r1", "m").whole(done()))["choices"][0]["logprobs"] is None


def test_completion_logprobs_in_the_legacy_shape() -> None:
    body = CompletionRenderer("r1", "m").whole(done(logprobs=[lp(104, -0.5, "h"), lp(105, -0.25, "ey")]))
    logprobs = Completion.model_validate_json(body).choices[0].logprobs
    assert logprobs is not None
    assert (logprobs.tokens, logprobs.token_logprobs, logprobs.text_offset) == (
        ["h", "ey"],
        [-0.5, -0.25],
        [0, 1],
    )
    assert logprobs.top_logprobs == [{"h": -0.5, "token_id:105": -1.5}, {"ey": -0.25, "token_id:106": -1.25}]
    without_text = CompletionRenderer("r1", "m").whole(done(logprobs=[lp(104, -0.5)]))
    assert json.loads(without_text)["choices"][0]["logprobs"]["text_offset"] is None


def test_n_choices_in_a_whole_answer() -> None:
    choices = [
        wire.Choice(
            index=0, text="ab", finish_reason="stop", completion_tokens=2, logprobs=[lp(97, -1.0, "a")]
        ),
        wire.Choice(index=1, text="cd", finish_reason="length", completion_tokens=2, logprobs=[lp(99, -2.0)]),
    ]
    chat = ChatCompletion.model_validate_json(ChatRenderer("r1", "m", 2).whole(done(choices)))
    assert [(c.index, c.message.content, c.finish_reason) for c in chat.choices] == [
        (0, "ab", "stop"),
        (1, "cd", "length"),
    ]
    assert chat.choices[1].logprobs is not None and chat.choices[1].logprobs.content[0].token == "token_id:99"  # type: ignore[index]
    assert chat.usage is not None and chat.usage.completion_tokens == 4
    completion = Completion.model_validate_json(CompletionRenderer("r1", "m", 2).whole(done(choices)))
    assert [(c.index, c.text, c.finish_reason) for c in completion.choices] == [
        (0, "ab", "stop"),
        (1, "cd", "length"),
    ]


def _stream(renderer: ChatRenderer | CompletionRenderer, events: list[Any]) -> list[dict[str, Any]]:
    """The chunks `EventStreamResponse` writes for these events (without the HTTP around them)."""
    response = EventStreamResponse.__new__(EventStreamResponse)
    response.renderer, response.include_usage, response.call = renderer, False, None  # type: ignore[assignment]
    streamed, out, outcome = Streamed(), [d.encode() for d in renderer.opening()], {}
    for event in events:
        response._render(event, streamed, out, outcome)
    chunks = []
    for raw in out:
        text = raw.decode().removeprefix("data: ").strip()
        if text != "[DONE]":
            chunks.append(json.loads(text))
    return chunks


def token(
    index: int, text: str, choice: int = 0, logprobs: list[wire.Logprob] | None = None
) -> wire.TokenEvent:
    return wire.TokenEvent(
        id="r1", index=index, text=text, token_ids=[index], attempt="w:1", choice=choice, logprobs=logprobs
    )


def test_streamed_chunks_carry_their_choice_and_logprobs() -> None:
    choices = [
        wire.Choice(index=0, text="ab", finish_reason="stop", completion_tokens=2),
        wire.Choice(index=1, text="cd", finish_reason="length", completion_tokens=2),
    ]
    events = [
        token(0, "a", 0, [lp(97, -1.0, "a")]),
        token(1, "c", 1, [lp(99, -2.0, "c")]),
        token(2, "", 1, [lp(100, -3.0)]),
        token(3, "b", 0, [lp(98, -0.5, "b")]),
        done(choices),
    ]
    chunks = _stream(ChatRenderer("r1", "m", 2), events)
    for chunk in chunks:
        ChatCompletionChunk.model_validate(chunk)  # the SDK's own type parses every chunk
    opening, rest = chunks[:2], chunks[2:]
    assert [(c["choices"][0]["index"], c["choices"][0]["delta"]) for c in opening] == [
        (0, {"role": "assistant", "content": ""}),
        (1, {"role": "assistant", "content": ""}),
    ]
    shown = [
        (c["choices"][0]["index"], c["choices"][0]["delta"].get("content"), c["choices"][0]["finish_reason"])
        for c in rest
    ]
    # Choice 1's "d" came only with the final reply: it is shown before that choice's finish.
    assert shown == [
        (0, "a", None),
        (1, "c", None),
        (1, "", None),
        (0, "b", None),
        (0, None, "stop"),
        (1, "d", None),
        (1, None, "length"),
    ]
    assert [t["token"] for t in rest[2]["choices"][0]["logprobs"]["content"]] == ["token_id:100"]
    assert rest[0]["choices"][0]["logprobs"]["content"][0]["top_logprobs"][1] == {
        "token": "token_id:98",
        "logprob": -2.0,
        "bytes": None,
    }

    completion = _stream(
        CompletionRenderer("r1", "m"),
        [token(0, "he", 0, [lp(1, -1.0, "he")]), token(1, "y", 0, [lp(2, -2.0, "y")]), done()],
    )
    assert [c["choices"][0]["text"] for c in completion] == ["he", "y", ""]
    second = completion[1]["choices"][0]["logprobs"]
    assert (second["tokens"], second["text_offset"]) == (["y"], [2])  # offsets continue over the chunks
