"""The graphs' host block tables, rewritten by difference, always equal the tables rebuilt from scratch."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from worker.engine.block_table_rows import BlockTableRows

OPS = ["grow", "evict", "reset", "leave", "join", "same"]


class Seq:
    def __init__(self, first: int) -> None:
        self.table = [first]
        self.evicted = 0


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(OPS), st.integers(0, 7)), max_size=60))
def test_rows_updated_by_difference_equal_rows_rebuilt(ops: list[tuple[str, int]]) -> None:
    """Steps of a decode batch: sequences gain blocks, get pruned in the middle (evictions counted), are
    preempted and rebuilt (a new list), leave (the rows after shift) or join."""
    rows = BlockTableRows(max_rows=8, max_blocks=40)
    seqs = [Seq(i * 100) for i in range(4)]
    block = 1000
    for op, k in ops:
        seq = seqs[k % len(seqs)] if seqs else None
        if op == "grow" and seq is not None and len(seq.table) < 40:
            block += 1
            seq.table.append(block)
        elif op == "evict" and seq is not None and len(seq.table) > 2:
            seq.table.pop(1)  # as `Sequence.evict_block`, then a block appended in the same step
            seq.evicted += 1
            block += 1
            seq.table.append(block)
        elif op == "reset" and seq is not None:
            block += 1
            seq.table = [block]
        elif op == "leave" and len(seqs) > 1:
            seqs.pop(k % len(seqs))
        elif op == "join" and len(seqs) < 8:
            block += 1
            seqs.insert(k % (len(seqs) + 1), Seq(block))
        width = rows.update([s.table for s in seqs], [s.evicted for s in seqs])
        assert width == max(len(s.table) for s in seqs)
        for i, s in enumerate(seqs):
            assert rows.array[i, : len(s.table)].tolist() == s.table
