"""PagedEngine on the real model: prefix sharing, seeds, preemption, abort, deadlines, stop conditions."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest
from engine_helpers import SYSTEM_PROMPT, chat, collect, drain, engine_config, request, step_into

from worker.engine.factory import create_engine
from worker.engine.model_files import LoadedModel
from worker.engine.paged_engine import PagedEngine

pytestmark = pytest.mark.model

QUESTIONS = [
    "Where is parcel 55-B?",
    "Do you ship to Norway?",
    "Can I change the delivery address?",
    "What are your opening hours?",
]


def make_engine(smol: LoadedModel, **overrides: object) -> PagedEngine:
    args: dict[str, object] = dict(
        kv_cache_bytes=64 << 20, max_batch_tokens=512, max_prefill_chunk_tokens=256
    )
    args.update(overrides)
    return PagedEngine(smol.model, smol.tokenizer, engine_config(**args))  # type: ignore[arg-type]


def test_prefix_sharing_is_invisible_in_outputs_and_skips_the_shared_prompt(smol: LoadedModel):
    results: dict[bool, dict[str, list[int]]] = {}
    for caching in (False, True):
        engine = make_engine(smol, enable_prefix_caching=caching)
        prompts = [chat(engine, q, SYSTEM_PROMPT) for q in QUESTIONS]
        common = next(i for i, toks in enumerate(zip(*prompts, strict=False)) if len(set(toks)) > 1)
        assert common >= 200
        engine.add_request(request("q0", prompts[0], max_tokens=8, ignore_eos=True))
        outputs: dict[str, list] = {}
        step_into(engine, outputs)  # the first request's prefill publishes the shared blocks
        for i, prompt in enumerate(prompts[1:], start=1):
            engine.add_request(request(f"q{i}", prompt, max_tokens=8, ignore_eos=True))
        drain(engine, outputs)
        results[caching] = {rid: collect(outs)[0] for rid, outs in outputs.items()}
        cached = {rid: outs[-1].cached_tokens for rid, outs in outputs.items()}
        if caching:
            assert cached["q0"] == 0
            assert all(cached[f"q{i}"] >= 192 for i in range(1, len(prompts))), cached
            assert engine.last_step_stats().extra["prefix_hit_rate"] > 0.5
        else:
            assert set(cached.values()) == {0}
    assert results[True] == results[False]


def test_requests_arriving_together_share_the_prefix_computed_in_the_same_step(
    smol: LoadedModel, reference: Callable[[list[int], int], list[int]]
):
    engine = make_engine(smol, max_batch_tokens=1024, max_prefill_chunk_tokens=512)
    prompts = [chat(engine, q, SYSTEM_PROMPT) for q in QUESTIONS[:3]]
    for i, prompt in enumerate(prompts):
        engine.add_request(request(f"q{i}", prompt, max_tokens=6, ignore_eos=True))
    outputs: dict[str, list] = {}
    step_into(engine, outputs)
    stats = engine.last_step_stats()
    assert stats.num_seqs == 3 and stats.cached_tokens >= 2 * 192
    drain(engine, outputs)
    for i, prompt in enumerate(prompts):
        assert collect(outputs[f"q{i}"])[0] == reference(prompt, 6)


def test_seeded_sampling_does_not_depend_on_the_batch(smol: LoadedModel):
    engine = make_engine(smol)
    prompt = chat(engine, "Tell me a very short story about a cat.")
    sampling = dict(max_tokens=16, temperature=0.8, top_p=0.95, seed=1234, ignore_eos=True)
    engine.add_request(request("alone", prompt, **sampling))
    alone = collect(drain(engine)["alone"])
    for i in range(7):
        other = chat(engine, f"Count from {i} to {i + 5}.")
        engine.add_request(
            request(f"other{i}", other, max_tokens=16, temperature=1.0, seed=i, ignore_eos=True)
        )
    engine.add_request(request("batched", prompt, **sampling))
    batched = collect(drain(engine)["batched"])
    assert alone == batched
    engine.add_request(request("reseeded", prompt, **{**sampling, "seed": 99}))
    assert collect(drain(engine)["reseeded"]) != alone


def test_preemption_by_recompute_keeps_greedy_output(
    smol: LoadedModel, reference: Callable[[list[int], int], list[int]]
):
    # 5 blocks of 16 tokens: three ~40-token prompts fit at admission, but not while all three decode.
    bytes_per_block = 30 * 2 * 16 * 3 * 64 * 4
    engine = make_engine(smol, kv_cache_bytes=5 * bytes_per_block, kv_reserve="optimistic")
    prompts = [engine.encode_prompt(text) for text in ("The history of the bicycle", "Rain in spring", "Ten")]
    prompts = [p * (12 // len(p) + 1) for p in prompts]  # ~12-20 tokens each
    for i, prompt in enumerate(prompts):
        engine.add_request(request(f"p{i}", prompt, max_tokens=24, ignore_eos=True))
    preempted = 0
    outputs: dict[str, list] = {}
    while engine.has_unfinished():
        for out in engine.step():
            outputs.setdefault(out.seq_id, []).append(out)
        preempted += int(engine.last_step_stats().extra["preempted"])
    assert preempted > 0
    for i, prompt in enumerate(prompts):
        assert collect(outputs[f"p{i}"])[0] == reference(prompt, 24)
    assert engine.capacity().free_kv_tokens == engine.capacity().total_kv_tokens


def test_abort_frees_blocks_at_once(smol: LoadedModel):
    engine = make_engine(smol, enable_prefix_caching=False)
    total = engine.capacity().total_kv_tokens
    engine.add_request(request("a", chat(engine, "Describe the moon."), max_tokens=40))
    engine.add_request(request("waiting", chat(engine, "Hi"), max_tokens=40))
    engine.step()
    engine.step()
    assert engine.capacity().free_kv_tokens < total
    final = engine.abort_request("a")
    assert final is not None and final.finished and final.finish_reason == "cancelled"
    assert final.completion_tokens == 2
    assert engine.abort_request("waiting") is not None
    assert engine.abort_request("unknown") is None
    assert engine.capacity().free_kv_tokens == total and not engine.has_unfinished()


def test_deadline_stops_a_running_sequence(smol: LoadedModel):
    engine = make_engine(smol)
    late = request(
        "late", chat(engine, "Write a long poem."), max_tokens=200, deadline_s=time.monotonic() + 3600
    )
    engine.add_request(late)
    engine.add_request(request("expired", chat(engine, "Hi"), max_tokens=5, deadline_s=time.monotonic() - 1))
    outputs: dict[str, list] = {}
    for _ in range(3):
        step_into(engine, outputs)
    assert outputs["expired"][-1].finish_reason == "deadline_exceeded"
    assert outputs["expired"][-1].completion_tokens == 0
    assert len(outputs["late"]) == 3 and not outputs["late"][-1].finished
    late.deadline_s = time.monotonic()  # the clock passes the deadline while the request runs
    step_into(engine, outputs)
    last = outputs["late"][-1]
    assert last.finished and last.finish_reason == "deadline_exceeded" and last.completion_tokens == 3
    assert not engine.has_unfinished()
    assert engine.capacity().free_kv_tokens == engine.capacity().total_kv_tokens


def test_eos_stop_strings_and_length(smol: LoadedModel, reference: Callable[[list[int], int], list[int]]):
    engine = make_engine(smol)
    prompt = chat(engine, "What is the capital of France? Answer in one word.")
    expected = reference(prompt, 12)
    assert 2 in expected  # this answer ends with <|im_end|> inside 12 tokens
    engine.add_request(request("eos", prompt, max_tokens=12))
    engine.add_request(request("len", prompt, max_tokens=3))
    engine.add_request(request("stop", prompt, max_tokens=12, stop=("Paris",)))
    outputs = drain(engine)
    ids, text = collect(outputs["eos"])
    assert outputs["eos"][-1].finish_reason == "stop" and ids == expected[: expected.index(2) + 1]
    assert text == outputs["eos"][-1].text == smol.tokenizer.decode(ids, skip_special_tokens=True)
    assert outputs["len"][-1].finish_reason == "length" and collect(outputs["len"])[0] == expected[:3]
    stop_text = collect(outputs["stop"])[1]
    assert outputs["stop"][-1].finish_reason == "stop" and "Paris" not in stop_text
    assert stop_text == outputs["stop"][-1].text


def test_encode_and_capacity(smol: LoadedModel):
    engine = make_engine(smol)
    ids = engine.encode_chat([{"role": "user", "content": "hi"}])
    assert ids and all(isinstance(t, int) for t in ids)
    assert engine.encode_prompt("hello world") == smol.tokenizer.encode("hello world")
    cap = engine.capacity()
    assert cap.running == 0 and cap.free_kv_tokens == cap.total_kv_tokens and cap.waiting == 0
    assert engine.eos_token_ids == frozenset({2})
    with pytest.raises(ValueError):
        engine.add_request(request("x", []))
    engine.add_request(request("x", ids, max_tokens=1))
    with pytest.raises(ValueError):
        engine.add_request(request("x", ids, max_tokens=1))


def test_failed_step_publishes_nothing_it_was_writing(
    smol: LoadedModel, reference: Callable[[list[int], int], list[int]]
):
    engine = make_engine(smol)
    first = chat(engine, QUESTIONS[0], SYSTEM_PROMPT)
    second = chat(engine, "Please list every warehouse and what each one handles, in detail.", SYSTEM_PROMPT)
    engine.add_request(request("a", first, max_tokens=4, ignore_eos=True))
    drain(engine)
    model = engine.runner.model

    def broken_forward(**kwargs: object) -> None:
        raise RuntimeError("device fell over")

    engine.runner.model = broken_forward
    engine.add_request(request("b", second, max_tokens=4, ignore_eos=True))
    with pytest.raises(RuntimeError):
        engine.step()
    assert engine.abort_request("b", "error") is not None  # what the worker loop does after a failed step
    engine.runner.model = model
    engine.add_request(request("c", second, max_tokens=4, ignore_eos=True))
    outputs = drain(engine)
    common = next(i for i, (x, y) in enumerate(zip(first, second, strict=False)) if x != y)
    assert outputs["c"][-1].cached_tokens == common // 16 * 16  # only what "a" computed is reused
    assert collect(outputs["c"])[0] == reference(second, 4)


def test_create_engine_loads_the_default_model():
    engine = create_engine(engine_config(kv_cache_bytes=8 << 20, max_num_seqs=4))
    engine.add_request(request("s", engine.encode_chat([{"role": "user", "content": "Hi"}]), max_tokens=2))
    outputs = drain(engine)
    assert outputs["s"][-1].finished and outputs["s"][-1].completion_tokens <= 2
    engine.close()
