"""Async scheduling: step N+1 launched before step N is read back gives the same replies, and never a token
past a final.

With async scheduling the paged engine plans step N+1 while step N's sampled ids are still on the device
(a decode row's input token is taken from them there), and finds stops when N is read back, one step late.
On the CPU nothing runs ahead, but every piece of bookkeeping is the same: the future tokens, the rows that
end at `max_tokens`, stops found late, preemption, aborts and deadlines between submit and collect, prefix
blocks never published with a token not read back. Each test compares with async scheduling off, the
engine that has always been tested against transformers' `generate`.
"""

from __future__ import annotations

import dataclasses
import json
import time

import pytest
from engine_helpers import SYSTEM_PROMPT, chat, collect, drain, engine_config, request, step_into

from worker.engine.base import SequenceOutput
from worker.engine.model_files import LoadedModel
from worker.engine.paged_engine import PagedEngine
from worker.engine.sequence import FUTURE_TOKEN
from worker.engine.structured import GrammarSpec

pytestmark = pytest.mark.model

QUESTIONS = ["Name three colours.", "What is 2 + 2?", "Say hello in French.", "Count to five."]
Summary = dict[str, tuple[list[int], str, str | None, int]]


def new_engine(smol: LoadedModel, on: bool, **options: object) -> PagedEngine:
    config = {"kv_cache_bytes": 32 << 20, "async_scheduling": on, "async_output": False} | options
    engine = PagedEngine(smol.model, smol.tokenizer, engine_config(**config))
    assert engine.async_scheduling is on
    return engine


def summary(outputs: dict[str, list[SequenceOutput]]) -> Summary:
    """Each request's tokens, text, finish reason and reported completion tokens; one final, last."""
    result = {}
    for rid, outs in outputs.items():
        ids, text = collect(outs)
        assert [o.finished for o in outs].count(True) == 1 and outs[-1].finished, rid
        assert outs[-1].text == text and outs[-1].completion_tokens == len(ids), rid
        assert FUTURE_TOKEN not in ids
        result[rid] = (ids, text, outs[-1].finish_reason, outs[-1].completion_tokens)
    return result


def no_future_tokens_published(engine: PagedEngine) -> None:
    blocks = engine.block_manager.blocks
    assert all(FUTURE_TOKEN not in b.token_ids for b in blocks if b.block_hash is not None)


def run(
    smol: LoadedModel, on: bool, requests: list[tuple[str, list[int], dict]], **options: object
) -> Summary:
    engine = new_engine(smol, on, **options)
    for rid, prompt, sampling in requests:
        engine.add_request(request(rid, prompt, **sampling))
    outputs = drain(engine)
    assert not engine.has_unfinished()
    no_future_tokens_published(engine)
    engine.close()
    return summary(outputs)


def chat_requests(smol: LoadedModel, **sampling: object) -> list[tuple[str, list[int], dict]]:
    engine = new_engine(smol, False)
    prompts = [chat(engine, q, system=SYSTEM_PROMPT if i % 2 else None) for i, q in enumerate(QUESTIONS)]
    engine.close()
    return [(f"q{i}", p, {"max_tokens": 9 + 7 * i} | sampling) for i, p in enumerate(prompts)]


def test_same_replies_with_eos_length_and_stop_strings(smol: LoadedModel) -> None:
    requests = chat_requests(smol)
    sync = run(smol, False, requests)
    assert run(smol, True, requests) == sync
    assert {r[2] for r in sync.values()} == {"stop", "length"}, "the check needs EOS and length finals"
    # A stop string is found when its step is read back, while the next step already runs.
    word = sync["q3"][1].split()[1]
    stopped = [(rid, p, s | {"stop": (word,)}) for rid, p, s in requests]
    stopped_sync = run(smol, False, stopped)
    assert stopped_sync["q3"][2] == "stop" and word not in stopped_sync["q3"][1]
    assert run(smol, True, stopped) == stopped_sync


def test_same_replies_with_penalties_logprobs_seeds_and_stop_tokens(smol: LoadedModel) -> None:
    extras = {
        "temperature": 0.8, "seed": 7, "frequency_penalty": 0.6, "presence_penalty": 0.3,
        "repetition_penalty": 1.2, "logprobs": True, "top_logprobs": 3, "min_tokens": 4,
    }  # fmt: skip
    requests = chat_requests(smol, **extras)
    stop_id = smol.tokenizer.encode(" the", add_special_tokens=False)[0]
    requests.append(
        ("t", requests[0][1], {"max_tokens": 30, "stop_token_ids": (stop_id,), "ignore_eos": True})
    )
    assert run(smol, True, requests) == run(smol, False, requests)


def test_shared_prefixes_and_blocks_filled_by_decoding(smol: LoadedModel) -> None:
    """Identical prompts (n > 1 shares a prompt the same way) decode into blocks that fill while a token
    is still on the device: those blocks are published only once it is read back."""
    prompt = chat_requests(smol)[1][1]
    requests = [(f"c{i}", prompt, {"max_tokens": 40, "ignore_eos": True, "temperature": 1.0, "seed": i})
                for i in range(3)]  # fmt: skip
    requests.append(("g", prompt, {"max_tokens": 40, "ignore_eos": True}))
    assert run(smol, True, requests, kv_block_size_tokens=4) == run(
        smol, False, requests, kv_block_size_tokens=4
    )


def test_same_replies_under_preemption(smol: LoadedModel) -> None:
    requests = [(rid, p, {"max_tokens": 48, "ignore_eos": True}) for rid, p, _ in chat_requests(smol)]
    options = {"kv_cache_bytes": 24 * 737_280, "kv_reserve": "optimistic"}  # 24 blocks of 16 tokens
    engine = new_engine(smol, True, **options)
    for rid, prompt, sampling in requests:
        engine.add_request(request(rid, prompt, **sampling))
    outputs: dict[str, list[SequenceOutput]] = {}
    preempted = 0
    while engine.has_unfinished():
        step_into(engine, outputs)
        preempted += int(engine.last_step_stats().extra.get("preempted", 0))
    assert preempted, "the pool was large enough that nothing was preempted: the check proved nothing"
    no_future_tokens_published(engine)
    assert summary(outputs) == run(smol, False, requests, **options)


@pytest.mark.parametrize("ending", ["abort", "deadline"])
def test_nothing_after_a_final_that_comes_between_submit_and_collect(smol: LoadedModel, ending: str) -> None:
    requests = chat_requests(smol, ignore_eos=True)
    engine = new_engine(smol, True)
    for rid, prompt, sampling in requests:
        deadline = {"deadline_s": time.monotonic() + 3600} if rid == "q3" else {}
        engine.add_request(request(rid, prompt, **(sampling | {"max_tokens": 30} | deadline)))
    outputs: dict[str, list[SequenceOutput]] = {}
    for _ in range(6):
        step_into(engine, outputs)
    engine.submit_step()  # step N+1 is on its way and step N not read back: q3 has two tokens in flight
    assert engine.scheduler.running and any(s.first_future is not None for s in engine.scheduler.running)
    if ending == "abort":
        final = engine.abort_request("q3")
        assert final is not None
        outputs.setdefault("q3", []).append(final)
    else:
        seq = next(s for s in engine.scheduler.running if s.seq_id == "q3")
        seq.request = dataclasses.replace(seq.request, deadline_s=time.monotonic())  # found by the next step
    for out in engine.collect():
        outputs.setdefault(out.seq_id, []).append(out)
    drain(engine, outputs)
    got = summary(outputs)
    reason = "cancelled" if ending == "abort" else "deadline_exceeded"
    assert got["q3"][2] == reason
    ids = got["q3"][0]
    full = run(smol, False, [(rid, p, s | {"max_tokens": 30}) for rid, p, s in requests])
    assert ids == full["q3"][0][: len(ids)]  # a prefix of the reply, nothing made up, no token after
    assert got["q0"] == full["q0"]  # the others are untouched


def test_same_replies_with_grammars_beside_free_requests(smol: LoadedModel) -> None:
    """A constrained row's mask needs the previous step's token: the grammar gate's job consumes it and
    fills the next mask beside the engine's thread; the token that completes a grammar ends its reply, and
    any token computed after it is dropped; free rows keep running ahead."""
    schema = {
        "type": "object",
        "properties": {"colour": {"enum": ["red", "green", "blue"]}, "count": {"type": "integer"}},
        "required": ["colour", "count"],
    }

    def replies(on: bool) -> Summary:
        engine = new_engine(smol, on)
        for rid, prompt, sampling in chat_requests(smol):
            engine.add_request(request(rid, prompt, **(sampling | {"max_tokens": 40})))
            constrained = request(f"{rid}-json", prompt, max_tokens=40)
            constrained.grammar = (
                GrammarSpec.json_schema(schema) if rid != "q1" else GrammarSpec.json_object()
            )
            engine.add_request(constrained)
        outputs = drain(engine)
        no_future_tokens_published(engine)
        engine.close()
        return summary(outputs)

    sync = replies(False)
    assert replies(True) == sync
    for rid, (_, text, reason, _) in sync.items():
        if rid.endswith("-json"):
            assert reason == "stop" and isinstance(json.loads(text), dict), (rid, text)
