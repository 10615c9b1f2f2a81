"""Iteration-level scheduler: which sequences run in the next step, and how many tokens each computes.

Each step first serves the running sequences (decodes, then the next chunks of prefills that
are still in progress), then admits waiting requests into the leftover token budget. The
admission decision (service order, priority aging, deadlines, time window, sequence cap,
first-chunk budget) is the pure policy of the `scheduler` package; this file adds what only the
engine knows: exact KV block accounting with prefix-cache hits, and preemption.

KV admission has two modes. `worst_case` allocates blocks for prompt + max_tokens at admission,
so a running sequence never waits for memory (TGI). `optimistic` allocates the prompt only and
grows block tables while decoding; when the pool runs dry, the running sequence served last
(prefills in progress, then the newest decodes) is preempted by recompute: its blocks are freed
(full ones stay cached, so its recompute often hits the prefix cache) and it returns to the
front of the waiting queue (vLLM).

A sequence with a KV budget (`kv_prune.py`) is pruned here, as its step is planned: middle blocks are
evicted so the step's tokens fit the budget, and its prefill chunks are cut to fit. Admission reserves
at most ceil(budget / block_size) + 1 blocks for it, so pruning raises how many sequences fit.
"""

from __future__ import annotations

import heapq
import itertools
from collections import deque
from dataclasses import dataclass, field

from scheduler import (
    ArrivalGap,
    BatchPolicy,
    Priority,
    RunningState,
    WaitingRequest,
    kv_tokens_for,
    prefill_chunk,
    select_admissions,
)
from worker.engine.block_manager import BlockManager
from worker.engine.kv_prune import PrunePolicy
from worker.engine.model_runner import ScheduledSequence
from worker.engine.sequence import Sequence, SequenceStatus


@dataclass
class SchedulerOutput:
    """The plan of one step, and the sequences that left the queues while planning it."""

    scheduled: list[ScheduledSequence] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)
    expired: list[Sequence] = field(default_factory=list)  # deadline passed while waiting
    rejected: list[Sequence] = field(default_factory=list)  # can never fit in the KV cache
    cache_full: list[Sequence] = field(default_factory=list)  # outgrew the whole cache while running
    admitted: list[str] = field(default_factory=list)  # requests started for the first time
    admitted_prompt_tokens: int = 0  # prompt tokens of this step's first-time admissions
    cached_tokens: int = 0  # of those, tokens served from the prefix cache

    @property
    def prefill_tokens(self) -> int:
        return sum(s.num_tokens for s in self.scheduled if not s.is_decode)

    @property
    def decode_tokens(self) -> int:
        return sum(s.num_tokens for s in self.scheduled if s.is_decode)


class StepScheduler:
    """Keeps the waiting and running queues and plans each step under the token and KV budgets."""

    def __init__(self, policy: BatchPolicy, block_manager: BlockManager, prune: PrunePolicy | None = None):
        self.policy = policy
        self.block_manager = block_manager
        self.prune = prune or PrunePolicy(block_size=block_manager.block_size)
        self.waiting: deque[Sequence] = deque()
        self.running: deque[Sequence] = deque()
        self.steps_since_prefill = 0  # for prefill batching (BatchPolicy.prefill_interval_steps)
        self.arrivals = ArrivalGap()  # for the time window (scheduler.arrivals)
        self.wake_at_s: float | None = None  # set while the time window holds an idle engine
        # So a step need not walk the whole waiting queue (`_candidates`): the sequences not yet checked
        # against the cache's capacity, and a heap of the deadlines of those that have one.
        self._unchecked: list[Sequence] = []
        self._deadlines: list[tuple[float, int, Sequence]] = []
        self._deadline_order = itertools.count()

    @property
    def kv_capacity_tokens(self) -> int:
        return self.block_manager.num_blocks * self.block_manager.block_size

    def add(self, seq: Sequence) -> None:
        if seq.kv_budget_tokens:
            seq.max_prefix_blocks = self.prune.max_prefix_blocks(
                seq.kv_budget_tokens, self.policy.kv_reserve == "worst_case"
            )
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)
        self._unchecked.append(seq)
        if seq.deadline_s is not None:
            heapq.heappush(self._deadlines, (seq.deadline_s, next(self._deadline_order), seq))
        self.arrivals.observe(seq.arrival_s)
        self.wake_at_s = None

    def take_unstarted(self) -> list[Sequence]:
        """Remove the waiting sequences that never ran (preempted ones have streamed: they stay)."""
        unstarted = [s for s in self.waiting if s.num_preemptions == 0]
        for seq in unstarted:
            self.waiting.remove(seq)
            seq.status = SequenceStatus.FINISHED
        return unstarted

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def finish(self, seq: Sequence) -> None:
        """Take a sequence out of the queues and release its blocks (full ones stay cached)."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.block_manager.free(seq)
        seq.status = SequenceStatus.FINISHED

    def schedule(self, now: float) -> SchedulerOutput:
        """Plan the next step: running sequences first, then admissions into what is left."""
        out = SchedulerOutput()
        self.wake_at_s = None
        budget = self._schedule_running(out, self.policy.max_batch_tokens)
        if not out.preempted:  # memory is short; admitting now would only preempt again
            self._admit(out, budget, now)
        for seq in self.waiting:
            seq.waited_steps += 1
        has_prefill = any(item.num_tokens > 1 for item in out.scheduled)
        self.steps_since_prefill = 0 if has_prefill else self.steps_since_prefill + 1
        return out

    def _schedule_running(self, out: SchedulerOutput, budget: int) -> int:
        # Decodes first: a long prefill chunk must never stall the streams already running.
        order = sorted(self.running, key=lambda s: s.is_prefilling)  # stable: FIFO within each group
        scheduled: set[int] = set()
        block_size = self.block_manager.block_size
        for seq in order:
            if seq.status is not SequenceStatus.RUNNING:
                continue  # preempted earlier in this pass
            num_tokens = min(seq.num_uncomputed_tokens, self.policy.max_prefill_chunk_tokens, budget)
            if num_tokens <= 0:
                break
            if seq.kv_budget_tokens:
                num_tokens = self._fit_budget(seq, num_tokens)
            target = seq.num_computed_tokens + num_tokens
            # Most decodes need no new block and fill none: skip the block manager for them.
            if seq.kv_len(target) > len(seq.block_table) * block_size:
                if not self._make_room(seq, target, order, scheduled, out):
                    continue
                self.block_manager.ensure_slots(seq, target)
            if target // block_size > seq.num_registered_blocks:
                self.block_manager.register_full_blocks(seq, target)
            seq.kv_peak_tokens = max(seq.kv_peak_tokens, seq.kv_len(target))
            out.scheduled.append(ScheduledSequence(seq, num_tokens))
            scheduled.add(id(seq))
            budget -= num_tokens
        return budget

    def _fit_budget(self, seq: Sequence, num_tokens: int) -> int:
        """Evict what the budget requires before computing `num_tokens` more; returns how many to compute."""
        num_tokens, evicted = self.prune.fit(seq, num_tokens)
        self.block_manager.evict(seq, evicted)
        return num_tokens

    def budget_kv_tokens(self, seq: Sequence, kv_tokens: int) -> int:
        """KV tokens to reserve for a sequence, capped at what its budget lets it hold."""
        if seq.kv_budget_tokens <= 0:
            return kv_tokens
        return min(kv_tokens, self.prune.cap_blocks(seq.kv_budget_tokens) * self.block_manager.block_size)

    def _make_room(
        self, seq: Sequence, target: int, order: list[Sequence], scheduled: set[int], out: SchedulerOutput
    ) -> bool:
        """Preempt from the back of `order` until `seq` fits `target` tokens; False if it cannot run now."""
        while not self.block_manager.can_append(seq, target):
            victim = next(
                (v for v in reversed(order) if v.status is SequenceStatus.RUNNING and id(v) not in scheduled
                 and v is not seq),
                None,
            )  # fmt: skip
            if victim is None:
                if len(self.running) == 1:  # alone and still too big: it can never fit
                    out.cache_full.append(seq)
                else:
                    self._preempt(seq, out)
                return False
            self._preempt(victim, out)
        return True

    def _preempt(self, seq: Sequence, out: SchedulerOutput) -> None:
        self.running.remove(seq)
        self.block_manager.free(seq)
        seq.reset_for_recompute()
        self.waiting.appendleft(seq)
        self._unchecked.append(seq)  # its KV need may have grown (optimistic reservation counts its tokens)
        out.preempted.append(seq)

    def _admit(self, out: SchedulerOutput, budget: int, now: float) -> None:
        first = True
        while self.waiting and budget > 0:
            candidates = self._candidates(now)
            if not candidates:
                return
            by_id = {s.seq_id: s for s in candidates}
            used = self.policy.max_batch_tokens - budget
            running = RunningState(
                num_seqs=len(self.running), decode_tokens=used,
                prefill_tokens=sum(item.num_tokens for item in out.scheduled if item.num_tokens > 1),
                steps_since_prefill=self.steps_since_prefill,
            )  # fmt: skip
            # KV is checked below against the block pool, which knows what the prefix cache shares.
            decision = select_admissions(
                [self._as_waiting_request(s) for s in candidates], running, self.policy, now,
                kv_capacity_tokens=self.kv_capacity_tokens, next_arrival_s=self.arrivals.next_arrival_s(now),
            )  # fmt: skip
            self.wake_at_s = decision.wake_at_s
            for req in decision.expired:
                out.expired.append(by_id[req.seq_id])
                self.waiting.remove(by_id[req.seq_id])
            for req in decision.too_large:
                out.rejected.append(by_id[req.seq_id])
                self.waiting.remove(by_id[req.seq_id])
            stale = False
            for req in decision.admitted:
                seq = by_id[req.seq_id]
                cached = len(self.block_manager.match_prefix(seq)) * self.block_manager.block_size
                remaining = len(seq) - cached
                chunk = prefill_chunk(remaining, budget, self.policy)
                full_chunk = min(remaining, self.policy.max_prefill_chunk_tokens)
                kv_tokens = seq.max_total_tokens if self.policy.kv_reserve == "worst_case" else len(seq)
                if seq.kv_budget_tokens:
                    fits = min(self.prune.chunk_cap(seq.kv_budget_tokens), seq.kv_budget_tokens - cached)
                    chunk, full_chunk = min(chunk, fits), min(full_chunk, fits)
                    kv_tokens = self.budget_kv_tokens(seq, kv_tokens)
                    if self.policy.kv_reserve != "worst_case":
                        kv_tokens = min(kv_tokens, seq.kv_budget_tokens)
                if chunk < 1 or (chunk < full_chunk and not first):
                    return
                if not self.block_manager.can_allocate(seq, kv_tokens):
                    return
                self._start(seq, kv_tokens, chunk, out)
                budget -= chunk
                first = False
                if cached != req.cached_tokens:
                    stale = True  # the policy's view of the cache changed; ask it again
                    break
            if not stale:
                return

    def _candidates(self, now: float) -> list[Sequence]:
        """The waiting sequences the admission policy must see this step, without looking at the rest.

        The policy admits at most the free sequence slots, walking in service order (priority class
        with aging, then arrival), and separately reports expired and too-large requests. So it needs
        every expired or too-large request, plus the first `slots + 1` of each priority class: within
        a class the waiting queue is in arrival order (preempted sequences return to its front, and
        they arrived first), and a class's aged requests are its oldest. Asking the policy about all
        of them would cost a prefix-cache lookup per waiting request per step, and even walking them
        all costs milliseconds a step with a thousand queued: so the walk stops once both classes have
        their `slots + 1` (at once when no slot is free), and the expired and too-large ones beyond come
        from the deadline heap and the sequences not checked since they (re)joined the queue (a
        request's KV need is fixed while it waits).
        """
        slots = self.policy.max_num_seqs - len(self.running)
        per_class: dict[bool, int] = {True: 0, False: 0}
        capacity = self.kv_capacity_tokens
        picked: list[Sequence] = []
        for seq in self.waiting if slots > 0 else ():  # no free slot: only the out-of-line ones matter
            if per_class[True] > slots and per_class[False] > slots:
                break
            interactive = seq.priority < Priority.BATCH
            if self._out_of_line(seq, now, capacity):
                picked.append(seq)
            elif per_class[interactive] <= slots:
                per_class[interactive] += 1
                picked.append(seq)
        seen = {id(seq) for seq in picked}
        for seq in itertools.chain(self._unchecked, self._expired(now)):
            if (
                id(seq) not in seen
                and seq.status is SequenceStatus.WAITING
                and self._out_of_line(seq, now, capacity)
            ):
                picked.append(seq)
                seen.add(id(seq))
        self._unchecked.clear()
        return picked

    def _out_of_line(self, seq: Sequence, now: float, capacity: int) -> bool:
        """Expired, or larger than the whole cache: the policy reports it whatever its place in line."""
        if seq.deadline_s is not None and seq.deadline_s <= now:
            return True
        remaining = max(seq.sampling.max_tokens - seq.num_completion_tokens, 0)
        return self.budget_kv_tokens(seq, kv_tokens_for(len(seq), remaining, self.policy)) > capacity

    def _expired(self, now: float) -> list[Sequence]:
        """The waiting sequences whose deadline passed, from the heap; entries of finished sequences are
        dropped, those of running ones kept (the engine ends them; a preempted one may wait again)."""
        found: list[Sequence] = []
        keep: list[tuple[float, int, Sequence]] = []
        while self._deadlines and self._deadlines[0][0] <= now:
            entry = heapq.heappop(self._deadlines)
            if entry[2].status is SequenceStatus.WAITING:
                found.append(entry[2])
            elif entry[2].status is SequenceStatus.RUNNING:
                keep.append(entry)
        for entry in keep:
            heapq.heappush(self._deadlines, entry)
        if len(self._deadlines) > 2 * (len(self.waiting) + len(self.running)) + 64:  # drop finished ones
            live = [e for e in self._deadlines if e[2].status is not SequenceStatus.FINISHED]
            heapq.heapify(live)
            self._deadlines = live
        return found

    def _start(self, seq: Sequence, kv_tokens: int, chunk: int, out: SchedulerOutput) -> None:
        cached = self.block_manager.allocate(seq, kv_tokens)
        if seq.num_preemptions == 0:
            out.admitted.append(seq.seq_id)
            seq.cached_tokens = min(cached, seq.num_prompt_tokens)
            out.cached_tokens += seq.cached_tokens
            out.admitted_prompt_tokens += seq.num_prompt_tokens
        self.waiting.remove(seq)
        self.running.append(seq)
        seq.status = SequenceStatus.RUNNING
        seq.waited_steps = 0
        target = seq.num_computed_tokens + chunk
        self.block_manager.register_full_blocks(seq, target)
        seq.kv_peak_tokens = max(seq.kv_peak_tokens, seq.kv_len(target))
        out.scheduled.append(ScheduledSequence(seq, chunk))

    def _as_waiting_request(self, seq: Sequence) -> WaitingRequest:
        cached = len(self.block_manager.match_prefix(seq)) * self.block_manager.block_size
        # After a preemption the sampled tokens are recomputed like prompt tokens.
        prompt_tokens, max_tokens = len(seq), max(seq.sampling.max_tokens - seq.num_completion_tokens, 0)
        if seq.kv_budget_tokens:  # the policy sees the KV a budgeted sequence can hold, not its length
            cap = self.budget_kv_tokens(seq, prompt_tokens + max_tokens)
            prompt_tokens = min(prompt_tokens, cap)
            max_tokens = min(max_tokens, cap - prompt_tokens)
        return WaitingRequest(
            seq_id=seq.seq_id,
            arrival_s=seq.arrival_s,
            prompt_tokens=prompt_tokens,
            max_tokens=max_tokens,
            priority=Priority.BATCH if seq.priority >= Priority.BATCH else Priority.INTERACTIVE,
            deadline_s=seq.deadline_s,
            cached_tokens=min(cached, prompt_tokens),
            waited_steps=seq.waited_steps,
        )
