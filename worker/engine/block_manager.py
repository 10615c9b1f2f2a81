"""The KV block pool: block tables, slot mapping, and prefix sharing by chained block hashes.

Pure bookkeeping over integers, no tensors: `kv_cache.py` owns the memory, this file owns who
may write which slot. A block holds `block_size` consecutive tokens of one sequence. A FULL
block is keyed by a chained digest (parent block's digest + its own token ids), so two
sequences with the same first n full blocks share those n physical blocks, read-only, with a
reference count. Blocks whose count drops to zero keep their digest and stay in an LRU pool of
evictable blocks: a later request with the same prefix revives them, and they are recycled,
oldest first, only when no never-used block is left (vLLM's automatic prefix caching).
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict, deque
from collections.abc import Iterable

from worker.engine.sequence import Sequence


class Block:
    """One physical KV block: its reference count and, once full and registered, its digest."""

    __slots__ = ("block_id", "ref_count", "block_hash", "token_ids")

    def __init__(self, block_id: int):
        self.block_id = block_id
        self.ref_count = 0
        self.block_hash: bytes | None = None
        # The block's own tokens, kept to rule out digest collisions on lookup.
        self.token_ids: tuple[int, ...] = ()

    def reset(self) -> None:
        self.ref_count = 0
        self.block_hash = None
        self.token_ids = ()


def chained_block_hash(parent: bytes | None, token_ids: list[int]) -> bytes:
    """Digest of a full block given its parent's digest: equal digests mean equal whole prefixes."""
    h = hashlib.blake2b(digest_size=16)
    h.update(parent or b"")
    h.update(array("q", token_ids).tobytes())
    return h.digest()


class BlockManager:
    """Allocates blocks to sequences, shares cached prefix blocks, and maps tokens to cache slots."""

    def __init__(self, num_blocks: int, block_size: int = 16, enable_prefix_caching: bool = True):
        if num_blocks < 1 or block_size < 1:
            raise ValueError("num_blocks and block_size must be >= 1")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free_block_ids: deque[int] = deque(range(num_blocks))
        # Unreferenced blocks that still hold a registered prefix, least recently freed first.
        self.evictable: OrderedDict[int, None] = OrderedDict()
        self.hash_to_block_id: dict[bytes, int] = {}

    @property
    def num_free_blocks(self) -> int:
        """Blocks an allocation may take: never-used ones plus evictable cached ones."""
        return len(self.free_block_ids) + len(self.evictable)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def block_digests(self, seq: Sequence, num_blocks: int) -> list[bytes]:
        """Chained digests of the sequence's first `num_blocks` full blocks (memoized on the sequence)."""
        bs = self.block_size
        for i in range(len(seq.block_hashes), num_blocks):
            parent = seq.block_hashes[i - 1] if i else None
            seq.block_hashes.append(chained_block_hash(parent, seq.token_ids[i * bs : (i + 1) * bs]))
        return seq.block_hashes[:num_blocks]

    def match_prefix(self, seq: Sequence) -> list[int]:
        """Cached blocks holding the longest shareable prefix; never the last token, whose logits we need.

        A sequence with a KV budget takes at most `seq.max_prefix_blocks` of them (set by the scheduler).
        """
        if not self.enable_prefix_caching:
            return []
        hits: list[int] = []
        bs = self.block_size
        limit = (len(seq) - 1) // bs
        if seq.max_prefix_blocks is not None:
            limit = min(limit, seq.max_prefix_blocks)
        for i, digest in enumerate(self.block_digests(seq, limit)):
            block_id = self.hash_to_block_id.get(digest)
            if block_id is None:
                break
            block = self.blocks[block_id]
            if block.block_hash != digest or block.token_ids != tuple(seq.token_ids[i * bs : (i + 1) * bs]):
                break
            hits.append(block_id)
        return hits

    def num_new_blocks_needed(self, seq: Sequence, num_tokens: int) -> int:
        """Free-pool blocks that `allocate(seq, num_tokens)` consumes (reviving an evictable hit counts)."""
        hits_in_use = sum(1 for b in self.match_prefix(seq) if self.blocks[b].ref_count > 0)
        return self.blocks_for(num_tokens) - hits_in_use

    def can_allocate(self, seq: Sequence, num_tokens: int, reserved_blocks: int = 0) -> bool:
        """True if blocks for `num_tokens` tokens fit while keeping `reserved_blocks` free for others."""
        return self.num_new_blocks_needed(seq, num_tokens) + reserved_blocks <= self.num_free_blocks

    def allocate(self, seq: Sequence, num_tokens: int) -> int:
        """Give a new sequence blocks for its first `num_tokens` tokens; returns tokens served from cache."""
        if seq.block_table:
            raise RuntimeError(f"sequence {seq.seq_id!r} already holds blocks")
        hits = self.match_prefix(seq)
        if self.num_new_blocks_needed(seq, num_tokens) > self.num_free_blocks:
            raise RuntimeError(f"out of KV blocks allocating {seq.seq_id!r}")
        # Claim the hits before taking fresh blocks, so that eviction cannot recycle one of them.
        for block_id in hits:
            block = self.blocks[block_id]
            if block.ref_count == 0:
                del self.evictable[block_id]
            block.ref_count += 1
        seq.block_table = list(hits)
        seq.num_registered_blocks = len(hits)
        self.ensure_slots(seq, num_tokens)
        seq.num_computed_tokens = len(hits) * self.block_size
        return seq.num_computed_tokens

    def can_append(self, seq: Sequence, num_tokens: int, reserved_blocks: int = 0) -> bool:
        """True if the sequence's table can grow to cover `num_tokens` tokens (evicted ones need none)."""
        missing = self.blocks_for(seq.kv_len(num_tokens)) - len(seq.block_table)
        return missing <= 0 or missing + reserved_blocks <= self.num_free_blocks

    def ensure_slots(self, seq: Sequence, num_tokens: int) -> None:
        """Grow the sequence's table so that tokens [0, num_tokens) all have a slot (or were evicted)."""
        for _ in range(self.blocks_for(seq.kv_len(num_tokens)) - len(seq.block_table)):
            seq.block_table.append(self._take_block())

    def register_full_blocks(self, seq: Sequence, num_tokens: int) -> None:
        """Publish the full blocks among the first `num_tokens` tokens for sharing.

        Called when those tokens are scheduled: the model writes every token's K/V before any
        attention read of the same layer, so a sequence admitted in the same step may already
        read these blocks.
        """
        if not self.enable_prefix_caching or seq.num_evicted_blocks:
            return  # after an eviction the sequence computes K/V over a pruned context: never shared
        # A token not read back yet has no id to hash: its block is published once it is (next step).
        num_tokens = min(num_tokens, seq.num_resolved_tokens)
        num_full = min(num_tokens // self.block_size, len(seq.block_table))
        bs = self.block_size
        for i, digest in enumerate(self.block_digests(seq, num_full)):
            if i < seq.num_registered_blocks:
                continue
            block = self.blocks[seq.block_table[i]]
            # An identical block computed by another sequence stays the canonical copy; this one is private.
            if digest not in self.hash_to_block_id and block.block_hash is None:
                block.block_hash = digest
                block.token_ids = tuple(seq.token_ids[i * bs : (i + 1) * bs])
                self.hash_to_block_id[digest] = block.block_id
        seq.num_registered_blocks = max(seq.num_registered_blocks, num_full)

    def free(self, seq: Sequence) -> None:
        """Drop the sequence's references; registered blocks stay cached, the rest return to the free list."""
        # Tail first, so that under eviction a prefix outlives the blocks that extend it.
        self._release(reversed(seq.block_table), "freed")
        seq.block_table = []
        seq.block_scores = []
        seq.num_registered_blocks = 0

    def evict(self, seq: Sequence, block_ids: list[int]) -> None:
        """Drop the references of blocks a pruned sequence evicted (`Sequence.evict_block`).

        Only this sequence's reference goes: a block another sequence reads keeps its contents and
        count; a block nobody reads returns to the pool at once (to the prefix cache if registered).
        """
        self._release(block_ids, "evicted")

    def _release(self, block_ids: Iterable[int], what: str) -> None:
        """Drop a reference from each; an unread block goes to the prefix cache (registered) or free list."""
        for block_id in block_ids:
            block = self.blocks[block_id]
            if block.ref_count <= 0:
                raise RuntimeError(f"block {block_id} {what} with ref_count {block.ref_count}")
            block.ref_count -= 1
            if block.ref_count == 0:
                if block.block_hash is not None:
                    self.evictable[block_id] = None
                else:
                    self.free_block_ids.append(block_id)

    def slot_mapping(self, seq: Sequence, start: int, end: int) -> list[int]:
        """Flat cache slot (block_id * block_size + offset) of each token position in [start, end).

        Positions past every eviction of a pruned sequence sit `num_evicted_tokens` earlier in its table
        (evictions remove whole blocks, so the offset inside a block is unchanged).
        """
        bs = self.block_size
        table = seq.block_table
        shift = seq.num_evicted_tokens
        return [table[(pos - shift) // bs] * bs + pos % bs for pos in range(start, end)]

    def unpublish(self, seq: Sequence, first_block: int) -> None:
        """Withdraw the sequence's blocks from logical block `first_block` on from sharing (suspect K/V)."""
        for block_id in seq.block_table[max(first_block - seq.num_evicted_blocks, 0) :]:
            block = self.blocks[block_id]
            if block.block_hash is not None and self.hash_to_block_id.get(block.block_hash) == block_id:
                del self.hash_to_block_id[block.block_hash]
            block.block_hash = None
            block.token_ids = ()
        seq.num_registered_blocks = min(seq.num_registered_blocks, first_block)

    def _take_block(self) -> int:
        if self.free_block_ids:
            block_id = self.free_block_ids.popleft()
        elif self.evictable:
            block_id, _ = self.evictable.popitem(last=False)
            self._forget(self.blocks[block_id])
        else:
            raise RuntimeError("out of KV blocks")
        self.blocks[block_id].ref_count = 1
        return block_id

    def _forget(self, block: Block) -> None:
        if block.block_hash is not None and self.hash_to_block_id.get(block.block_hash) == block.block_id:
            del self.hash_to_block_id[block.block_hash]
        block.reset()
