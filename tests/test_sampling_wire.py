"""The sampling extras on the wire: their limits, bodies that do not use them encoded as before, the
worker's mapping and its refusal of what its engine does not honour, and logprobs and choices in the
reply events (in process, with a fake engine output; against a real echo worker for the refusals)."""

from __future__ import annotations

import json
from typing import Any

import msgpack
import pytest
from pydantic import ValidationError

from producer.client import ChatClient, ChatError
from producer.wire.codec import ProtocolError, decode_event, decode_request, encode_event, encode_request
from producer.wire.models import (
    REQUEST_EXTRAS,
    ChatRequest,
    DoneEvent,
    ErrorCode,
    ErrorEvent,
    Timings,
    TokenEvent,
    Usage,
)
from worker.engine.base import EXTRAS, SamplingParams, SequenceOutput, TokenLogprob
from worker.loop.inflight import InFlight, InFlightTable, choice_seq_id, split_choice
from worker.loop.intake import extras_problem, extras_used, generation_requests, sampling_params, vocab_size
from worker.loop.publisher import MIN_LOGPROB, Publisher
from worker.observability.counters import LoopCounters

pytestmark = pytest.mark.timeout(120)

# The body fields of v1 before the extras: what a worker older than them accepts (`extra="forbid"`).
V1_FIELDS = {
    "id",
    "messages",
    "prompt",
    "max_tokens",
    "temperature",
    "top_p",
    "top_k",
    "stop",
    "seed",
    "stream",
    "priority",
    "deadline_ms",
    "timeout_ms",
    "tenant",
    "metadata",
    "reply_to",
    "kv_budget_tokens",
}


def request(**fields: Any) -> ChatRequest:
    return ChatRequest.model_validate({"id": "r1", "prompt": "hi", **fields})


def refused(**fields: Any) -> str:
    """The top-level field a request's validation names."""
    with pytest.raises(ValidationError) as info:
        request(**fields)
    return str(info.value.errors()[0]["loc"][0])


# -- limits ----------------------------------------------------------------------------------------------

SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
ACCEPTED = [
    {"n": 1},
    {"n": 8},
    {"logprobs": True},
    {"logprobs": True, "top_logprobs": 20},
    {"top_logprobs": 0},
    {"presence_penalty": -2},
    {"presence_penalty": 2},
    {"frequency_penalty": -2.0},
    {"frequency_penalty": 2},
    {"repetition_penalty": 0.01},
    {"repetition_penalty": 10},
    {"logit_bias": {"0": -100, "2147483647": 100}},
    {"logit_bias": {str(i): 1 for i in range(300)}},
    {"min_tokens": 0},
    {"min_tokens": 256},
    {"max_tokens": 8, "min_tokens": 8},
    {"stop_token_ids": list(range(64))},
    {"ignore_eos": True},
    {"response_format": {"type": "text"}},
    {"response_format": {"type": "json_object"}},
    {"response_format": {"type": "json_schema", "json_schema": {"name": "thing_1", "schema": SCHEMA}}},
    {
        "response_format": {
            "type": "json_schema",
            "json_schema": {"name": "t", "description": "d", "schema": SCHEMA, "strict": True},
        }
    },
    {"response_format": {"type": "regex", "regex": "[0-9]{3}"}},
]
REFUSED = [
    ({"n": 0}, "n"),
    ({"n": 9}, "n"),
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ({"top_logprobs": -1}, "top_logprobs"),
    ({"top_logprobs": 2}, "top_logprobs"),  # without logprobs
    ({"presence_penalty": 2.01}, "presence_penalty"),
    ({"presence_penalty": -2.5}, "presence_penalty"),
    ({"frequency_penalty": 3}, "frequency_penalty"),
    ({"frequency_penalty": float("nan")}, "frequency_penalty"),
    ({"repetition_penalty": 0}, "repetition_penalty"),
    ({"repetition_penalty": -1}, "repetition_penalty"),
    ({"repetition_penalty": 10.5}, "repetition_penalty"),
    ({"logit_bias": {"1": 100.5}}, "logit_bias"),
    ({"logit_bias": {"1": -101}}, "logit_bias"),
    ({"logit_bias": {"1": float("inf")}}, "logit_bias"),
    ({"logit_bias": {str(i): 1 for i in range(301)}}, "logit_bias"),
    ({"logit_bias": {"-1": 1}}, "logit_bias"),
    ({"logit_bias": {"x": 1}}, "logit_bias"),
    ({"logit_bias": {"1.5": 1}}, "logit_bias"),
    ({"logit_bias": {" 1": 1}}, "logit_bias"),
    ({"logit_bias": {"2147483648": 1}}, "logit_bias"),
    ({"logit_bias": {-3: 1}}, "logit_bias"),
    ({"logit_bias": {True: 1}}, "logit_bias"),
    ({"min_tokens": -1}, "min_tokens"),
    ({"max_tokens": 8, "min_tokens": 9}, "min_tokens"),
    ({"stop_token_ids": list(range(65))}, "stop_token_ids"),
    ({"stop_token_ids": [-1]}, "stop_token_ids"),
    ({"stop_token_ids": ["7"]}, "stop_token_ids"),
    ({"stop_token_ids": [2**31]}, "stop_token_ids"),
    ({"ignore_eos": "maybe"}, "ignore_eos"),
    ({"response_format": {"type": "xml"}}, "response_format"),
    ({"response_format": {"type": "json_schema"}}, "response_format"),
    (
        {"response_format": {"type": "json_object", "json_schema": {"name": "x", "schema": {}}}},
        "response_format",
    ),
    ({"response_format": {"type": "regex"}}, "response_format"),
    ({"response_format": {"type": "regex", "regex": "a" * 4097}}, "response_format"),
    ({"response_format": {"type": "text", "extra": 1}}, "response_format"),
    (
        {"response_format": {"type": "json_schema", "json_schema": {"name": "a b", "schema": {}}}},
        "response_format",
    ),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format"),
]


@pytest.mark.parametrize("fields", ACCEPTED, ids=[",".join(f) for f in ACCEPTED])
def test_extras_within_their_limits_are_accepted(fields: dict[str, Any]) -> None:
    r = request(**fields)
    # ... and survive the round trip through both encodings.
    for ct in ("json", "msgpack"):
        decoded, _ = decode_request(_entry(encode_request(r, ct)))  # type: ignore[arg-type]
        assert decoded == r


@pytest.mark.parametrize(("fields", "field"), REFUSED, ids=[f"{f}-{i}" for i, (_, f) in enumerate(REFUSED)])
def test_extras_past_their_limits_are_refused_naming_the_field(fields: dict[str, Any], field: str) -> None:
    assert refused(**fields) == field


def _schema(depth: int) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "string"}
    for _ in range(depth - 1):
        schema = {"type": "array", "items": schema}
    return schema


def test_the_json_schema_is_bounded_in_size_and_nesting() -> None:
    def fmt(schema: Any) -> dict[str, Any]:
        return {"response_format": {"type": "json_schema", "json_schema": {"name": "s", "schema": schema}}}

    request(**fmt(_schema(32)))
    assert refused(**fmt(_schema(33))) == "response_format"
    deep: Any = "x"
    for _ in range(100_000):  # no recursion: refused, not a RecursionError
        deep = [deep]
    assert refused(**fmt({"enum": deep})) == "response_format"
    request(**fmt({"enum": ["a" * 1000] * 60}))
    with pytest.raises(ValidationError, match="the limit is 65536"):
        request(**fmt({"enum": ["a" * 1000] * 70}))
    with pytest.raises(ValidationError, match="not JSON"):
        request(**fmt({"default": float("nan")}))
    with pytest.raises(ValidationError, match="not JSON"):
        request(**fmt({"default": b"bytes"}))


def test_logit_bias_keys_are_token_ids_as_strings_on_the_wire() -> None:
    raw = json.dumps({"id": "r1", "prompt": "hi", "logit_bias": {"42": 5, "7": -100.0}}).encode()
    r, _ = decode_request({b"v": b"1", b"ct": b"json", b"body": raw})
    assert r.logit_bias == {42: 5.0, 7: -100.0}
    # A Python caller may use ints; the body always has text keys (msgpack bodies allow no others).
    r = request(logit_bias={42: 5})
    body = msgpack.unpackb(encode_request(r, "msgpack")["body"], strict_map_key=True)  # type: ignore[arg-type]
    assert body["logit_bias"] == {"42": 5.0}
    assert json.loads(encode_request(r, "json")["body"])["logit_bias"] == {"42": 5.0}
    assert sampling_params(request(logit_bias={"9": 1, "3": -2})).logit_bias == ((3, -2.0), (9, 1.0))


# -- compatibility ---------------------------------------------------------------------------------------

# Bodies as the codec of the version before the extras encoded them, byte for byte.
OLD_JSON = (
    b'{"id":"r1","messages":[{"role":"user","content":"hi"}],"max_tokens":8,"temperature":0.0,"top_p":1.0,'
    b'"top_k":0,"stop":["x"],"seed":3,"stream":true,"priority":"interactive","tenant":"default",'
    b'"metadata":{"k":1}}'
)
OLD_MSGPACK = bytes.fromhex(
    "8ca26964a27231a86d657373616765739182a4726f6c65a475736572a7636f6e74656e74a26869aa6d61785f746f6b656e7308"
    "ab74656d7065726174757265cb0000000000000000a5746f705f70cb3ff0000000000000a5746f705f6b00a473746f7091a178"
    "a47365656403a673747265616dc3a87072696f72697479ab696e746572616374697665a674656e616e74a764656661756c74a8"
    "6d6574616461746181a16b01"
)
OLD_DONE = (
    b'{"type":"done","id":"r1","text":"a","finish_reason":"stop","usage":{"prompt_tokens":1,'
    b'"completion_tokens":1,"cached_tokens":0,"kv_dtype":"","kv_peak_tokens":0,"kv_evicted_tokens":0},'
    b'"timings":{"queue_ms":1.0,"ttft_ms":null,"tpot_ms":null,"total_ms":2.0,"worker":"w"},"attempt":"w:1"}'
)
OLD_ERROR = b'{"type":"error","id":"r1","code":"cancelled","message":"m","attempt":"client"}'


def _entry(fields: dict[str, bytes | str]) -> dict[bytes, bytes]:
    return {k.encode(): v if isinstance(v, bytes) else v.encode() for k, v in fields.items()}


@pytest.mark.parametrize(
    "explicit",
    [
        {},
        {
            name: ChatRequest.model_fields[name].get_default(call_default_factory=True)
            for name in REQUEST_EXTRAS
        },
    ],
    ids=["unset", "set-to-defaults"],
)
def test_a_request_without_extras_encodes_exactly_as_before(explicit: dict[str, Any]) -> None:
    r = ChatRequest(
        id="r1",
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=8,
        stop=["x"],
        seed=3,  # type: ignore[list-item]
        metadata={"k": 1},
        **explicit,
    )
    assert encode_request(r, "json")["body"] == OLD_JSON
    assert encode_request(r, "msgpack")["body"] == OLD_MSGPACK


def test_a_request_carries_only_the_extras_it_sets() -> None:
    body = json.loads(encode_request(request(n=2, ignore_eos=True, presence_penalty=0.0), "json")["body"])
    assert set(body) - V1_FIELDS == {"n", "ignore_eos"}
    assert set(json.loads(encode_request(request(), "json")["body"])) <= V1_FIELDS


def test_events_without_the_new_fields_encode_exactly_as_before() -> None:
    timings = Timings(queue_ms=1, ttft_ms=None, tpot_ms=None, total_ms=2, worker="w")
    done = DoneEvent(
        id="r1",
        text="a",
        finish_reason="stop",
        usage=Usage(prompt_tokens=1, completion_tokens=1),
        timings=timings,
        attempt="w:1",
    )
    assert encode_event(done, "json")["body"] == OLD_DONE
    error = ErrorEvent(id="r1", code=ErrorCode.CANCELLED, message="m", attempt="client")
    assert encode_event(error, "json")["body"] == OLD_ERROR
    token = TokenEvent(id="r1", index=0, text="a", token_ids=[1], attempt="w:1")
    assert set(token.model_dump()) == {"type", "id", "index", "text", "token_ids", "attempt"}


def test_the_new_event_fields_round_trip() -> None:
    lp = {
        "token_id": 5,
        "logprob": -0.5,
        "top": [{"token_id": 5, "logprob": -0.5}, {"token_id": 6, "logprob": -1.5}],
    }
    token = TokenEvent(id="r1", index=0, text="a", token_ids=[5], attempt="w", logprobs=[lp], choice=1)  # type: ignore[list-item]
    for ct in ("json", "msgpack"):
        back = decode_event(_entry(encode_event(token, ct)))  # type: ignore[arg-type]
        assert back == token and isinstance(back, TokenEvent)
    assert token.model_dump()["logprobs"] == [lp]  # no `token`: the worker gave no text
    error = ErrorEvent(id="r1", code=ErrorCode.INVALID_REQUEST, message="n: no", param="n")
    assert decode_event(_entry(encode_event(error, "json"))) == error


def test_the_worker_names_the_field_of_a_body_it_refuses() -> None:
    raw = json.dumps({"id": "r1", "prompt": "hi", "logit_bias": {"x": 1}}).encode()
    with pytest.raises(ProtocolError) as info:
        decode_request({b"v": b"1", b"ct": b"json", b"body": raw})
    assert info.value.param == "logit_bias" and info.value.message.startswith("logit_bias.x")
    raw = json.dumps({"id": "r1"}).encode()
    with pytest.raises(ProtocolError) as info:
        decode_request({b"v": b"1", b"ct": b"json", b"body": raw})
    assert info.value.param is None  # about no one field


# -- the worker's mapping and refusals --------------------------------------------------------------------


def test_the_request_maps_to_sampling_params() -> None:
    r = request(
        max_tokens=9,
        presence_penalty=0.5,
        frequency_penalty=-0.5,
        repetition_penalty=1.3,
        logit_bias={"7": 2, "1": -1},
        min_tokens=3,
        stop_token_ids=[5, 2],
        ignore_eos=True,
        logprobs=True,
        top_logprobs=4,
    )
    assert sampling_params(r) == SamplingParams(
        max_tokens=9,
        ignore_eos=True,
        presence_penalty=0.5,
        frequency_penalty=-0.5,
        repetition_penalty=1.3,
        logit_bias=((1, -1.0), (7, 2.0)),
        min_tokens=3,
        stop_token_ids=(5, 2),
        logprobs=True,
        top_logprobs=4,
    )
    assert extras_used(r, sampling_params(r)) == EXTRAS
    assert sampling_params(request()) == SamplingParams()
    assert extras_used(request(ignore_eos=True, response_format={"type": "text"}), SamplingParams()) == ()
    fmt = request(n=2, response_format={"type": "json_object"})
    assert extras_used(fmt, sampling_params(fmt)) == ("n", "response_format")


EACH_EXTRA = [
    ({"n": 2}, "n"),
    ({"logprobs": True}, "logprobs"),
    ({"logprobs": True, "top_logprobs": 2}, "logprobs"),
    ({"presence_penalty": 0.5}, "presence_penalty"),
    ({"frequency_penalty": -1}, "frequency_penalty"),
    ({"repetition_penalty": 1.1}, "repetition_penalty"),
    ({"logit_bias": {"104": 5}}, "logit_bias"),
    ({"min_tokens": 1}, "min_tokens"),
    ({"stop_token_ids": [104]}, "stop_token_ids"),
    ({"response_format": {"type": "json_object"}}, "response_format"),
    ({"response_format": {"type": "regex", "regex": "h.*"}}, "response_format"),
]


@pytest.mark.parametrize(("fields", "field"), EACH_EXTRA, ids=[f for _, f in EACH_EXTRA])
def test_an_extra_the_engine_does_not_honour_is_refused_by_name(fields: dict[str, Any], field: str) -> None:
    r = request(**fields)
    assert extras_problem(r, "echo", frozenset(), None) == (
        field,
        f"{field}: not supported by this worker's engine (echo)",
    )
    everything = frozenset(EXTRAS) | {"n", "response_format"}
    assert extras_problem(r, "paged", everything, None) is None
    assert extras_problem(request(top_logprobs=1, logprobs=True), "x", frozenset({"logprobs"}), None) == (
        "top_logprobs",
        "top_logprobs: not supported by this worker's engine (x)",
    )


def test_token_ids_outside_the_vocabulary_are_refused_when_it_is_known() -> None:
    everything = frozenset(EXTRAS)
    assert extras_problem(request(logit_bias={"99": 1}), "m", everything, 100) is None
    assert extras_problem(request(logit_bias={"5": 1, "100": 1}), "m", everything, 100) == (
        "logit_bias",
        "logit_bias: token id 100 is not in the model's vocabulary (0-99)",
    )
    assert extras_problem(request(stop_token_ids=[3, 4000]), "m", everything, 100) == (
        "stop_token_ids",
        "stop_token_ids: token id 4000 is not in the model's vocabulary (0-99)",
    )
    assert (
        extras_problem(request(stop_token_ids=[4000]), "m", everything, None) is None
    )  # unknown: the engine's

    class Tokenizer:
        def __len__(self) -> int:
            return 321

    class Encoder:
        tokenizer = Tokenizer()

    class ModelEngine:
        def encoder(self) -> Encoder:
            return Encoder()

    class Bare:
        def encoder(self) -> Any:
            raise NotImplementedError

    assert vocab_size(ModelEngine()) == 321  # type: ignore[arg-type]
    assert vocab_size(Bare()) is None  # type: ignore[arg-type]
    from worker.engine.echo_engine import EchoEngine

    assert vocab_size(EchoEngine()) is None


def test_the_worker_refuses_each_extra_by_name(start_worker, chat_client: ChatClient) -> None:
    start_worker("echo")
    for fields, field in EACH_EXTRA:
        with pytest.raises(ChatError) as info:
            chat_client.chat([{"role": "user", "content": "hi"}], max_tokens=4, **fields)
        assert info.value.code == ErrorCode.INVALID_REQUEST and info.value.param == field, fields
        assert info.value.message.startswith(f"{field}: not supported") and "(echo)" in info.value.message
    # What every engine does (ignore_eos, a text format) and extras at their defaults are served.
    reply = chat_client.chat(
        [{"role": "user", "content": "a b"}],
        max_tokens=4,
        ignore_eos=True,
        n=1,
        presence_penalty=0,
        response_format={"type": "text"},
    )
    assert reply.text == "a b" and reply.logprobs is None and reply.choices is None
    # A JSON body from another language, extras included, is refused the same way.
    body = {"id": "json-1", "prompt": "x", "stream": False, "logit_bias": {"120": -100}}
    chat_client.redis.xadd(chat_client.names.requests, {"v": "1", "ct": "json", "body": json.dumps(body)})
    with pytest.raises(ChatError) as info:
        chat_client.result("json-1", timeout_s=30)
    assert info.value.param == "logit_bias"


def test_the_client_refuses_bad_extras_before_sending(chat_client: ChatClient) -> None:
    with pytest.raises(ValidationError, match="top_logprobs"):
        chat_client.submit([{"role": "user", "content": "hi"}], top_logprobs=3)
    with pytest.raises(ValidationError, match="logit_bias"):
        chat_client.submit([{"role": "user", "content": "hi"}], logit_bias={"a": 1})


def test_n_choices_are_sequences_of_their_own() -> None:
    f = _inflight(n=3, seed=5)
    gens = generation_requests(f)
    assert [g.seq_id for g in gens] == ["r1", "r1#1", "r1#2"]
    assert [g.sampling.seed for g in gens] == [5, 6, 7]
    assert [split_choice(g.seq_id) for g in gens] == [("r1", 0), ("r1", 1), ("r1", 2)]
    assert choice_seq_id("alice/r1", 2) == "alice/r1#2" and split_choice("alice/r1#2") == ("alice/r1", 2)
    assert [g.seq_id for g in generation_requests(_inflight())] == ["r1"]


# -- logprobs and choices in the events ------------------------------------------------------------------


def _inflight(**fields: Any) -> InFlight:
    return InFlight(
        b"1000-0", request(**fields), "json", "llm:reply:r1", [1, 2, 3], 1000, 50.0, None, admitted_s=50.0
    )


class _Writer:
    def __init__(self) -> None:
        self.tokens: list[dict[str, Any]] = []
        self.finals: list[Any] = []

    def token(self, request_id: str, key: str, body: dict[str, Any], ct: str, first: bool) -> None:
        self.tokens.append(body)

    def final(self, final: Any) -> None:
        self.finals.append(final.event)


class _Writers:
    def __init__(self) -> None:
        self.writer = _Writer()

    def of(self, lane: Any) -> _Writer:
        return self.writer


def _publisher(f: InFlight, token_text: Any = None) -> tuple[Publisher, _Writer]:
    table = InFlightTable()
    table.add(f)
    writers = _Writers()
    return Publisher(writers, table, LoopCounters(), "w:1", "w", token_text), writers.writer  # type: ignore[arg-type]


def _out(seq_id: str, token: int, new: str, lp: float, finished: bool = False, **kw: Any) -> SequenceOutput:
    logprobs = [TokenLogprob(token, lp, ((token, lp), (token + 1, float("-inf"))))]
    return SequenceOutput(
        seq_id, [token], new, finished, "stop" if finished else None, logprobs=logprobs, **kw
    )


def test_logprobs_reach_the_token_events_and_the_done() -> None:
    f = _inflight(logprobs=True, top_logprobs=2)
    publisher, writer = _publisher(f)
    publisher.publish([_out("r1", 104, "h", -0.25)], 51.0)
    publisher.publish(
        [_out("r1", 105, "i", -0.5, True, text="hi", completion_tokens=2, prompt_tokens=3)], 51.1
    )
    first, second = (TokenEvent.model_validate(t) for t in writer.tokens)
    assert first.logprobs is not None and first.logprobs[0].token_id == 104
    assert first.logprobs[0].logprob == -0.25 and first.logprobs[0].token is None
    # -inf (a masked token) is written as OpenAI writes it: JSON has no infinity.
    assert [(t.token_id, t.logprob) for t in first.logprobs[0].top] == [(104, -0.25), (105, MIN_LOGPROB)]
    assert "choice" not in writer.tokens[0]  # one choice: no `choice`
    (done,) = writer.finals
    assert isinstance(done, DoneEvent) and done.choices is None
    assert done.logprobs is not None and [lp.token_id for lp in done.logprobs] == [104, 105]
    assert done.logprobs[1] == second.logprobs[0]  # type: ignore[index]
    # The bodies go on the wire and back.
    back = decode_event(_entry(encode_event(done, "msgpack")))
    assert isinstance(back, DoneEvent) and back.logprobs == done.logprobs
    assert done.model_dump()["logprobs"][0]["top"][1] == {"token_id": 105, "logprob": MIN_LOGPROB}


def test_token_texts_are_given_when_the_worker_can() -> None:
    publisher, writer = _publisher(_inflight(logprobs=True), token_text=lambda t: chr(t))
    publisher.publish([_out("r1", 104, "h", -0.25, True, text="h", completion_tokens=1)], 51.0)
    event = TokenEvent.model_validate(writer.tokens[0])
    assert (
        event.logprobs is not None
        and event.logprobs[0].token == "h"
        and event.logprobs[0].top[1].token == "i"
    )


def test_without_logprobs_asked_the_events_carry_none() -> None:
    publisher, writer = _publisher(_inflight())
    publisher.publish([_out("r1", 104, "h", -0.25, True, text="h", completion_tokens=1)], 51.0)
    assert set(writer.tokens[0]) == {"type", "id", "index", "text", "token_ids", "attempt"}
    assert set(json.loads(encode_event(writer.finals[0], "json")["body"])) == {
        "type",
        "id",
        "text",
        "finish_reason",
        "usage",
        "timings",
        "attempt",
    }


def test_n_choices_stream_with_their_index_and_end_in_one_done() -> None:
    f = _inflight(n=2, logprobs=True, max_tokens=2)
    publisher, writer = _publisher(f)
    publisher.publish([_out("r1", 97, "a", -0.1), _out("r1#1", 98, "b", -0.2)], 51.0)
    publisher.publish(
        [
            _out(
                "r1#1", 99, "c", -0.3, True, text="bc", completion_tokens=2, prompt_tokens=3, kv_peak_tokens=5
            )
        ],
        51.1,
    )
    assert not writer.finals  # choice 0 still runs
    publisher.publish(
        [_out("r1", 100, "d", -0.4, True, text="ad", completion_tokens=2, prompt_tokens=3, kv_peak_tokens=5)],
        51.2,
    )
    tokens = [TokenEvent.model_validate(t) for t in writer.tokens]
    assert [(t.index, t.choice, t.text) for t in tokens] == [
        (0, 0, "a"),
        (1, 1, "b"),
        (2, 1, "c"),
        (3, 0, "d"),
    ]
    (done,) = writer.finals
    assert isinstance(done, DoneEvent) and (done.text, done.finish_reason) == ("ad", "stop")
    assert (
        done.usage.completion_tokens == 4
        and done.usage.prompt_tokens == 3
        and done.usage.kv_peak_tokens == 10
    )
    assert done.choices is not None
    assert [(c.index, c.text, c.finish_reason, c.completion_tokens) for c in done.choices] == [
        (0, "ad", "stop", 2),
        (1, "bc", "stop", 2),
    ]
    assert [lp.token_id for lp in done.choices[1].logprobs or []] == [98, 99]
    assert done.logprobs == done.choices[0].logprobs
    assert publisher.table.get("r1") is None  # answered: the request left the table


def test_an_abnormal_end_of_one_choice_ends_the_request() -> None:
    publisher, writer = _publisher(_inflight(n=2))
    out = SequenceOutput("r1#1", [], "", True, "deadline_exceeded")
    publisher.publish([out], 51.0)
    (error,) = writer.finals
    assert isinstance(error, ErrorEvent) and error.code == ErrorCode.DEADLINE_EXCEEDED
    publisher.publish([_out("r1", 97, "a", -0.1, True, text="a")], 51.1)  # the other choice: dropped
    assert len(writer.finals) == 1 and not writer.tokens
