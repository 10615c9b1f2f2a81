"""Async output processing: tokens streamed one step late must be the same tokens, texts and finals."""

from __future__ import annotations

import pytest
from engine_helpers import chat, collect, drain, engine_config, request, step_into

from worker.engine.base import SequenceOutput
from worker.engine.model_files import LoadedModel
from worker.engine.paged_engine import PagedEngine

pytestmark = pytest.mark.model

QUESTIONS = ["Name three colours.", "What is 2 + 2?", "Say hello in French."]


def run(smol: LoadedModel, async_output: bool, stop: tuple[str, ...] = ()) -> dict[str, list[SequenceOutput]]:
    engine = PagedEngine(
        smol.model, smol.tokenizer, engine_config(kv_cache_bytes=32 << 20, async_output=async_output)
    )
    for i, question in enumerate(QUESTIONS):
        engine.add_request(request(f"q{i}", chat(engine, question), max_tokens=12 + 4 * i, stop=stop))
    outputs = drain(engine)
    assert not engine.has_unfinished()
    return outputs


def summary(outputs: dict[str, list[SequenceOutput]]) -> dict[str, tuple[list[int], str, str | None]]:
    result = {}
    for rid, outs in outputs.items():
        ids, text = collect(outs)
        assert [o.finished for o in outs].count(True) == 1 and outs[-1].finished  # one final, last
        assert outs[-1].text == text
        result[rid] = (ids, text, outs[-1].finish_reason)
    return result


def test_same_tokens_texts_and_finish_reasons_with_and_without_async_output(smol: LoadedModel):
    sync = summary(run(smol, async_output=False))
    assert summary(run(smol, async_output=True)) == sync
    # A stop string found one step late still cuts the text at the same place, with the same tokens.
    word = sync["q0"][1].split()[1]
    stopped_sync = summary(run(smol, async_output=False, stop=(word,)))
    assert stopped_sync["q0"][2] == "stop" and word not in stopped_sync["q0"][1]
    assert summary(run(smol, async_output=True, stop=(word,))) == stopped_sync


def test_abort_streams_the_pending_token_with_the_final_and_nothing_after(smol: LoadedModel):
    engine = PagedEngine(
        smol.model, smol.tokenizer, engine_config(kv_cache_bytes=32 << 20, async_output=True)
    )
    engine.add_request(request("a", chat(engine, QUESTIONS[0]), max_tokens=30, ignore_eos=True))
    engine.add_request(request("b", chat(engine, QUESTIONS[1]), max_tokens=30, ignore_eos=True))
    outputs: dict[str, list[SequenceOutput]] = {}
    for _ in range(5):
        step_into(engine, outputs)
    final = engine.abort_request("a")
    assert final is not None and final.finished and final.finish_reason == "cancelled"
    assert final.new_token_ids  # the token sampled by the last step, not streamed yet
    streamed = collect(outputs["a"])[0] + final.new_token_ids
    assert final.completion_tokens == len(streamed)
    drain(engine, outputs)
    assert collect(outputs["a"])[0] + final.new_token_ids == streamed  # nothing after the final
    assert len(collect(outputs["b"])[0]) == 30 and engine.abort_request("a") is None
