"""The iteration scheduler without a model: token budget, chunking, KV modes, preemption, cancellation."""

from __future__ import annotations

import dataclasses

from hypothesis import given, settings
from hypothesis import strategies as st

from scheduler import BatchPolicy
from worker.engine.base import GenerationRequest, SamplingParams
from worker.engine.block_manager import BlockManager
from worker.engine.sequence import Sequence
from worker.engine.step_scheduler import StepScheduler


def make_seq(seq_id: str, prompt_len: int, max_tokens: int, arrival_s: float = 0.0) -> Sequence:
    prompt = [(7 * i) % 50 for i in range(prompt_len)]  # common prefix across requests: sharing happens
    return Sequence(GenerationRequest(seq_id, prompt, SamplingParams(max_tokens=max_tokens), arrival_s))


def run_step(sched: StepScheduler, now: float = 0.0) -> tuple[int, list[Sequence]]:
    """Plan one step and play the model's part: every completed sequence samples token 1."""
    plan = sched.schedule(now)
    finished = plan.expired + plan.rejected + plan.cache_full
    for seq in plan.cache_full:
        sched.finish(seq)
    for item in plan.scheduled:
        assert item.num_tokens >= 1
        item.seq.num_computed_tokens = item.start + item.num_tokens
        if item.completes:
            item.seq.append_token(1)
            if item.seq.num_completion_tokens >= item.seq.sampling.max_tokens:
                sched.finish(item.seq)
                finished.append(item.seq)
    return sum(item.num_tokens for item in plan.scheduled), finished


def test_long_prompt_is_chunked_while_others_keep_decoding():
    policy = BatchPolicy(max_batch_tokens=64, max_prefill_chunk_tokens=32, max_wait_ms=0)
    sched = StepScheduler(policy, BlockManager(num_blocks=64, block_size=16))
    short = make_seq("short", 8, 50)
    sched.add(short)
    run_step(sched)
    sched.add(make_seq("long", 300, 4))
    for _ in range(12):
        plan = sched.schedule(0.0)
        assert sum(i.num_tokens for i in plan.scheduled) <= 64
        assert any(i.seq is short and i.num_tokens == 1 for i in plan.scheduled)  # never stalled
        assert all(i.num_tokens <= 32 for i in plan.scheduled)
        for item in plan.scheduled:
            item.seq.num_computed_tokens = item.start + item.num_tokens
            if item.completes:
                item.seq.append_token(1)


def test_worst_case_reserves_and_optimistic_preempts():
    for mode in ("worst_case", "optimistic"):
        policy = BatchPolicy(max_batch_tokens=256, max_wait_ms=0, kv_reserve=mode)
        sched = StepScheduler(policy, BlockManager(num_blocks=6, block_size=4, enable_prefix_caching=False))
        for i in range(3):
            sched.add(make_seq(f"r{i}", 6, 8))
        first = sched.schedule(0.0)
        # Worst case: 6 + 8 - 1 = 13 tokens = 4 blocks each, so one at a time; optimistic packs all three.
        assert len(first.scheduled) == (1 if mode == "worst_case" else 3)


@settings(max_examples=60, deadline=None)
@given(
    jobs=st.lists(
        st.tuples(st.integers(1, 70), st.integers(1, 12), st.integers(0, 6)), min_size=1, max_size=12
    ),
    optimistic=st.booleans(),
    prefix_caching=st.booleans(),
    cancel_every=st.integers(0, 7),
)
def test_random_traffic_finishes_and_returns_every_block(
    jobs: list[tuple[int, int, int]], optimistic: bool, prefix_caching: bool, cancel_every: int
):
    policy = BatchPolicy(
        max_batch_tokens=48, max_num_seqs=5, max_prefill_chunk_tokens=16, max_wait_ms=0,
        kv_reserve="optimistic" if optimistic else "worst_case",
    )  # fmt: skip
    bm = BlockManager(num_blocks=24, block_size=4, enable_prefix_caching=prefix_caching)
    sched = StepScheduler(policy, bm)
    pending = sorted(((arrive, f"r{i}", p, m) for i, (p, m, arrive) in enumerate(jobs)), reverse=True)
    seqs: dict[str, Sequence] = {}
    done: set[str] = set()
    for step in range(2000):
        while pending and pending[-1][0] <= step:
            _, rid, prompt_len, max_tokens = pending.pop()
            seqs[rid] = make_seq(rid, prompt_len, max_tokens, arrival_s=step)
            sched.add(seqs[rid])
        if cancel_every and step % cancel_every == cancel_every - 1 and sched.running:
            victim = sched.running[-1]
            sched.finish(victim)
            done.add(victim.seq_id)
        tokens, finished = run_step(sched, now=float(step))
        assert tokens <= policy.max_batch_tokens
        assert len(sched.running) <= policy.max_num_seqs
        done.update(s.seq_id for s in finished)
        assert all(b.ref_count >= 0 for b in bm.blocks)
        if not pending and not sched.has_unfinished():
            break
    assert done == set(seqs)
    assert bm.num_free_blocks == bm.num_blocks
    for seq in seqs.values():  # everything that fits the cache ran to max_tokens
        fits = bm.blocks_for(seq.max_total_tokens) <= bm.num_blocks
        if not cancel_every and fits:
            assert seq.num_completion_tokens == seq.sampling.max_tokens


def test_with_every_slot_taken_the_expired_and_the_too_large_still_leave_at_once():
    """The step does not walk the queue when no slot is free, yet a request deep in it whose deadline
    passed, or that can never fit, is reported in the same step (preempted ones are checked again)."""
    policy = BatchPolicy(max_batch_tokens=512, max_wait_ms=0, max_num_seqs=2)
    sched = StepScheduler(policy, BlockManager(num_blocks=200, block_size=16))
    for i in range(2):
        sched.add(make_seq(f"run{i}", 8, 1000))
    run_step(sched, now=1.0)
    assert len(sched.running) == 2
    for i in range(50):
        sched.add(make_seq(f"wait{i}", 8, 20))
    late = make_seq("late", 8, 20)
    late.request = dataclasses.replace(late.request, deadline_s=5.0)
    sched.add(late)
    huge = make_seq("huge", 8, 200 * 16)  # prompt + max_tokens beyond the whole pool
    sched.add(huge)
    plan = sched.schedule(2.0)
    assert plan.rejected == [huge] and not plan.expired and huge not in sched.waiting
    assert late in sched.waiting
    plan = sched.schedule(5.0)
    assert plan.expired == [late] and late not in sched.waiting
    assert len(sched.waiting) == 50 and len(sched.running) == 2
