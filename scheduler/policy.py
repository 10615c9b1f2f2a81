"""Microbatch admission: which waiting requests join the engine's next step.

Pure functions over the plain data in `scheduler.types`; the caller reads the clock and passes `now`,
so every decision is reproducible in tests.
"""

from __future__ import annotations

from collections.abc import Sequence

from scheduler.types import Admission, BatchPolicy, Priority, RunningState, WaitingRequest


def kv_tokens_needed(req: WaitingRequest, policy: BatchPolicy) -> int:
    """KV tokens reserved at admission: prompt + max_tokens (worst_case) or prompt + 1 (optimistic)."""
    return kv_tokens_for(req.prompt_tokens, req.max_tokens, policy)


def kv_tokens_for(prompt_tokens: int, max_tokens: int, policy: BatchPolicy) -> int:
    """`kv_tokens_needed` from the two numbers, for callers that have no WaitingRequest at hand."""
    # Cached prefix tokens still occupy KV slots in the sequence's block table, so they count here.
    if policy.kv_reserve == "worst_case":
        return prompt_tokens + max_tokens
    # Optimistic still needs the slot of the first sampled token; later growth is covered by preemption.
    return prompt_tokens + 1


def effective_priority(req: WaitingRequest, policy: BatchPolicy) -> Priority:
    """The request's class after aging: passed over `max_waiting_steps` times, it is served as INTERACTIVE."""
    if req.waited_steps >= policy.max_waiting_steps:
        return Priority.INTERACTIVE
    return req.priority


def service_order(waiting: Sequence[WaitingRequest], policy: BatchPolicy) -> list[WaitingRequest]:
    """Sort by effective priority, then arrival (FIFO), then seq_id so ties are deterministic."""
    return sorted(waiting, key=lambda r: (effective_priority(r, policy), r.arrival_s, r.seq_id))


def prefill_chunk(remaining_prompt_tokens: int, budget_left: int, policy: BatchPolicy) -> int:
    """Prefill tokens one sequence computes this step: min(remaining, chunk cap, budget left), never < 0."""
    return max(0, min(remaining_prompt_tokens, policy.max_prefill_chunk_tokens, budget_left))


def _tokens_to_prefill(req: WaitingRequest) -> int:
    # Even a fully cached prompt recomputes its last token: its logits give the first output token.
    return max(1, req.prompt_tokens - req.cached_tokens)


def _full_first_chunk(req: WaitingRequest, policy: BatchPolicy) -> int:
    return min(_tokens_to_prefill(req), policy.max_prefill_chunk_tokens)


def _hold_until(
    eligible: Sequence[WaitingRequest],
    running: RunningState,
    policy: BatchPolicy,
    now: float,
    next_arrival_s: float | None,
) -> float | None:
    """End of the time window if an idle engine should keep waiting for more requests, else None."""
    if running.num_seqs > 0 or not eligible:
        # Continuous batching: a busy engine runs a step anyway, so joining it costs no extra wait.
        return None
    budget = policy.max_batch_tokens - running.decode_tokens
    fills_budget = sum(_full_first_chunk(r, policy) for r in eligible) >= budget
    fills_seqs = len(eligible) >= policy.max_num_seqs - running.num_seqs
    fills_kv = (
        running.free_kv_tokens is not None
        and sum(kv_tokens_needed(r, policy) for r in eligible) >= running.free_kv_tokens
    )
    if fills_budget or fills_seqs or fills_kv:
        return None  # waiting cannot make this step any bigger
    window_end = min(r.arrival_s for r in eligible) + policy.max_wait_ms / 1000.0
    # Compared as `now < window_end` (not `now - arrival < window`) so a hold always wakes strictly later.
    if now >= window_end:
        return None
    # Holding must not be what makes a request miss its deadline.
    if any(r.deadline_s is not None and r.deadline_s <= window_end for r in eligible):
        return None
    # Hold only while another request is due inside the window (see scheduler.arrivals).
    if next_arrival_s is not None and next_arrival_s >= window_end:
        return None
    return window_end


def defer_prefill(eligible: Sequence[WaitingRequest], running: RunningState, policy: BatchPolicy) -> bool:
    """True if a decoding engine should run this step without admitting anyone (prefill batching).

    Never when the rule is off, the engine is idle, the step already has a prefill chunk, or
    `prefill_interval_steps` prefill-free steps have passed; otherwise only while the requests that
    could join now (up to the free sequence slots) would not fill the step's token budget.
    """
    if policy.prefill_interval_steps == 0 or running.num_seqs == 0 or not eligible:
        return False
    if running.prefill_tokens > 0 or running.steps_since_prefill >= policy.prefill_interval_steps:
        return False
    slots = policy.max_num_seqs - running.num_seqs
    joinable = sum(_full_first_chunk(r, policy) for r in eligible[: max(slots, 0)])
    return joinable < policy.max_batch_tokens - running.decode_tokens


def select_admissions(
    waiting: Sequence[WaitingRequest],
    running: RunningState,
    policy: BatchPolicy,
    now: float,
    kv_capacity_tokens: int | None = None,
    next_arrival_s: float | None = None,
) -> Admission:
    """Pick the waiting requests that join the next engine step.

    Walks `service_order(waiting)`, dropping expired requests (deadline_s <= now) and too-large ones
    (kv_tokens_needed > kv_capacity_tokens, the engine's total KV; None disables the check), and admits
    the longest prefix of the rest that fits all three limits:

    - tokens: the step budget is B = max_batch_tokens - running.decode_tokens. Admitting a request costs
      its first prefill chunk c = prefill_chunk(max(1, prompt_tokens - cached_tokens), budget_left),
      and budget_left drops by c. A request is admitted only if c is its full first chunk
      (min(uncached prompt, max_prefill_chunk_tokens)), or it is the first admission of the step and
      c >= 1 (a prompt larger than the leftover budget starts chunked instead of never starting).
      Hence sum(c) + running.decode_tokens <= max_batch_tokens, and every c >= 1.
    - seqs: running.num_seqs + len(admitted) <= max_num_seqs.
    - KV: sum(kv_tokens_needed) over admitted <= running.free_kv_tokens (when not None).

    The walk stops at the first request that does not fit rather than skipping to smaller ones behind
    it: skipping would let a stream of small requests starve a large one forever, while blocking means
    the head runs as soon as capacity frees up. Aging bounds how long a BATCH request can sit behind
    INTERACTIVE ones.

    Time window: when the engine is idle and the eligible requests would not fill the step (tokens,
    seqs or KV), nothing is admitted until the oldest has waited max_wait_ms, and `wake_at_s` says when
    to call again. The window is skipped if holding would let a deadline pass, or if the next request is
    not expected before the window ends (`next_arrival_s`, from `scheduler.arrivals.ArrivalGap`; None =
    no estimate, hold).

    Prefill batching: while the engine decodes, `defer_prefill` may admit nobody this step.
    """
    expired: list[WaitingRequest] = []
    too_large: list[WaitingRequest] = []
    eligible: list[WaitingRequest] = []
    for req in service_order(waiting, policy):
        if req.deadline_s is not None and req.deadline_s <= now:
            expired.append(req)
        elif kv_capacity_tokens is not None and kv_tokens_needed(req, policy) > kv_capacity_tokens:
            too_large.append(req)
        else:
            eligible.append(req)

    wake_at_s = _hold_until(eligible, running, policy, now, next_arrival_s)
    admitted: list[WaitingRequest] = []
    chunks: list[int] = []
    if wake_at_s is None and not defer_prefill(eligible, running, policy):
        budget_left = policy.max_batch_tokens - running.decode_tokens
        seqs_left = policy.max_num_seqs - running.num_seqs
        kv_left = running.free_kv_tokens
        for req in eligible:
            kv_need = kv_tokens_needed(req, policy)
            chunk = prefill_chunk(_tokens_to_prefill(req), budget_left, policy)
            if seqs_left < 1 or (kv_left is not None and kv_need > kv_left):
                break
            # A partial first chunk is allowed only to the step's first admission, and never empty.
            if chunk < _full_first_chunk(req, policy) and (admitted or chunk < 1):
                break
            admitted.append(req)
            chunks.append(chunk)
            budget_left -= chunk
            seqs_left -= 1
            if kv_left is not None:
                kv_left -= kv_need
    return Admission(
        admitted=tuple(admitted),
        expired=tuple(expired),
        too_large=tuple(too_large),
        wake_at_s=wake_at_s,
        prefill_tokens=tuple(chunks),
    )
