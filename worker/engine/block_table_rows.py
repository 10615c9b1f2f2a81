"""The block tables of a decode step's rows, kept on the host from one step to the next.

A graph replay reads a dense [rows, blocks] table. Rebuilding it every step from each sequence's
`block_table` list costs a numpy row assignment per sequence (about 0.5 ms at 256 rows on a slow host),
although between two decode steps almost every row holds the same sequence with the same blocks: a
sequence gains one block every `block_size` tokens, and the rows shift only when one leaves or joins.
`BlockTableRows` keeps the dense array and, per row, which table it holds and how much of it; a step
writes only a row that now holds another table (by identity), the blocks a table gained at its end, or
a row whose table was pruned (`Sequence.evict_block` removes blocks from the middle, counted by
`num_evicted_blocks`). A replacement list (preemption, a new sequence) is another identity, so it is
rewritten whole. Entries past a row's length may be stale: the attention reads a row only up to its
context length.
"""

from __future__ import annotations

import numpy as np


class BlockTableRows:
    """A dense int32 [max_rows, max_blocks] array of block tables, updated by difference."""

    def __init__(self, max_rows: int, max_blocks: int):
        self.array = np.zeros((max_rows, max_blocks), dtype=np.int32)
        self._tables: list[list[int] | None] = [None] * max_rows  # the list each row was filled from
        self._lengths = [0] * max_rows  # how many of its blocks are in the row
        self._evictions = [0] * max_rows  # its sequence's evictions when the row was written

    def update(self, tables: list[list[int]], evictions: list[int]) -> int:
        """Make rows [0, len(tables)) hold `tables` (`evictions[i]`: row i's `num_evicted_blocks`);
        returns the widest table's length."""
        width = 0
        array, held, lengths, evicted = self.array, self._tables, self._lengths, self._evictions
        for i, table in enumerate(tables):
            n = len(table)
            width = max(width, n)
            old = lengths[i]
            if held[i] is table and evicted[i] == evictions[i] and n >= old:
                if n > old:  # blocks appended since the last step
                    array[i, old:n] = table[old:n]
            else:
                array[i, :n] = table
                held[i], evicted[i] = table, evictions[i]
            lengths[i] = n
        return width
