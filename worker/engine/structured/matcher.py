"""One sequence's place in its grammar: fill its row of the step's bitmask, accept the sampled token.

A `GrammarMatcher` wraps an `llguidance.LLMatcher` copied from the compiled grammar's template. It is
used by the engine's thread only (one sequence is stepped by one thread); `fill_bitmasks` fills many rows
at once on llguidance's own thread pool, with the GIL released.

Filling reads nothing from the device and writes only the given host buffer, so the engine runs it while
the forward pass of the step is in flight. The row is fully written (llguidance clears disallowed bits),
so a buffer reused across steps needs no reset between fills.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import llguidance
import llguidance.numpy
import torch

from worker.engine.structured.spec import GrammarSpec

_executors: dict[int, llguidance.LLExecutor] = {}


def default_threads() -> int:
    """Mask-filling threads when none are configured: a quarter of the host's CPUs, 1 to 8.

    llguidance's own default (80% of the CPUs) measured worse: its threads spin after a fill and take
    the cores (often hyperthread siblings) the engine's own Python thread needs for the rest of the step.
    """
    return max(1, min(8, (os.cpu_count() or 1) // 4))


def executor(threads: int = 0) -> llguidance.LLExecutor:
    """The process-wide pool of `threads` mask-filling threads (0: `default_threads()`), made on first use."""
    threads = threads or default_threads()
    pool = _executors.get(threads)
    if pool is None:
        pool = _executors[threads] = llguidance.LLExecutor(threads)
    return pool


class GrammarMatcher:
    """Where one sequence stands in its grammar.

    After `accept` of a token that ends the grammar (a JSON value closed, nothing may follow but EOS),
    `is_terminated` is true: the reply is complete and the engine finishes it with "stop" without sampling
    another token. EOS (the tokenizer's, or the ids the compiler was given) is allowed only where the
    grammar accepts, so a sampled EOS also ends a complete reply. A token the mask did not allow is refused
    (`accept` returns False) and the matcher keeps the error in `error`; its mask then allows only EOS.
    """

    __slots__ = ("_inner", "spec")

    def __init__(self, inner: llguidance.LLMatcher, spec: GrammarSpec) -> None:
        self._inner = inner
        self.spec = spec

    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        """Write the allowed next tokens into `bitmask[row]` (host int32, `[batch, ceil(vocab / 32)]`).

        Releases the GIL while llguidance computes the mask. The buffer's width must be the compiler's
        `vocab_size` (llguidance raises on any other size rather than writing past the row).
        """
        llguidance.numpy.fill_next_token_bitmask(self._inner, bitmask.numpy(), row)

    def accept(self, token_id: int) -> bool:
        """Advance by the sampled token; False (and `error` set) if the grammar does not allow it."""
        return bool(self._inner.consume_token(token_id))

    @property
    def is_terminated(self) -> bool:
        """The reply must end here: the grammar is complete and allows nothing but EOS, or it failed."""
        return bool(self._inner.is_stopped())

    @property
    def is_accepting(self) -> bool:
        """The output so far is complete (EOS would be allowed), though the grammar may allow more."""
        return bool(self._inner.is_accepting())

    @property
    def error(self) -> str | None:
        """Why the matcher failed (a refused token, a per-step limit of the grammar engine), else None."""
        if not self._inner.is_error():
            return None
        return self._inner.get_error() or "grammar error"


def fill_bitmasks(
    rows: Sequence[tuple[GrammarMatcher, int]], bitmask: torch.Tensor, threads: int = 0
) -> None:
    """Fill several sequences' rows at once: `rows` is (matcher, row index) pairs.

    Uses a pool of `threads` llguidance threads (`executor`) that compute the masks without the GIL; for a
    large batch that beats a loop of `fill_bitmask`, for one or two rows the loop is as fast.
    """
    if not rows:
        return
    llguidance.numpy.fill_next_token_bitmask_par(
        executor(threads), [(m._inner, row) for m, row in rows], bitmask.numpy()
    )


def consume_tokens(pairs: Sequence[tuple[GrammarMatcher, int]], threads: int = 0) -> list[bool]:
    """Advance several matchers by one sampled token each: `pairs` is (matcher, token) pairs; for each, as
    `GrammarMatcher.accept`. Runs on the same pool as `fill_bitmasks`, without the GIL; one or two pairs
    go through the plain loop, which is as fast."""
    if len(pairs) <= 2:
        return [m.accept(token) for m, token in pairs]
    return list(executor(threads).consume_token_par([(m._inner, token) for m, token in pairs]))
