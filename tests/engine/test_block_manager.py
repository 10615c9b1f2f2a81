"""Block accounting under random traffic: refcounts, sharing, eviction, and what shared blocks contain."""

from __future__ import annotations

import time

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from worker.engine.base import GenerationRequest, SamplingParams
from worker.engine.block_manager import BlockManager
from worker.engine.sequence import Sequence

BLOCK_SIZE = 4
NUM_BLOCKS = 24
# A few common prefixes so that sharing, partial matches and divergence inside a block all happen.
PREFIXES = [[], [1, 2, 3, 4, 5, 6, 7, 8, 9], [1, 2, 3, 4, 5, 6, 7, 8, 10, 11], [20, 21, 22, 23]]


def make_seq(seq_id: str, tokens: list[int], max_tokens: int) -> Sequence:
    return Sequence(
        GenerationRequest(seq_id, tokens, SamplingParams(max_tokens=max_tokens), time.monotonic())
    )


def test_prefix_hits_stop_before_the_last_token():
    bm = BlockManager(num_blocks=8, block_size=4)
    first = make_seq("a", list(range(8)), 4)
    bm.allocate(first, 8)
    bm.register_full_blocks(first, 8)
    bm.free(first)
    again = make_seq("b", list(range(8)), 4)
    assert bm.allocate(again, 8) == 4  # block 2 is recomputed to get the last token's logits
    longer = make_seq("c", list(range(9)), 4)
    assert bm.allocate(longer, 9) == 8


def test_evicts_least_recently_freed_cached_block():
    bm = BlockManager(num_blocks=2, block_size=2)
    a, b = make_seq("a", [1, 2, 3], 1), make_seq("b", [5, 6, 7], 1)
    for seq in (a, b):
        bm.allocate(seq, 2)
        bm.register_full_blocks(seq, 2)
    bm.free(a)
    bm.free(b)
    c = make_seq("c", [9, 9, 9], 1)
    bm.allocate(c, 2)  # recycles a's block, the older one
    assert bm.match_prefix(make_seq("x", [5, 6, 7], 1)) and not bm.match_prefix(make_seq("y", [1, 2, 3], 1))


def test_digest_collision_is_not_a_hit():
    bm = BlockManager(num_blocks=4, block_size=2)
    a = make_seq("a", [1, 2, 3], 1)
    bm.allocate(a, 3)
    bm.register_full_blocks(a, 2)
    forged = make_seq("b", [7, 8, 3], 1)
    forged.block_hashes = list(a.block_hashes)  # pretend the digests collide
    assert bm.match_prefix(forged) == []


class BlockAccounting(RuleBasedStateMachine):
    """Random arrivals, chunked computation, decodes, finishes and cancellations against one pool."""

    @initialize()
    def setup(self) -> None:
        self.bm = BlockManager(NUM_BLOCKS, BLOCK_SIZE)
        self.live: dict[str, Sequence] = {}
        # What each physical slot holds: the token whose K/V was last written there.
        self.content: dict[int, int] = {}
        self.counter = 0

    @rule(prefix=st.sampled_from(PREFIXES), tail=st.lists(st.integers(0, 40), max_size=10),
          max_tokens=st.integers(1, 6), worst_case=st.booleans())  # fmt: skip
    def arrive(self, prefix: list[int], tail: list[int], max_tokens: int, worst_case: bool) -> None:
        tokens = prefix + tail or [0]
        seq = make_seq(f"s{self.counter}", tokens, max_tokens)
        self.counter += 1
        kv_tokens = seq.max_total_tokens if worst_case else len(seq)
        if not self.bm.can_allocate(seq, kv_tokens):
            return
        free_before = self.bm.num_free_blocks
        consumed = self.bm.num_new_blocks_needed(seq, kv_tokens)
        hits = self.bm.match_prefix(seq)
        cached = self.bm.allocate(seq, kv_tokens)
        self.live[seq.seq_id] = seq
        assert cached == len(hits) * BLOCK_SIZE < len(seq)
        assert free_before - self.bm.num_free_blocks == consumed
        # Shared blocks must already hold exactly this sequence's tokens.
        for pos in range(cached):
            slot = seq.block_table[pos // BLOCK_SIZE] * BLOCK_SIZE + pos % BLOCK_SIZE
            assert self.content.get(slot) == seq.token_ids[pos]

    @precondition(lambda self: self.live)
    @rule(data=st.data(), chunk=st.integers(1, 6))
    def compute(self, data: st.DataObject, chunk: int) -> None:
        """Schedule up to `chunk` tokens of one sequence, write them, and sample a token at its end."""
        seq = self.live[data.draw(st.sampled_from(sorted(self.live)))]
        start = seq.num_computed_tokens
        end = min(len(seq), start + chunk)
        if not self.bm.can_append(seq, end):
            return
        self.bm.ensure_slots(seq, end)
        self.bm.register_full_blocks(seq, end)
        for pos, slot in zip(range(start, end), self.bm.slot_mapping(seq, start, end), strict=True):
            block = self.bm.blocks[slot // BLOCK_SIZE]
            if block.ref_count > 1:  # a shared block is only ever rewritten with identical content
                assert block.token_ids[pos % BLOCK_SIZE] == seq.token_ids[pos]
            self.content[slot] = seq.token_ids[pos]
        seq.num_computed_tokens = end
        if end == len(seq):
            if seq.num_completion_tokens < seq.sampling.max_tokens:
                seq.append_token(data.draw(st.integers(0, 40)))
            if seq.num_completion_tokens >= seq.sampling.max_tokens:
                self._release(seq)

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def cancel(self, data: st.DataObject) -> None:
        self._release(self.live[data.draw(st.sampled_from(sorted(self.live)))])

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def preempt(self, data: st.DataObject) -> None:
        seq = self.live[data.draw(st.sampled_from(sorted(self.live)))]
        self.bm.free(seq)
        seq.reset_for_recompute()
        del self.live[seq.seq_id]

    def _release(self, seq: Sequence) -> None:
        self.bm.free(seq)
        del self.live[seq.seq_id]

    @invariant()
    def refcounts_match_block_tables(self) -> None:
        owners: dict[int, list[tuple[Sequence, int]]] = {}
        for seq in self.live.values():
            for index, block_id in enumerate(seq.block_table):
                owners.setdefault(block_id, []).append((seq, index))
        free, evictable = set(self.bm.free_block_ids), set(self.bm.evictable)
        assert not free & evictable and len(free) == len(self.bm.free_block_ids)
        for block in self.bm.blocks:
            holders = owners.get(block.block_id, [])
            assert block.ref_count == len(holders) >= 0
            if block.ref_count == 0:
                assert (block.block_id in free) != (block.block_id in evictable)
                assert (block.block_id in evictable) == (block.block_hash is not None)
            else:
                assert block.block_id not in free | evictable
            if len(holders) > 1:  # shared: full, registered, and the same prefix for every holder
                assert block.block_hash is not None
                assert all(s.block_hashes[i] == block.block_hash for s, i in holders)
        for digest, block_id in self.bm.hash_to_block_id.items():
            block = self.bm.blocks[block_id]
            assert block.block_hash == digest
            # A published block keeps its tokens' K/V until it is evicted, whoever held it.
            slots = range(block_id * BLOCK_SIZE, (block_id + 1) * BLOCK_SIZE)
            assert tuple(self.content.get(slot) for slot in slots) == block.token_ids

    def teardown(self) -> None:
        if not hasattr(self, "bm"):
            return
        for seq in list(self.live.values()):
            self._release(seq)
        assert all(block.ref_count == 0 for block in self.bm.blocks)
        assert self.bm.num_free_blocks == NUM_BLOCKS


TestBlockAccounting = BlockAccounting.TestCase
TestBlockAccounting.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)


def test_unpublished_blocks_are_never_hits():
    bm = BlockManager(num_blocks=8, block_size=2)
    a = make_seq("a", [1, 2, 3, 4, 5], 1)
    bm.allocate(a, 5)
    bm.register_full_blocks(a, 4)
    bm.unpublish(a, 1)  # block 1 was being written by a step that failed
    assert len(bm.match_prefix(make_seq("b", [1, 2, 3, 4, 5], 1))) == 1
    bm.free(a)
    assert bm.num_free_blocks == 8 and len(bm.evictable) == 1
