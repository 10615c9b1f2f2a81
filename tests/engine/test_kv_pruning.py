"""KV pruning: budgets, sinks + recent window, SnapKV scores, refcounts under sharing, the wire field."""

from __future__ import annotations

import json
import math
import time

import pytest
import torch
from engine_helpers import collect, drain, engine_config, request
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from worker.engine.base import GenerationRequest, SamplingParams
from worker.engine.block_manager import BlockManager
from worker.engine.kernels import kernels_usable
from worker.engine.kv_prune import PrunePolicy, block_scores, window_scores
from worker.engine.model_files import LoadedModel
from worker.engine.paged_engine import PagedEngine
from worker.engine.random_model import random_causal_lm
from worker.engine.sequence import Sequence


def make_seq(seq_id: str, tokens: list[int], budget: int = 0, max_tokens: int = 64) -> Sequence:
    seq = Sequence(GenerationRequest(seq_id, tokens, SamplingParams(max_tokens=max_tokens), time.monotonic()))
    seq.kv_budget_tokens = budget
    if budget:
        seq.max_prefix_blocks = PrunePolicy(block_size=4).max_prefix_blocks(budget)
    return seq


def test_budget_validation_and_caps():
    policy = PrunePolicy(block_size=16, sink_tokens=4)
    assert policy.min_budget_tokens == 32  # 4 sink tokens round up to a block, plus one block
    assert policy.budget_problem(0) is None and policy.budget_problem(32) is None
    assert policy.budget_problem(31) and policy.budget_problem(-1)
    assert policy.cap_blocks(100) == 8 and policy.max_prefix_blocks(100) == 5
    assert policy.max_prefix_blocks(100, worst_case=True) == 1  # the sink block only
    with pytest.raises(ValueError):
        PrunePolicy(block_size=16, default_budget_tokens=20)
    with pytest.raises(ValueError):
        PrunePolicy(mode="h2o")  # type: ignore[arg-type]


def test_window_mode_evicts_the_oldest_middle_block_and_keeps_the_sinks():
    bm = BlockManager(num_blocks=16, block_size=4)
    policy = PrunePolicy(block_size=4, sink_tokens=4)
    seq = make_seq("a", list(range(20)), budget=12)
    bm.allocate(seq, 4)
    seq.num_computed_tokens = 12
    bm.ensure_slots(seq, 12)
    sink, first_middle, second_middle = seq.block_table[:3]
    n, evicted = policy.fit(seq, 1)
    assert n == 1 and evicted == [first_middle]
    bm.evict(seq, evicted)
    assert seq.block_table[:2] == [sink, second_middle] and seq.num_evicted_tokens == 4
    assert seq.kv_len(13) == 9
    # Position 12 now sits at kept index 8: the table's third block, same offset.
    bm.ensure_slots(seq, 13)
    assert bm.slot_mapping(seq, 12, 13) == [seq.block_table[2] * 4]
    assert bm.blocks[first_middle].ref_count == 0 and first_middle in bm.free_block_ids


def test_snapkv_mode_evicts_the_least_attended_block_outside_the_recent_window():
    policy = PrunePolicy(block_size=4, sink_tokens=4, mode="snapkv", obs_window=4)
    seq = make_seq("a", list(range(40)), budget=20)
    seq.block_table = list(range(6))
    seq.num_computed_tokens = 24
    seq.block_scores = [9.0, 5.0, 1.0, 7.0, 0.5, 0.1]  # the last block is the protected recent window
    n, evicted = policy.fit(seq, 1)
    assert evicted == [4, 2] and n == 1
    assert seq.block_table == [0, 1, 3, 5] and seq.block_scores == [9.0, 5.0, 7.0, 0.1]


def test_window_scores_sum_attention_causally():
    torch.manual_seed(0)
    q, k = torch.randn(3, 4, 8), torch.randn(10, 2, 8)
    scores = window_scores(q, k, 0.3, 10)
    # Each of 3 queries x 4 heads puts total weight 1 on the keys it sees; the first query cannot see key 9.
    assert scores.sum().item() == pytest.approx(12.0, rel=1e-5)
    assert block_scores(scores, 4) == pytest.approx(
        [scores[:4].sum().item(), scores[4:8].sum().item(), scores[8:].sum().item()], rel=1e-5
    )
    only_last = window_scores(q[2:], k, 0.3, 10)
    assert only_last.shape == (10,) and torch.all(only_last > 0)
    # By hand: query i (kept index 7 + i) over keys [0, 7 + i], GQA head h reads kv head h // 2.
    expected = torch.zeros(10)
    for i in range(3):
        for h in range(4):
            expected[: 8 + i] += torch.softmax(k[: 8 + i, h // 2] @ q[i, h] * 0.3, dim=0)
    assert torch.allclose(scores, expected, atol=1e-5)


class PruningUnderSharing(RuleBasedStateMachine):
    """Sequences with shared prefixes, some with budgets, grow, get pruned and finish in random order.

    A write goes only to a block its sequence alone holds; a pruned sequence never changes another
    sequence's table; every block's count equals the number of tables holding it; blocks are never lost.
    """

    BS = 4
    PREFIXES = [
        [],
        [1, 2, 3, 4, 5, 6, 7, 8, 9],
        [1, 2, 3, 4, 5, 6, 7, 8, 10, 11],
        [20, 21, 22, 23, 24, 25, 26, 27],
    ]

    def __init__(self) -> None:
        super().__init__()
        self.bm = BlockManager(num_blocks=40, block_size=self.BS)
        self.policies = {
            mode: PrunePolicy(block_size=self.BS, sink_tokens=4, mode=mode, obs_window=4)
            for mode in ("window", "snapkv")
        }
        self.policy = self.policies["window"]
        self.live: list[Sequence] = []
        self.count = 0

    @rule(prefix=st.sampled_from(range(4)), tail=st.lists(st.integers(30, 33), max_size=9),
          budget=st.sampled_from([0, 8, 12, 20]))  # fmt: skip
    def add(self, prefix: int, tail: list[int], budget: int) -> None:
        tokens = self.PREFIXES[prefix] + tail or [1]
        seq = make_seq(f"s{self.count}", tokens, budget)
        self.count += 1
        cached = len(self.bm.match_prefix(seq)) * self.BS
        first = len(seq) - cached
        if budget:
            first = min(first, self.policy.chunk_cap(budget), budget - cached)
        if not self.bm.can_allocate(seq, cached + first):
            return
        self.bm.allocate(seq, cached + first)
        self.live.append(seq)
        self._compute(seq, first)

    @rule(which=st.integers(0, 99), scores=st.lists(st.floats(0, 10), max_size=8))
    def score(self, which: int, scores: list[float]) -> None:
        """SnapKV scores of the kept blocks (as a scored prefill chunk leaves them)."""
        if self.live:
            seq = self.live[which % len(self.live)]
            seq.block_scores = scores[: len(seq.block_table)]

    @rule(which=st.integers(0, 99), new_token=st.integers(30, 33), snapkv=st.booleans())
    def grow(self, which: int, new_token: int, snapkv: bool) -> None:
        if not self.live:
            return
        seq = self.live[which % len(self.live)]
        if seq.num_uncomputed_tokens == 0:
            seq.token_ids.append(new_token)
        want = min(seq.num_uncomputed_tokens, 6)
        others = {s.seq_id: list(s.block_table) for s in self.live if s is not seq}
        before = list(seq.block_table)
        n = want
        if seq.kv_budget_tokens:
            n, evicted = self.policies["snapkv" if snapkv else "window"].fit(seq, want)
            assert seq.block_table[: self.policy.sink_blocks] == before[: self.policy.sink_blocks]
            for block_id in evicted:  # pruning drops a reference; a block still read keeps its count
                readers = sum(block_id in s.block_table for s in self.live if s is not seq)
                assert self.bm.blocks[block_id].ref_count == readers + 1
            self.bm.evict(seq, evicted)
        assert {s.seq_id: s.block_table for s in self.live if s is not seq} == others
        target = seq.num_computed_tokens + n
        if not self.bm.can_append(seq, target):
            return
        self.bm.ensure_slots(seq, target)
        self._compute(seq, n)

    @rule(which=st.integers(0, 99))
    def finish(self, which: int) -> None:
        if self.live:
            self.bm.free(self.live.pop(which % len(self.live)))

    def _compute(self, seq: Sequence, n: int) -> None:
        start = seq.num_computed_tokens
        self.bm.register_full_blocks(seq, start + n)
        for slot in self.bm.slot_mapping(seq, start, start + n):
            block = slot // self.BS
            assert block in seq.block_table and self.bm.blocks[block].ref_count == 1, (
                "write to a shared block"
            )
        seq.num_computed_tokens = start + n
        if seq.kv_budget_tokens:
            assert seq.kv_len(seq.num_computed_tokens) <= seq.kv_budget_tokens
            assert len(seq.block_table) <= self.policy.cap_blocks(seq.kv_budget_tokens)

    @invariant()
    def refcounts_balance(self) -> None:
        for block in self.bm.blocks:
            assert block.ref_count == sum(s.block_table.count(block.block_id) for s in self.live)
        held = {b for s in self.live for b in s.block_table}
        pool = set(self.bm.free_block_ids) | set(self.bm.evictable)
        assert not held & pool and len(held | pool) == self.bm.num_blocks

    def teardown(self) -> None:
        for seq in self.live:
            self.bm.free(seq)
        assert all(b.ref_count == 0 for b in self.bm.blocks)
        assert self.bm.num_free_blocks == self.bm.num_blocks


PruningUnderSharing.TestCase.settings = settings(
    max_examples=150, stateful_step_count=40, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
test_pruning_under_sharing = PruningUnderSharing.TestCase


def _dense_mask(visible: list[list[int]], length: int) -> torch.Tensor:
    mask = torch.full((1, 1, length, length), torch.finfo(torch.float32).min)
    for row, keys in enumerate(visible):
        mask[0, 0, row, keys] = 0.0
    return mask


def test_pruned_decode_matches_a_dense_model_with_the_same_visibility():
    """Window mode, block 4, sink 4, budget 16: the query at position p sees the sink block and every
    token from the first block not yet evicted; a dense forward with that mask per row (true positions)
    must reproduce the engine's greedy tokens, which checks positions, slots and context lengths."""
    loaded = random_causal_lm("tiny", device="cpu", dtype=torch.float32)
    engine = PagedEngine(
        loaded.model,
        loaded.tokenizer,
        engine_config(
            kv_cache_bytes=8 << 20,
            kv_block_size_tokens=4,
            kv_budget_tokens=16,
            kv_sink_tokens=4,
            attention_backend="torch",
        ),
    )
    prompt = [101, 7, 55, 300, 12, 9]  # within one chunk (chunk cap (16 - 4) / 2 = 6): no eviction in prefill
    engine.add_request(request("a", prompt, max_tokens=30, ignore_eos=True))
    tokens = collect(drain(engine)["a"])[0]
    seq_ids = prompt + tokens[:-1]
    visible: list[list[int]] = []
    for p in range(len(seq_ids)):
        if p < len(prompt):
            visible.append(list(range(p + 1)))
            continue
        evicted = max(0, math.ceil((p + 1 - 16) / 4))
        visible.append(list(range(4)) + list(range(4 * (1 + evicted), p + 1)))
    model = loaded.model
    previous = model.config._attn_implementation
    model.set_attn_implementation("sdpa")
    try:
        with torch.inference_mode():
            logits = model(
                input_ids=torch.tensor([seq_ids]), position_ids=torch.arange(len(seq_ids))[None],
                attention_mask=_dense_mask(visible, len(seq_ids)), use_cache=False,
            ).logits[0]  # fmt: skip
    finally:
        model.set_attn_implementation(previous)
    expected = logits[len(prompt) - 1 :].argmax(-1).tolist()
    assert tokens == expected


def test_budget_at_least_the_length_changes_nothing_and_prunes_raise_admissions():
    loaded = random_causal_lm("tiny", device="cpu", dtype=torch.float32)
    prompts = [list(range(100, 100 + n)) for n in (5, 23, 40)]
    results = {}
    for mode, budget in (("window", 0), ("window", 200), ("snapkv", 200)):
        engine = PagedEngine(
            loaded.model,
            loaded.tokenizer,
            engine_config(
                kv_cache_bytes=8 << 20,
                max_prefill_chunk_tokens=16,
                kv_budget_tokens=budget,
                kv_prune_mode=mode,
            ),
        )
        for i, prompt in enumerate(prompts):
            engine.add_request(request(f"t{i}", prompt, max_tokens=12, ignore_eos=True))
        results[(mode, budget)] = {rid: collect(outs)[0] for rid, outs in drain(engine).items()}
    assert results[("window", 200)] == results[("window", 0)] == results[("snapkv", 200)]


@pytest.mark.parametrize("mode", ["window", "snapkv"])
def test_pruning_with_int8_kv_and_prefix_sharing_leaves_the_pool_as_it_found_it(mode: str):
    loaded = random_causal_lm("tiny", device="cpu", dtype=torch.float32)
    engine = PagedEngine(
        loaded.model,
        loaded.tokenizer,
        engine_config(
            kv_cache_bytes=4 << 20,
            max_prefill_chunk_tokens=32,
            kv_dtype="int8",
            kv_budget_tokens=48,
            kv_prune_mode=mode,
        ),
    )
    free_before = engine.block_manager.num_free_blocks
    shared = list(range(200, 240))
    # An unpruned reader of the shared prefix runs next to pruned sequences that share it.
    reader = request("reader", shared + [1, 2], max_tokens=40, ignore_eos=True)
    reader.kv_budget_tokens = 0  # overrides the engine's default budget
    engine.add_request(reader)
    engine.step()
    for i in range(3):
        req = request(f"p{i}", shared + [3 + i] * 5, max_tokens=60, ignore_eos=True)
        req.kv_budget_tokens = 48 if i else None
        engine.add_request(req)
    outputs = drain(engine)
    finals = {rid: next(o for o in outs if o.finished) for rid, outs in outputs.items()}
    assert finals["reader"].kv_evicted_tokens == 0 and finals["reader"].kv_dtype == "int8"
    for i in range(3):
        final = finals[f"p{i}"]
        assert final.kv_peak_tokens <= 48 and final.kv_evicted_tokens > 0 and final.completion_tokens == 60
    assert all(b.ref_count == 0 for b in engine.block_manager.blocks)
    assert engine.block_manager.num_free_blocks == free_before


@pytest.mark.skipif(not kernels_usable(torch.device("cpu")), reason="needs TRITON_INTERPRET=1")
@pytest.mark.parametrize("kv_dtype", ["auto", "int8"])
def test_triton_kernels_read_the_pruned_block_tables_like_the_reference(kv_dtype: str):
    loaded = random_causal_lm("tiny", device="cpu", dtype=torch.float32)
    results = {}
    for backend in ("torch", "triton"):
        engine = PagedEngine(
            loaded.model,
            loaded.tokenizer,
            engine_config(
                kv_cache_bytes=4 << 20,
                max_prefill_chunk_tokens=32,
                kv_budget_tokens=32,
                kv_prune_mode="snapkv",
                attention_backend=backend,
                kv_dtype=kv_dtype,
            ),
        )
        engine.add_request(request("a", list(range(100, 150)), max_tokens=24, ignore_eos=True))
        engine.add_request(request("b", list(range(300, 310)), max_tokens=40, ignore_eos=True))
        results[backend] = {rid: collect(outs)[0] for rid, outs in drain(engine).items()}
    assert results["triton"] == results["torch"]


def _distinct(ids: list[int], n: int = 4) -> float:
    grams = [tuple(ids[i : i + n]) for i in range(len(ids) - n + 1)]
    return len(set(grams)) / max(len(grams), 1)


@pytest.mark.model
@pytest.mark.parametrize(("mode", "kv_dtype"), [("window", "auto"), ("snapkv", "int8")])
def test_generating_four_times_past_the_budget_stays_coherent(smol: LoadedModel, mode: str, kv_dtype: str):
    engine = PagedEngine(
        smol.model,
        smol.tokenizer,
        engine_config(kv_cache_bytes=16 << 20, kv_budget_tokens=64, kv_prune_mode=mode, kv_dtype=kv_dtype),
    )
    free_before = engine.block_manager.num_free_blocks
    finite: list[bool] = []
    handle = smol.model.lm_head.register_forward_hook(
        lambda _m, _i, out: finite.append(bool(torch.isfinite(out).all()))
    )
    try:
        ids = engine.encode_chat(
            [{"role": "user", "content": "Tell me a long story about a dragon who learns to cook."}]
        )
        engine.add_request(request("long", ids, max_tokens=256, ignore_eos=True))
        outputs = drain(engine)["long"]
    finally:
        handle.remove()
    tokens, _text = collect(outputs)
    final = outputs[-1]
    assert len(tokens) == 256 and all(finite) and len(finite) >= 256
    assert final.kv_peak_tokens <= 64 and final.kv_evicted_tokens >= len(ids) + 256 - 64 - 16
    assert _distinct(tokens) > 0.5  # not stuck repeating a few tokens
    assert all(b.ref_count == 0 for b in engine.block_manager.blocks)
    assert engine.block_manager.num_free_blocks == free_before


@pytest.mark.timeout(120)
@pytest.mark.parametrize("budget", ['"64"', "64.5", "true", "-1", "8", "2000000"])
def test_bad_kv_budget_is_an_invalid_request(start_worker, redis_client, prefix: str, budget: str) -> None:
    start_worker("echo")
    rid = "kvb-" + "".join(c for c in budget if c.isalnum())
    body = f'{{"id": "{rid}", "prompt": "x y", "max_tokens": 2, "kv_budget_tokens": {budget}}}'
    good = json.dumps({"id": rid + "-ok", "prompt": "x y", "max_tokens": 2, "kv_budget_tokens": 64})
    redis_client.xadd(f"{prefix}:requests", {"v": "1", "ct": "json", "body": body})
    redis_client.xadd(f"{prefix}:requests", {"v": "1", "ct": "json", "body": good})
    finals = {}
    for key in (rid, rid + "-ok"):
        got = redis_client.xread({f"{prefix}:reply:{key}": "0"}, block=20_000)
        while got:
            last = json.loads(got[0][1][-1][1][b"body"])
            if last["type"] in ("done", "error"):
                break
            got = redis_client.xread({f"{prefix}:reply:{key}": got[0][1][-1][0]}, block=20_000)
        finals[key] = last
    assert finals[rid]["type"] == "error" and finals[rid]["code"] == "invalid_request", finals[rid]
    assert finals[rid + "-ok"]["type"] == "done"
