"""The paged engine's structured output: the compiler, the requests waiting for their grammar, the masks.

A request with a grammar is held here, out of the step scheduler, until its grammar is compiled (on the
compiler's thread, so a slow or hostile schema never delays a step): `ready()` hands back those whose
grammar is in, each with a fresh matcher, and those whose grammar failed or timed out, with the reason.
Nothing is allocated until the first such request: an engine that never sees one pays nothing.

`mask(logits, seqs)` is called by the model runner after the step's forward is queued on the device: it
first has each constrained sequence's matcher consume the token the previous step sampled (the engine
only records it when it reads the step back, so the consume is not on the step's critical path), then
fills the host bitmask rows (CPU work that overlaps the device's forward), copies them over and sets the
disallowed logits to -inf, before any sampling extra. Both run on llguidance's thread pool without the
GIL. A sequence whose grammar the consume completed (or that refused the token: a bug, the mask allowed
only grammar tokens) gets `grammar_end` and no mask row: the engine ends its reply when it reads this
step back and drops the token it sampled, as it does after a stop string. The host buffer is refilled
only by the next step, after this step's sampled ids were read back (the step's one sync), so the
asynchronous copy never races a refill.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import Any, Literal, Protocol

import torch

from worker.engine.structured.bitmask import allocate_bitmask, apply_bitmask_
from worker.engine.structured.compiler import GrammarCompiler, GrammarHandle
from worker.engine.structured.matcher import GrammarMatcher, consume_tokens, fill_bitmasks
from worker.engine.structured.spec import GrammarError, GrammarSpec


class Constrained(Protocol):
    """What the gate needs of a sequence: its grammar, a slot for its matcher, the sampled token its matcher
    has yet to consume, and where the gate says that the grammar ended the reply."""

    matcher: GrammarMatcher | None
    grammar_token: int | None
    grammar_end: Literal["stop", "error"] | None

    @property
    def grammar(self) -> GrammarSpec | None: ...


class GrammarGate:
    """Holds constrained requests until their grammar compiles; masks their logits each step."""

    def __init__(
        self, tokenizer: Any, vocab_size: int, eos_token_ids: Collection[int], max_rows: int,
        device: torch.device, timeout_s: float = 10.0, threads: int = 0,
    ):  # fmt: skip
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.eos_token_ids = eos_token_ids
        self.max_rows = max_rows
        self.device = device
        self.timeout_s = timeout_s
        self.threads = threads  # mask-filling threads; 0: `matcher.default_threads()`
        self._compiler: GrammarCompiler | None = None
        self._host_mask: torch.Tensor | None = None
        self._device_mask: torch.Tensor | None = None
        self._held: dict[Any, GrammarHandle] = {}  # sequence -> its compile, in arrival order

    @property
    def held(self) -> list[Any]:
        """The sequences waiting for their grammar, oldest first."""
        return list(self._held)

    def hold(self, seq: Constrained) -> None:
        """Start compiling `seq.grammar` (or take it from the cache) and keep `seq` until it is in."""
        assert seq.grammar is not None
        if self._compiler is None:
            self._compiler = GrammarCompiler(
                self.tokenizer, vocab_size=self.vocab_size, eos_token_ids=self.eos_token_ids,
                timeout_s=self.timeout_s,
            )  # fmt: skip
        self._held[seq] = self._compiler.submit(seq.grammar)

    def any_done(self) -> bool:
        """Whether a held sequence's compile has ended (so `ready()` has something to hand back)."""
        return any(handle.done() for handle in self._held.values())

    def drop(self, seq: Any) -> bool:
        """Forget a held sequence (aborted); False if it was not held."""
        return self._held.pop(seq, None) is not None

    def ready(self) -> tuple[list[Any], list[tuple[Any, str]]]:
        """(sequences whose grammar is in, each with its matcher; (sequence, why) for failed grammars)."""
        started: list[Any] = []
        failed: list[tuple[Any, str]] = []
        for seq, handle in list(self._held.items()):
            try:
                compiled = handle.poll()
            except GrammarError as exc:
                failed.append((seq, str(exc)))
                del self._held[seq]
                continue
            if compiled is not None:
                seq.matcher = compiled.new_matcher()
                started.append(seq)
                del self._held[seq]
        return started, failed

    def mask(self, logits: torch.Tensor, seqs: Sequence[Constrained]) -> None:
        """Set to -inf the logits (row i: `seqs[i]`) of the tokens each constrained sequence's grammar
        forbids next; rows of unconstrained sequences are untouched, and without any nothing runs."""
        self._consume(seqs)
        rows = [(seq.matcher, i) for i, seq in enumerate(seqs) if seq.matcher and seq.grammar_end is None]
        if not rows:
            return
        if self._host_mask is None or self._host_mask.shape[0] < len(seqs):
            size = max(self.max_rows, len(seqs))
            self._host_mask = allocate_bitmask(size, self.vocab_size, pin_memory=self.device.type == "cuda")
            self._device_mask = torch.empty_like(self._host_mask, device=self.device)
        assert self._device_mask is not None
        # Only the constrained rows are filled and applied: the others' stale words are never read. (No
        # `fill_` of the buffer either: a 4 MB CPU fill runs on torch's OpenMP threads, which then spin and
        # compete with llguidance's for the cores; measured at ~1 ms a step on a 16-core host.)
        host = self._host_mask[: len(seqs)]
        fill_bitmasks(rows, host, self.threads)
        device_mask = self._device_mask[: len(seqs)]
        device_mask.copy_(host, non_blocking=True)
        # Pinned, so the copy is asynchronous: from pageable memory it would wait for the forward pass.
        index = torch.tensor([i for _, i in rows], dtype=torch.long)
        constrained = index.pin_memory() if self.device.type == "cuda" else index
        apply_bitmask_(logits, device_mask, rows=constrained.to(self.device, non_blocking=True))

    def _consume(self, seqs: Sequence[Constrained]) -> None:
        """Advance each matcher by the token its sequence sampled last; mark the replies that must end."""
        waiting = [
            (seq, seq.matcher, seq.grammar_token)
            for seq in seqs
            if seq.matcher is not None and seq.grammar_token is not None
        ]
        if not waiting:
            return
        accepted = consume_tokens([(matcher, token) for _, matcher, token in waiting], self.threads)
        for (seq, matcher, _), ok in zip(waiting, accepted, strict=True):
            seq.grammar_token = None
            if not ok:
                seq.grammar_end = "error"
            elif matcher.is_terminated:
                seq.grammar_end = "stop"

    def close(self) -> None:
        self._held.clear()
        if self._compiler is not None:
            self._compiler.close()
