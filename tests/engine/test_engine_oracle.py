"""Correctness oracle: continuous batching with chunked prefill equals transformers' greedy generate()."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from engine_helpers import SYSTEM_PROMPT, chat, collect, engine_config, request

from worker.engine.model_files import LoadedModel
from worker.engine.paged_engine import PagedEngine

pytestmark = pytest.mark.model

NEW_TOKENS = 20

USER_TURNS = [
    ("Hi!", None),
    ("Where is my parcel 7731-AX? It was due yesterday and I am getting impatient.", SYSTEM_PROMPT),
    ("Which warehouse handles frozen fish?", SYSTEM_PROMPT),
    ("Write a haiku about the sea.", None),
    (
        "Explain, step by step and with an example, how a customs declaration for a pallet of "
        "machine parts shipped from Hamburg to Oslo is prepared, who signs it and what happens "
        "when a document is missing at the border.",
        None,
    ),
    ("Can I return shoes after three weeks?", SYSTEM_PROMPT),
    ("What is 17 times 23?", None),
    ("How long does express delivery take to Antwerp?", SYSTEM_PROMPT),
    ("Translate 'good morning' into French, German and Polish.", None),
    ("List three prime numbers.", SYSTEM_PROMPT),
]


def test_continuous_batch_matches_generate(
    smol: LoadedModel, reference: Callable[[list[int], int], list[int]]
):
    engine = PagedEngine(
        smol.model,
        smol.tokenizer,
        engine_config(
            kv_cache_bytes=64 << 20,
            kv_block_size_tokens=16,
            max_num_seqs=6,
            max_batch_tokens=96,
            max_prefill_chunk_tokens=40,
        ),
    )
    prompts = [chat(engine, user, system) for user, system in USER_TURNS]
    assert len({len(p) for p in prompts}) >= 8
    expected = [reference(p, NEW_TOKENS) for p in prompts]

    produced: dict[str, list[int]] = {}
    outputs_by_id: dict[str, list] = {}
    arrivals = {0: [0, 1, 2], 3: [3, 4], 5: [5, 6, 7], 9: [8, 9]}  # step index -> prompts arriving then
    chunked = False
    step = 0
    while step <= max(arrivals) or engine.has_unfinished():
        for i in arrivals.get(step, []):
            engine.add_request(request(f"r{i}", prompts[i], max_tokens=NEW_TOKENS, ignore_eos=True))
        for out in engine.step():
            outputs_by_id.setdefault(out.seq_id, []).append(out)
        stats = engine.last_step_stats()
        assert stats.prefill_tokens + stats.decode_tokens <= 96
        chunked |= stats.prefill_tokens > 0 and stats.decode_tokens > 0
        step += 1
        assert step < 500
    assert chunked, "prefill chunks never ran alongside decodes"

    for i in range(len(prompts)):
        outs = outputs_by_id[f"r{i}"]
        produced[f"r{i}"], _ = collect(outs)
        assert outs[-1].finished and outs[-1].finish_reason == "length"
        assert outs[-1].completion_tokens == NEW_TOKENS
        assert produced[f"r{i}"] == expected[i], f"prompt {i} diverged"
    assert engine.capacity().free_kv_tokens == engine.capacity().total_kv_tokens
