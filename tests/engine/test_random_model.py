"""A random-weight Llama of another shape (GQA group 4) runs unchanged through the paged engine."""

from __future__ import annotations

import torch
from engine_helpers import collect, drain, engine_config, greedy_reference, request

from worker.engine.paged_engine import PagedEngine
from worker.engine.random_model import random_causal_lm


def test_random_tiny_llama_matches_generate():
    loaded = random_causal_lm("tiny", device="cpu", dtype=torch.float32)
    again = random_causal_lm("tiny", device="cpu", dtype=torch.float32)
    first = next(loaded.model.parameters())
    assert torch.equal(first, next(again.model.parameters()))  # seed 0 makes the weights reproducible
    engine = PagedEngine(
        loaded.model, loaded.tokenizer, engine_config(kv_cache_bytes=8 << 20, max_prefill_chunk_tokens=16)
    )
    prompts = [list(range(100, 100 + n)) for n in (5, 23, 40)]
    expected = [greedy_reference(loaded, p, 12) for p in prompts]
    for i, prompt in enumerate(prompts):
        engine.add_request(request(f"t{i}", prompt, max_tokens=12, ignore_eos=True))
    outputs = drain(engine)
    assert [collect(outputs[f"t{i}"])[0] for i in range(3)] == expected
