"""The sampler with every extra on the GPU, at Llama 3's 128,256-token vocabulary.

- Its Triton kernels (penalties, logprobs, the grammar bitmask) against their torch references.
- `sample_with_extras` with penalties, logit bias, min_tokens, logprobs, seeded temperature / top-k /
  top-p and greedy rows: it never synchronises the host (`torch.cuda.set_sync_debug_mode("error")`),
  and captured in a CUDA graph its replay gives the eager call's tokens, logprobs and penalty counts.
- The paged engine stepping such a batch, JSON-schema rows included, through its decode graphs: no
  launch synchronises the host, every reply parses, logprobs come with every token.
"""

from __future__ import annotations

import dataclasses
import json
import random
import time
from dataclasses import dataclass, field

import pytest
import torch

from scheduler import BatchPolicy
from worker.engine.base import GenerationRequest, SamplingParams
from worker.engine.config import EngineConfig
from worker.engine.kernels.logprob_stats import logprob_stats
from worker.engine.kernels.penalties import apply_penalties_
from worker.engine.kernels.token_bitmask import apply_bitmask_kernel_
from worker.engine.logprobs import LogprobRows, compute_logprobs_reference
from worker.engine.paged_engine import PagedEngine
from worker.engine.penalties import PenaltyState, apply_penalties
from worker.engine.sampler import SamplingExtras, SamplingTensors, sample_with_extras
from worker.engine.structured import GrammarSpec
from worker.engine.structured.bitmask import apply_bitmask_reference_, bitmask_width

VOCAB = 128_256
CUDA = torch.device("cuda")
EOS = (2,)


@dataclass
class Seq:
    """The part of `worker.engine.sequence.Sequence` the sampler reads."""

    seq_id: str
    sampling: SamplingParams
    token_ids: list[int]
    num_prompt_tokens: int = field(init=False)

    def __post_init__(self) -> None:
        self.num_prompt_tokens = len(self.token_ids) - 3  # three tokens already sampled

    @property
    def sampling_step(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens


def every_extra(batch: int) -> list[Seq]:
    """Rows cycling through greedy and seeded sampling with penalties, bias, min_tokens and logprobs."""
    rng = random.Random(0)
    kinds = [
        {"repetition_penalty": 1.2, "frequency_penalty": 0.5, "presence_penalty": 0.5, "logprobs": True,
         "top_logprobs": 5},
        {"temperature": 0.8, "top_k": 50, "seed": 7, "logit_bias": ((11, 5.0), (12, -100.0)),
         "logprobs": True},
        {"temperature": 1.0, "top_p": 0.9, "seed": 8, "min_tokens": 8, "stop_token_ids": (13,),
         "presence_penalty": -1.0},
        {},
        {"temperature": 0.6, "seed": 9, "top_k": 20, "top_p": 0.8, "frequency_penalty": 1.5, "logprobs": True,
         "top_logprobs": 20},
    ]  # fmt: skip
    return [
        Seq(f"s{i}", SamplingParams(**kinds[i % len(kinds)]), [rng.randrange(VOCAB) for _ in range(40)])
        for i in range(batch)
    ]


def build(seqs: list[Seq], state: PenaltyState) -> tuple[SamplingTensors, SamplingExtras]:
    sampling, steps = [s.sampling for s in seqs], [s.sampling_step for s in seqs]
    tensors = SamplingTensors.from_params(sampling, steps, CUDA)
    extras = SamplingExtras.from_params(
        sampling, steps, CUDA, vocab_size=VOCAB, eos_token_ids=EOS, penalty_rows=state.rows_for(seqs)
    )
    return tensors, extras


def test_penalties_kernel_at_128k() -> None:
    gen = torch.Generator(device="cuda").manual_seed(1)
    logits = torch.randn(64, VOCAB, device=CUDA, generator=gen) * 4
    counts = torch.randint(0, 3, (80, VOCAB), device=CUDA, generator=gen, dtype=torch.int32)
    counts *= torch.rand(80, VOCAB, device=CUDA, generator=gen) < 0.01
    mask = torch.rand(80, VOCAB, device=CUDA, generator=gen) < 0.05
    logit_rows = torch.arange(0, 64, 2, device=CUDA)
    state_rows = torch.randperm(80, device=CUDA, generator=gen)[:32]
    rep, freq, pres = (torch.rand(32, device=CUDA, generator=gen) + 0.5 for _ in range(3))
    expected = logits.clone()
    expected[logit_rows] = apply_penalties(
        logits[logit_rows], mask[state_rows], counts[state_rows], rep, freq, pres
    )
    got = apply_penalties_(logits.clone(), logit_rows, state_rows, counts, mask, rep, freq, pres)
    # One rounding apart at most (the compiler may fuse a multiply and a subtract).
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_logprob_kernels_at_128k(dtype: torch.dtype) -> None:
    gen = torch.Generator(device="cuda").manual_seed(2)
    logits = (torch.randn(64, VOCAB, device=CUDA, generator=gen) * 3).to(dtype)
    logits[3, 10_000:60_000] = float("-inf")
    tokens = torch.randint(0, VOCAB, (64,), device=CUDA, generator=gen)
    rows = torch.arange(1, 64, 3, device=CUDA)
    temperature = torch.rand(rows.shape[0], device=CUDA, generator=gen) + 0.3
    spec = LogprobRows(rows, temperature, tuple(rows.tolist()), (20,) * rows.shape[0])
    expected = compute_logprobs_reference(logits.float(), tokens, spec)
    sampled, values, ids = logprob_stats(logits, tokens, rows, temperature, 20)
    torch.testing.assert_close(sampled, expected.sampled, rtol=0, atol=2e-5)
    torch.testing.assert_close(values, expected.top_values, rtol=0, atol=2e-5)
    # Half-precision logits tie often: any of the tied tokens is a right answer, so check that each id's
    # own logprob is the value listed for it (and the values are the reference's top values, above).
    full = torch.log_softmax(logits.float()[rows] / temperature.unsqueeze(-1), dim=-1)
    torch.testing.assert_close(full.gather(-1, ids), expected.top_values, rtol=0, atol=2e-5)
    assert all(len(set(row)) == 20 for row in ids.tolist())  # no token listed twice


def test_bitmask_kernel_at_128k() -> None:
    gen = torch.Generator(device="cuda").manual_seed(3)
    words = torch.randint(-(2**31), 2**31 - 1, (64, bitmask_width(49_152)), device=CUDA, generator=gen,
                          dtype=torch.int64).to(torch.int32)  # fmt: skip
    logits = torch.randn(64, VOCAB, device=CUDA, generator=gen).half()
    rows = torch.arange(0, 64, 5, device=CUDA)
    expected = apply_bitmask_reference_(logits.clone(), words, rows)
    got = logits.clone()
    apply_bitmask_kernel_(got, words, rows)
    assert torch.equal(got, expected)


def test_sampler_with_every_extra_never_syncs_and_replays_in_a_cuda_graph() -> None:
    seqs = every_extra(64)
    state = PenaltyState(64, VOCAB, CUDA)
    tensors, extras = build(seqs, state)
    assert extras.penalties is not None and extras.bias is not None and extras.banned is not None
    assert extras.logprobs is not None
    gen = torch.Generator(device="cuda").manual_seed(4)
    logits = (torch.randn(64, VOCAB, device=CUDA, generator=gen) * 3).half()
    counts_before = state.output_counts.clone()  # type: ignore[union-attr]

    sample_with_extras(logits, tensors, extras, state)  # compiles the kernels
    state.output_counts.copy_(counts_before)  # type: ignore[union-attr]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        tokens, logprobs = sample_with_extras(logits, tensors, extras, state)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert logprobs is not None
    eager = (tokens.clone(), logprobs.sampled.clone(), logprobs.top_values.clone(), logprobs.top_ids.clone())
    counts_after = state.output_counts.clone()  # type: ignore[union-attr]
    assert int((counts_after - counts_before).sum()) == extras.penalties.state_rows.shape[0]  # one per row

    state.output_counts.copy_(counts_before)  # type: ignore[union-attr]
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        sample_with_extras(logits, tensors, extras, state)  # warm-up on the capture stream
    torch.cuda.current_stream().wait_stream(stream)
    state.output_counts.copy_(counts_before)  # type: ignore[union-attr]
    with torch.cuda.graph(graph):
        g_tokens, g_logprobs = sample_with_extras(logits, tensors, extras, state)
    state.output_counts.copy_(counts_before)  # type: ignore[union-attr]
    graph.replay()
    torch.cuda.synchronize()
    assert g_logprobs is not None
    assert torch.equal(g_tokens, eager[0])
    assert torch.equal(g_logprobs.sampled, eager[1])
    assert torch.equal(g_logprobs.top_values, eager[2])
    assert torch.equal(g_logprobs.top_ids, eager[3])
    assert torch.equal(state.output_counts, counts_after)  # type: ignore[arg-type]
    # min_tokens: the banned ids (EOS and stop ids) were never drawn.
    banned_rows = {i for i, s in enumerate(seqs) if s.sampling.min_tokens > s.sampling_step}
    assert banned_rows and all(int(eager[0][i]) not in (2, 13) for i in banned_rows)


REPLY_SCHEMA = {
    "type": "object",
    "properties": {"intent": {"enum": ["question", "order", "other"]}, "score": {"type": "integer"},
                   "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 3}},
    "required": ["intent", "score", "tags"],
}  # fmt: skip


def test_engine_steps_every_extra_and_json_schema_through_graphs_without_host_syncs() -> None:
    from worker.engine.random_model import random_causal_lm

    loaded = random_causal_lm("llama-1b", device="cuda", dtype=torch.float16)
    engine = PagedEngine(
        loaded.model, loaded.tokenizer,
        EngineConfig(kv_cache_bytes=1 << 30, policy=BatchPolicy(max_wait_ms=0, max_num_seqs=64)),
    )  # fmt: skip
    assert engine.runner.graphs is not None
    rng = random.Random(5)
    schema = GrammarSpec.json_schema(REPLY_SCHEMA)
    extras = every_extra(5)
    for i in range(40):
        prompt = [rng.randrange(100, 49_000) for _ in range(rng.randint(5, 300))]
        sampling = extras[i % 5].sampling
        grammar = schema if i % 4 == 0 else None
        params = dataclasses.replace(sampling, max_tokens=48, ignore_eos=grammar is None)
        engine.add_request(GenerationRequest(f"r{i}", prompt, params, time.monotonic(), grammar=grammar))
    outputs: dict[str, list] = {}
    graph_steps = 0
    while engine.has_unfinished():
        decoding = engine.scheduler.running and all(
            seq.num_uncomputed_tokens == 1 for seq in engine.scheduler.running
        ) and not engine.scheduler.waiting  # fmt: skip
        if decoding:
            graph_steps += 1
            torch.cuda.set_sync_debug_mode("error")
        try:
            engine.submit_step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
        for out in engine.collect():
            outputs.setdefault(out.seq_id, []).append(out)
    engine.close()
    assert graph_steps >= 20
    for i in range(40):
        outs = outputs[f"r{i}"]
        final = outs[-1]
        assert final.finished and final.finish_reason in ("stop", "length"), final.finish_reason
        tokens = [t for o in outs for t in o.new_token_ids]
        if i % 4 == 0 and final.finish_reason == "stop":
            reply = json.loads(final.text)
            assert reply["intent"] in ("question", "order", "other")
        if extras[i % 5].sampling.logprobs:
            logprobs = [lp for o in outs for lp in (o.logprobs or [])]
            assert [lp.token_id for lp in logprobs] == tokens
            assert all(lp.logprob <= 1e-6 and lp.logprob > float("-inf") for lp in logprobs)
        if extras[i % 5].sampling.min_tokens:
            assert len(tokens) >= 8
