"""Properties and examples for the pure microbatch admission policy."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from scheduler import (
    Admission,
    ArrivalGap,
    BatchPolicy,
    Priority,
    RunningState,
    WaitingRequest,
    defer_prefill,
    effective_priority,
    kv_tokens_needed,
    prefill_chunk,
    select_admissions,
    service_order,
)


@dataclass(frozen=True)
class Scenario:
    waiting: list[WaitingRequest]
    running: RunningState
    policy: BatchPolicy
    now: float
    kv_capacity_tokens: int | None

    def decide(self) -> Admission:
        return select_admissions(self.waiting, self.running, self.policy, self.now, self.kv_capacity_tokens)


# Small limits and a narrow clock range so budgets, seq caps, KV and the time window all bind often.
policies = st.builds(
    BatchPolicy,
    max_wait_ms=st.sampled_from([0.0, 5.0, 10.0, 30.0]),
    max_batch_tokens=st.integers(1, 300) | st.integers(1, 2000),
    max_num_seqs=st.integers(1, 16),
    max_prefill_chunk_tokens=st.integers(1, 400),
    kv_reserve=st.sampled_from(["worst_case", "optimistic"]),
    max_waiting_steps=st.integers(0, 6),
)


@st.composite
def requests(draw: st.DrawFn) -> WaitingRequest:
    prompt = draw(st.integers(0, 40) | st.integers(0, 900))  # a mix of short chats and long prompts
    arrival_ms = draw(st.integers(0, 20))
    return WaitingRequest(
        seq_id="",
        arrival_s=arrival_ms / 1000.0,
        prompt_tokens=prompt,
        max_tokens=draw(st.integers(0, 300)),
        priority=draw(st.sampled_from(Priority)),
        deadline_s=draw(st.none() | st.integers(0, 100).map(lambda ms: (arrival_ms + ms) / 1000.0)),
        cached_tokens=draw(st.integers(0, prompt)),
        waited_steps=draw(st.integers(0, 8)),
    )


# Unique ids, as the queue guarantees.
waiting_lists = st.lists(requests(), max_size=12).map(
    lambda rs: [replace(r, seq_id=f"r{i:02d}") for i, r in enumerate(rs)]
)


@st.composite
def scenarios(draw: st.DrawFn) -> Scenario:
    waiting = draw(waiting_lists)
    num_seqs = draw(st.just(0) | st.integers(1, 8))  # half the time idle, where the time window applies
    free_kv = draw(st.none() | st.integers(0, 2500))
    running = RunningState(
        num_seqs=num_seqs, decode_tokens=draw(st.integers(0, num_seqs)), free_kv_tokens=free_kv
    )
    capacity = draw(st.none() | st.integers(0, 2000).map(lambda extra: (free_kv or 0) + extra))
    # Requests arrive before `now`, as in the queue; offsets up to 40 ms put `now` either side of the window.
    latest_arrival = max((r.arrival_s for r in waiting), default=0.0)
    now = latest_arrival + draw(st.integers(0, 5) | st.integers(0, 40)) / 1000.0
    return Scenario(waiting, running, draw(policies), now, capacity)


def eligible_in_order(s: Scenario) -> list[WaitingRequest]:
    """Service order minus expired and too-large requests: what admission walks."""
    return [
        r
        for r in service_order(s.waiting, s.policy)
        if not (r.deadline_s is not None and r.deadline_s <= s.now)
        and not (s.kv_capacity_tokens is not None and kv_tokens_needed(r, s.policy) > s.kv_capacity_tokens)
    ]


def uncached(r: WaitingRequest) -> int:
    return max(1, r.prompt_tokens - r.cached_tokens)


def fits_next(r: WaitingRequest, s: Scenario, admitted: list[WaitingRequest], chunks: list[int]) -> bool:
    """Whether `r` could join a step that has already admitted `admitted` with first chunks `chunks`."""
    budget_left = s.policy.max_batch_tokens - s.running.decode_tokens - sum(chunks)
    if s.running.num_seqs + len(admitted) + 1 > s.policy.max_num_seqs:
        return False
    if s.running.free_kv_tokens is not None:
        used = sum(kv_tokens_needed(a, s.policy) for a in admitted)
        if used + kv_tokens_needed(r, s.policy) > s.running.free_kv_tokens:
            return False
    chunk = prefill_chunk(uncached(r), budget_left, s.policy)
    full = min(uncached(r), s.policy.max_prefill_chunk_tokens)
    return chunk == full or (not admitted and chunk >= 1)


def window_end(s: Scenario) -> float | None:
    eligible = eligible_in_order(s)
    if not eligible:
        return None
    return min(r.arrival_s for r in eligible) + s.policy.max_wait_ms / 1000.0


# ---- properties ----------------------------------------------------------------------------------------


@settings(max_examples=100, deadline=None)
@given(scenarios())
def test_partition_expired_and_too_large(s: Scenario) -> None:
    a = s.decide()
    ids = [r.seq_id for r in a.admitted + a.expired + a.too_large]
    assert len(ids) == len(set(ids))
    assert set(ids) <= {r.seq_id for r in s.waiting}
    expected_expired = {r.seq_id for r in s.waiting if r.deadline_s is not None and r.deadline_s <= s.now}
    assert {r.seq_id for r in a.expired} == expected_expired
    for r in a.admitted:
        assert r.deadline_s is None or r.deadline_s > s.now
    expected_too_large = {
        r.seq_id
        for r in s.waiting
        if r.seq_id not in expected_expired
        and s.kv_capacity_tokens is not None
        and kv_tokens_needed(r, s.policy) > s.kv_capacity_tokens
    }
    assert {r.seq_id for r in a.too_large} == expected_too_large


@settings(max_examples=100, deadline=None)
@given(scenarios())
def test_budget_seq_cap_and_kv_never_exceeded(s: Scenario) -> None:
    a = s.decide()
    assert len(a.prefill_tokens) == len(a.admitted)
    assert all(c >= 1 for c in a.prefill_tokens)
    assert sum(a.prefill_tokens) + s.running.decode_tokens <= s.policy.max_batch_tokens or not a.admitted
    assert s.running.num_seqs + len(a.admitted) <= s.policy.max_num_seqs or not a.admitted
    if s.running.free_kv_tokens is not None:
        assert sum(kv_tokens_needed(r, s.policy) for r in a.admitted) <= s.running.free_kv_tokens
    # Each chunk is what the budget walk gives it: full, or partial only for the first admission.
    budget_left = s.policy.max_batch_tokens - s.running.decode_tokens
    for i, (r, c) in enumerate(zip(a.admitted, a.prefill_tokens, strict=True)):
        assert c == prefill_chunk(uncached(r), budget_left, s.policy)
        assert c == min(uncached(r), s.policy.max_prefill_chunk_tokens) or i == 0
        budget_left -= c


@settings(max_examples=100, deadline=None)
@given(scenarios())
def test_fifo_within_priority_and_head_of_line_blocking(s: Scenario) -> None:
    a = s.decide()
    eligible = eligible_in_order(s)
    # Admission is a prefix of the eligible service order: nothing is skipped to admit a later request.
    assert list(a.admitted) == eligible[: len(a.admitted)]
    admitted_ids = {r.seq_id for r in a.admitted}
    for cls in Priority:
        in_class = [r for r in a.admitted if effective_priority(r, s.policy) == cls]
        assert [r.arrival_s for r in in_class] == sorted(r.arrival_s for r in in_class)
        for adm in in_class:
            for e in eligible:
                earlier = (e.arrival_s, e.seq_id) < (adm.arrival_s, adm.seq_id)
                if effective_priority(e, s.policy) == cls and earlier:
                    assert e.seq_id in admitted_ids
    # The prefix is maximal: unless the window holds, the first eligible request left out does not fit.
    if a.wake_at_s is None and len(a.admitted) < len(eligible):
        nxt = eligible[len(a.admitted)]
        assert not fits_next(nxt, s, list(a.admitted), list(a.prefill_tokens))


@settings(max_examples=100, deadline=None)
@given(scenarios())
def test_nothing_waits_longer_than_the_window(s: Scenario) -> None:
    a = s.decide()
    eligible = eligible_in_order(s)
    end = window_end(s)
    if a.wake_at_s is not None:
        # A hold: only an idle engine, nothing admitted, and the wake-up is the end of the oldest's window.
        assert s.running.num_seqs == 0 and not a.admitted
        assert end is not None and a.wake_at_s == end and a.wake_at_s > s.now
        # ...and only while waiting could still grow the step and no deadline falls inside the window.
        budget = s.policy.max_batch_tokens - s.running.decode_tokens
        assert sum(min(uncached(r), s.policy.max_prefill_chunk_tokens) for r in eligible) < budget
        assert len(eligible) < s.policy.max_num_seqs
        if s.running.free_kv_tokens is not None:
            assert sum(kv_tokens_needed(r, s.policy) for r in eligible) < s.running.free_kv_tokens
        assert all(r.deadline_s is None or r.deadline_s > end for r in eligible)
        return
    if end is not None and (s.now >= end or s.running.num_seqs > 0) and fits_next(eligible[0], s, [], []):
        assert a.admitted and a.admitted[0] == eligible[0]


@settings(max_examples=100, deadline=None)
@given(waiting_lists, policies)
def test_service_order_with_aging(waiting: list[WaitingRequest], policy: BatchPolicy) -> None:
    order = service_order(waiting, policy)
    assert sorted(r.seq_id for r in order) == sorted(r.seq_id for r in waiting)
    keys = [(effective_priority(r, policy), r.arrival_s, r.seq_id) for r in order]
    assert keys == sorted(keys)
    aged = [i for i, r in enumerate(order) if r.waited_steps >= policy.max_waiting_steps]
    unaged_batch = [
        i
        for i, r in enumerate(order)
        if r.priority == Priority.BATCH and r.waited_steps < policy.max_waiting_steps
    ]
    # Every promoted request is served before every BATCH request that has not aged yet.
    assert all(i < j for i in aged for j in unaged_batch)


# ---- examples ------------------------------------------------------------------------------------------


def req(
    rid: str, arrival_s: float = 0.0, prompt: int = 10, max_tokens: int = 10, **kw: Any
) -> WaitingRequest:
    return WaitingRequest(rid, arrival_s, prompt, max_tokens, **kw)


IDLE = RunningState()


def test_idle_engine_holds_small_batch_until_window_closes() -> None:
    policy = BatchPolicy(max_wait_ms=10.0)
    waiting = [req("a", 1.000), req("b", 1.004)]
    held = select_admissions(waiting, IDLE, policy, now=1.006)
    assert held.admitted == () and held.wake_at_s is not None and held.wake_at_s == pytest.approx(1.010)
    # Just before the window closes it still holds; at the wake-up time it releases.
    assert select_admissions(waiting, IDLE, policy, now=held.wake_at_s - 1e-6).admitted == ()
    released = select_admissions(waiting, IDLE, policy, now=held.wake_at_s)
    assert [r.seq_id for r in released.admitted] == ["a", "b"] and released.wake_at_s is None


def test_full_batch_goes_at_once() -> None:
    by_seqs = select_admissions([req("a"), req("b")], IDLE, BatchPolicy(max_num_seqs=2), now=0.0)
    assert len(by_seqs.admitted) == 2 and by_seqs.wake_at_s is None
    policy = BatchPolicy(max_batch_tokens=100, max_prefill_chunk_tokens=100)
    by_tokens = select_admissions([req("a", prompt=60), req("b", prompt=60)], IDLE, policy, now=0.0)
    assert [r.seq_id for r in by_tokens.admitted] == ["a"] and by_tokens.prefill_tokens == (60,)


def test_step_filled_exactly_goes_at_once() -> None:
    policy = BatchPolicy(max_batch_tokens=100, max_prefill_chunk_tokens=100)
    exact = select_admissions([req("a", prompt=60), req("b", prompt=40)], IDLE, policy, now=0.0)
    assert len(exact.admitted) == 2 and exact.prefill_tokens == (60, 40)
    short = select_admissions([req("a", prompt=60), req("b", prompt=39)], IDLE, policy, now=0.0)
    assert short.admitted == () and short.wake_at_s == pytest.approx(0.010)


def test_kv_fills_up_across_admissions() -> None:
    running = RunningState(num_seqs=1, decode_tokens=1, free_kv_tokens=45)
    waiting = [req("a", 0.0, prompt=10, max_tokens=10), req("b", 0.1), req("c", 0.2)]
    a = select_admissions(waiting, running, BatchPolicy(), now=1.0)
    assert [r.seq_id for r in a.admitted] == ["a", "b"]


def test_busy_engine_admits_immediately() -> None:
    a = select_admissions([req("a")], RunningState(num_seqs=3, decode_tokens=3), BatchPolicy(), now=0.0)
    assert [r.seq_id for r in a.admitted] == ["a"] and a.wake_at_s is None


def test_long_prompt_is_chunked() -> None:
    policy = BatchPolicy(max_wait_ms=0.0, max_batch_tokens=4096, max_prefill_chunk_tokens=512)
    a = select_admissions([req("long", prompt=2000)], IDLE, policy, now=0.0)
    assert a.prefill_tokens == (512,)
    # With decode eating most of the budget, the first admission takes what is left; the next waits.
    busy = RunningState(num_seqs=20, decode_tokens=4000)
    b = select_admissions([req("long", prompt=2000), req("short", prompt=5)], busy, policy, now=0.0)
    assert [r.seq_id for r in b.admitted] == ["long"] and b.prefill_tokens == (96,)


def test_fully_cached_prompt_costs_one_token() -> None:
    a = select_admissions([req("c", prompt=300, cached_tokens=300)], IDLE, BatchPolicy(max_wait_ms=0), 0.0)
    assert a.prefill_tokens == (1,)


def test_head_of_line_blocks_smaller_requests_behind_it() -> None:
    running = RunningState(num_seqs=1, decode_tokens=1, free_kv_tokens=500)
    waiting = [req("big", 0.0, prompt=400, max_tokens=400), req("small", 0.001)]
    a = select_admissions(waiting, running, BatchPolicy(), now=0.01, kv_capacity_tokens=2000)
    assert a.admitted == () and a.too_large == () and a.wake_at_s is None


def test_budget_blocks_at_first_request_that_does_not_fit() -> None:
    policy = BatchPolicy(max_wait_ms=0, max_batch_tokens=100, max_prefill_chunk_tokens=100)
    waiting = [req("a", 0.0, prompt=60), req("b", 0.001, prompt=60), req("c", 0.002, prompt=10)]
    a = select_admissions(waiting, IDLE, policy, now=0.01)
    assert [r.seq_id for r in a.admitted] == ["a"]


def test_idle_engine_goes_at_once_when_kv_is_full() -> None:
    running = RunningState(free_kv_tokens=40)
    a = select_admissions([req("a", prompt=10, max_tokens=10), req("b")], running, BatchPolicy(), now=0.0)
    assert len(a.admitted) == 2 and a.wake_at_s is None


def test_too_large_is_reported_and_skipped() -> None:
    waiting = [req("huge", 0.0, prompt=2000, max_tokens=49), req("ok", 0.001, prompt=2000, max_tokens=48)]
    a = select_admissions(waiting, IDLE, BatchPolicy(max_wait_ms=0), now=0.01, kv_capacity_tokens=2048)
    assert [r.seq_id for r in a.too_large] == ["huge"]
    assert [r.seq_id for r in a.admitted] == ["ok"]


def test_expired_never_admitted() -> None:
    waiting = [req("late", 0.0, deadline_s=0.5), req("ok", 0.1, deadline_s=2.0)]
    a = select_admissions(waiting, IDLE, BatchPolicy(max_wait_ms=0), now=0.5)
    assert [r.seq_id for r in a.expired] == ["late"] and [r.seq_id for r in a.admitted] == ["ok"]


def test_window_does_not_hold_past_a_deadline() -> None:
    policy = BatchPolicy(max_wait_ms=10)
    at_window_end = select_admissions([req("a", 0.0, deadline_s=0.010)], IDLE, policy, now=0.001)
    assert [r.seq_id for r in at_window_end.admitted] == ["a"] and at_window_end.wake_at_s is None
    after_window = select_admissions([req("a", 0.0, deadline_s=0.011)], IDLE, policy, now=0.001)
    assert after_window.admitted == () and after_window.wake_at_s == pytest.approx(0.010)


def test_aging_promotes_batch_requests() -> None:
    policy = BatchPolicy(max_waiting_steps=3, max_num_seqs=1, max_wait_ms=0)
    old_batch = req("old-batch", 0.0, priority=Priority.BATCH, waited_steps=3)
    young_batch = req("young-batch", 0.0, priority=Priority.BATCH, waited_steps=2)
    interactive = req("interactive", 0.5)
    waiting = [interactive, young_batch, old_batch]
    assert service_order(waiting, policy) == [old_batch, interactive, young_batch]
    a = select_admissions(waiting, IDLE, policy, now=1.0)
    assert a.admitted == (old_batch,)


def test_kv_tokens_needed_by_reserve_mode() -> None:
    r = req("a", prompt=100, max_tokens=50)
    assert kv_tokens_needed(r, BatchPolicy(kv_reserve="worst_case")) == 150
    assert kv_tokens_needed(r, BatchPolicy(kv_reserve="optimistic")) == 101


def test_invalid_inputs_rejected() -> None:
    with pytest.raises(ValueError):
        req("a", prompt=10, cached_tokens=11)
    with pytest.raises(ValueError):
        BatchPolicy(max_batch_tokens=0)


def test_decoding_engine_batches_prefills_until_they_fill_the_step_or_the_interval_ends() -> None:
    policy = BatchPolicy(
        max_batch_tokens=1000, max_num_seqs=8, max_prefill_chunk_tokens=512, prefill_interval_steps=4
    )
    decoding = RunningState(num_seqs=6, decode_tokens=6, steps_since_prefill=1)
    small = [req("a", prompt=100), req("b", prompt=100), req("c", prompt=900)]
    # Two free slots hold 200 prompt tokens, far from the 994-token budget: the graph decode step runs alone.
    assert defer_prefill(small, decoding, policy)
    assert select_admissions(small, decoding, policy, now=0.0).admitted == ()
    # After the interval, or with a prefill already in the step, or on an idle engine, they join.
    assert not defer_prefill(small, replace(decoding, steps_since_prefill=4), policy)
    assert not defer_prefill(small, replace(decoding, prefill_tokens=50), policy)
    assert not defer_prefill(small, RunningState(), policy)
    assert [r.seq_id for r in select_admissions(small, replace(decoding, steps_since_prefill=4), policy,
                                                     now=0.0).admitted] == ["a", "b"]  # fmt: skip
    # Enough joinable work to fill the step goes at once.
    big = [req("x", prompt=600), req("y", prompt=600)]
    assert not defer_prefill(big, decoding, policy)
    # Off by default.
    assert not defer_prefill(small, decoding, replace(policy, prefill_interval_steps=0))


def test_window_holds_only_while_another_request_is_due() -> None:
    policy = BatchPolicy(max_wait_ms=10.0)
    lone = [req("a", 1.000)]
    # The next request is expected after the window ends: holding would only add latency.
    quiet = select_admissions(lone, IDLE, policy, now=1.001, next_arrival_s=1.500)
    assert [r.seq_id for r in quiet.admitted] == ["a"] and quiet.wake_at_s is None
    # Expected inside the window: hold until it ends (never past it).
    busy = select_admissions(lone, IDLE, policy, now=1.001, next_arrival_s=1.004)
    assert busy.admitted == () and busy.wake_at_s == pytest.approx(1.010)
    # No estimate yet: the window holds as configured.
    unknown = select_admissions(lone, IDLE, policy, now=1.001)
    assert unknown.admitted == () and unknown.wake_at_s == pytest.approx(1.010)


def test_arrival_gap_tracks_bursts_and_quiet_spells() -> None:
    gap = ArrivalGap(weight=0.5)
    assert gap.next_arrival_s(now=0.0) is None
    gap.observe(1.0)
    assert gap.next_arrival_s(now=1.0) is None  # one arrival gives no gap
    gap.observe(1.2)
    assert gap.mean_gap_s == pytest.approx(0.2) and gap.next_arrival_s(now=1.2) == pytest.approx(1.4)
    for t in (1.2, 1.2, 1.2):  # a backlog read at once: gaps of zero pull the mean down
        gap.observe(t)
    assert gap.mean_gap_s == pytest.approx(0.025)
    # A silence longer than the mean counts as a gap of its own length.
    assert gap.next_arrival_s(now=3.2) == pytest.approx(5.2)
    gap.observe(1.1)  # out of order by a little: never moves the last arrival back
    assert gap.last_arrival_s == pytest.approx(1.2)
