"""Structured output through the paged engine: every constrained reply parses and validates.

The schemas and prompts of `test_structured_output.py` (nested objects, arrays, enums, required fields,
numbers with ranges...), all in one continuously batched engine with unconstrained requests beside them,
greedy and with eight seeds each: 198 constrained generations and 4 of any JSON object. A grammar the
engine cannot use ends its request alone, with `invalid_request`.
"""

from __future__ import annotations

import json

import jsonschema
import pytest
from engine_helpers import chat, collect, drain, engine_config, request
from test_structured_output import GEN_SCHEMAS

from worker.engine.model_files import LoadedModel
from worker.engine.paged_engine import PagedEngine
from worker.engine.structured import GrammarSpec

pytestmark = pytest.mark.model

MAX_TOKENS = 64


def make_engine(smol: LoadedModel, kv_cache_bytes: int = 64 << 20) -> PagedEngine:
    config = engine_config(max_num_seqs=64, kv_cache_bytes=kv_cache_bytes)
    return PagedEngine(smol.model, smol.tokenizer, config)


def test_every_constrained_reply_parses_and_validates_beside_free_ones(smol: LoadedModel) -> None:
    engine = make_engine(smol, kv_cache_bytes=192 << 20)
    expected = {}
    # Greedy and eight seeds per schema: 198 generations over 22 schemas, plus the 4 objects below.
    modes: list[tuple[str, dict]] = [("greedy", {})]
    modes += [(f"seed{seed}", {"temperature": 0.8, "seed": seed}) for seed in range(8)]
    for name, schema, prompt in GEN_SCHEMAS:
        for mode, sampling in modes:
            seq_id = f"{name}-{mode}"
            req = request(seq_id, chat(engine, prompt), max_tokens=MAX_TOKENS, **sampling)
            req.grammar = GrammarSpec.json_schema(schema)
            engine.add_request(req)
            expected[seq_id] = schema
    engine.add_request(request("free", chat(engine, "Say hello."), max_tokens=16, ignore_eos=True))
    objects = [
        "Give a cat's name and age as a JSON object.",
        "Reply with a JSON object with one key, name, for a cat.",
        "Return the user's city as JSON: I live in Paris.",
        "What is 2+2? Answer as a JSON object.",
    ]
    for i, prompt in enumerate(objects):
        any_object = request(f"object{i}", chat(engine, prompt), max_tokens=MAX_TOKENS)
        any_object.grammar = GrammarSpec.json_object()
        engine.add_request(any_object)
    outputs = drain(engine)
    assert len(expected) >= 198 and len(GEN_SCHEMAS) >= 20
    for seq_id, schema in expected.items():
        final = outputs[seq_id][-1]
        assert final.finished and final.finish_reason == "stop", (seq_id, final.finish_reason, final.text)
        jsonschema.validate(json.loads(final.text), schema)
        assert collect(outputs[seq_id])[1] == final.text  # the streamed deltas are the reply
    # Any JSON object: no length bound, so a reply that runs to max_tokens cannot parse; these end first.
    for i in range(len(objects)):
        final = outputs[f"object{i}"][-1]
        assert final.finish_reason == "stop" and isinstance(json.loads(final.text), dict), final.text
    assert len(collect(outputs["free"])[0]) == 16  # the unconstrained request ran its course beside them


def test_a_grammar_the_engine_cannot_use_ends_its_request_alone(smol: LoadedModel) -> None:
    engine = make_engine(smol)
    bad = request("bad", chat(engine, "List numbers."), max_tokens=8)
    bad.grammar = GrammarSpec.json_schema({"type": "array", "uniqueItems": True})
    engine.add_request(bad)
    engine.add_request(request("good", chat(engine, "Say hi."), max_tokens=4, ignore_eos=True))
    outputs = drain(engine)
    final = outputs["bad"][-1]
    assert final.finished and final.finish_reason == "invalid_request"
    assert final.error_param == "response_format" and "uniqueItems" in final.error, final.error
    assert final.completion_tokens == 0
    assert len(collect(outputs["good"])[0]) == 4


def test_a_request_waiting_for_its_grammar_can_be_aborted_and_handed_back(smol: LoadedModel) -> None:
    engine = make_engine(smol)
    held = request("held", chat(engine, "JSON please."), max_tokens=8)
    held.grammar = GrammarSpec.json_object()
    engine.add_request(held)
    assert engine.has_unfinished() and engine.grammars.held  # compiles off the step
    assert engine.take_unstarted() == ["held"]
    assert not engine.has_unfinished()
    again = request("again", chat(engine, "JSON please."), max_tokens=8)
    again.grammar = GrammarSpec.json_object()
    engine.add_request(again)
    out = engine.abort_request("again")
    assert out is not None and out.finish_reason == "cancelled" and not engine.has_unfinished()


def test_the_loop_is_told_to_step_once_the_grammar_is_in(smol: LoadedModel) -> None:
    """A loop that steps only when `wake_at_s()` says so (the worker's) must get there: the wake time
    while a grammar compiles is a short poll, and None once it is compiled."""
    import time

    engine = make_engine(smol)
    held = request("held", chat(engine, "JSON please."), max_tokens=8)
    held.grammar = GrammarSpec.json_schema({"type": "object", "properties": {"a": {"type": "integer"}}})
    engine.add_request(held)
    deadline = time.monotonic() + 10
    while (wake := engine.wake_at_s()) is not None:
        assert wake - time.monotonic() < 0.1 and time.monotonic() < deadline
        time.sleep(0.001)
    engine.step()
    assert not engine.grammars.held and engine.scheduler.running


def test_a_slow_grammar_compiles_while_the_other_requests_keep_decoding(smol: LoadedModel) -> None:
    """A hostile schema (an enum of 50,000 strings) compiles off the step: every step meanwhile still
    gives the running request its next token, and the schema's request then runs or fails alone."""
    engine = make_engine(smol)
    engine.add_request(request("free", chat(engine, "Count to ten."), max_tokens=200, ignore_eos=True))
    outputs: dict[str, list] = {}
    for _ in range(3):  # the free request is decoding
        for out in engine.step():
            outputs.setdefault(out.seq_id, []).append(out)
    huge = request("huge", chat(engine, "Pick one."), max_tokens=8)
    huge.grammar = GrammarSpec.json_schema({"enum": [f"value-{i:05d}" for i in range(50_000)]})
    engine.add_request(huge)
    steps_while_held = 0
    while engine.grammars.held:
        before = len(outputs["free"])
        for out in engine.step():
            outputs.setdefault(out.seq_id, []).append(out)
        steps_while_held += 1
        assert len(outputs["free"]) == before + 1  # one token per step, compile or not
    assert steps_while_held >= 1, "the grammar compiled before a step: the check proved nothing"
    drain(engine, outputs)
    final = outputs["huge"][-1]
    assert final.finished and final.finish_reason in ("stop", "length", "invalid_request"), final
    if final.finish_reason == "stop":
        assert json.loads(final.text).startswith("value-")
    assert len(collect(outputs["free"])[0]) == 200
