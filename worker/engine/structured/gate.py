"""The paged engine's structured output: the compiler, the requests waiting for their grammar, the masks.

A request with a grammar is held here, out of the step scheduler, until its grammar is compiled (on the
compiler's thread, so a slow or hostile schema never delays a step): `ready()` hands back those whose
grammar is in, each with a fresh matcher, and those whose grammar failed or timed out, with the reason.
Nothing is allocated until the first such request: an engine that never sees one pays nothing.

Each step's grammar work runs beside the engine's own thread, not on it. Once a step's sampling is queued,
`after_sampling` hands a job to the gate's thread: wait for that step's sampled ids to reach the host,
have each constrained sequence's matcher consume its token, and fill the sequence's next mask into its own
slot of a pinned host buffer (one row per constrained sequence, kept until it ends). Meanwhile the engine's
thread streams the previous tokens, plans the next step and queues its forward pass; both matcher calls
run on llguidance's thread pool without the GIL. `mask(logits, seqs)` waits for that job, fills the few
masks it did not (a sequence's first token, after its prefill), copies the slots to the device and sets
the disallowed logits to -inf (row i of the logits takes the mask in slot `seqs[i].grammar_slot`), before
any sampling extra. With async scheduling the engine calls it late: a step with constrained rows queues
its forward, and its sampling waits until the engine's next call has streamed the previous tokens
(`ModelRunner.launch(defer_sampling=True)`), so the job overlaps that work instead of delaying it.

Why a job per step and slots per sequence: the masks of step N + 1 need step N's tokens, so on one thread
the consume and the fill (~30% of a JSON-schema step at batch 256 on a 16-core H100 host, py-spy) add to
the engine's own host work, which already sets a busy engine's pace; on their own thread they overlap it.
Since the job fills masks before the next step is planned, they are kept by sequence, not by row.

A consume that completes the grammar (or refuses the token: a bug, the mask allowed only grammar tokens)
sets the sequence's `grammar_end` to (reason, position of that token): the engine ends the reply with that
token and drops any token the sequence computed after it, as it does after a stop string. Safety of the
shared buffers: the job writes only slots of sequences that had not ended when it was handed over, and a
freed slot is given out again only by `mask`, after it has waited for the job; the device copy of the
buffer is queued before the step's sampling, and the next job waits for that sampling's ids before it
writes, so a copy in flight never reads a half-written slot.
"""

from __future__ import annotations

import heapq
import sys
from collections.abc import Collection, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, Literal, Protocol

import torch

from worker.engine.structured.bitmask import allocate_bitmask, apply_bitmask_
from worker.engine.structured.compiler import GrammarCompiler, GrammarHandle
from worker.engine.structured.matcher import GrammarMatcher, consume_tokens, fill_bitmasks
from worker.engine.structured.spec import GrammarError, GrammarSpec

if TYPE_CHECKING:
    from worker.engine.logprobs import SampledReadback

GIL_SWITCH_S = 0.0005  # the interpreter's switch interval once the gate's thread runs (`after_sampling`)


GrammarEnd = tuple[Literal["stop", "error"], int]  # why the grammar ended the reply, and at which position


class Constrained(Protocol):
    """What the gate needs of a sequence: its grammar, a place for its matcher, its mask slot and whether
    the slot holds the mask of its next token, where the gate says the grammar ended the reply, and
    whether it has ended."""

    matcher: GrammarMatcher | None
    grammar_slot: int | None
    mask_ready: bool
    grammar_end: GrammarEnd | None
    finish_reason: Any

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
        self._host_mask: torch.Tensor | None = None  # pinned with CUDA: row s is slot s's next mask
        self._device_mask: torch.Tensor | None = None
        self._free_slots: list[int] = []  # a heap: the lowest free slot first keeps the copied rows few
        self._num_slots = 0  # slots ever given out: rows [0, _num_slots) of the buffers are in use
        self._thread: ThreadPoolExecutor | None = None
        self._job: Future[tuple[list[tuple[Any, GrammarEnd]], list[Any]]] | None = None
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
        self.settle()
        rows: list[int] = []
        slots: list[int] = []
        stale: list[tuple[GrammarMatcher, int]] = []
        for i, seq in enumerate(seqs):
            if seq.matcher is None or seq.grammar_end is not None or seq.finish_reason is not None:
                continue  # unconstrained, its grammar complete, or ended: the token sampled here is dropped
            if seq.grammar_slot is None:
                seq.grammar_slot = self._take_slot()
            if not seq.mask_ready:
                stale.append((seq.matcher, seq.grammar_slot))
            seq.mask_ready = False  # used by this step's sampling: the job refills it after the consume
            rows.append(i)
            slots.append(seq.grammar_slot)
        if not rows:
            return
        assert self._host_mask is not None and self._device_mask is not None
        fill_bitmasks(stale, self._host_mask, self.threads)
        # Pinned, so the copy is asynchronous: from pageable memory it would wait for the forward pass.
        # Only the slots in use are copied (the lowest free slot is given out first).
        used = self._num_slots
        self._device_mask[:used].copy_(self._host_mask[:used], non_blocking=True)
        index = torch.tensor([rows, slots], dtype=torch.long)
        if self.device.type == "cuda":
            index = index.pin_memory().to(self.device, non_blocking=True)
        apply_bitmask_(logits, self._device_mask, rows=index[0], mask_rows=index[1])

    def after_sampling(
        self, readback: SampledReadback, seqs: Sequence[Constrained], positions: Sequence[int]
    ) -> None:
        """Start the job that consumes the tokens a step sampled (`seqs[i]` sampled id i of `readback`,
        which takes position `positions[i]` of its sequence) and fills the constrained sequences' next
        masks; `mask` or `settle` waits for it."""
        work = [
            (i, seq, seq.matcher, seq.grammar_slot, positions[i])
            for i, seq in enumerate(seqs)
            if seq.matcher is not None and seq.grammar_slot is not None
            and seq.grammar_end is None and seq.finish_reason is None
        ]  # fmt: skip
        if not work:
            return
        self.settle()  # one job at a time: the next one consumes after this one
        if self._thread is None:
            self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="grammar")
            # The job takes the GIL back three times a step (after the event wait and after each llguidance
            # call), each time from an engine thread that runs Python; CPython hands it over only after the
            # switch interval (5 ms by default), longer than the job itself. `loadtest/grammar_job_bench.py`
            # on a 2-core host (128 rows beside 6 ms of Python work, 30 rounds): the job was done 1.64 ms
            # (p50; max 8.3) after that work at 5 ms, 0.47 ms (p50) at 0.5 ms. A process-wide setting, made
            # only once this engine serves a constrained request; it costs nothing while one thread alone
            # wants the GIL.
            sys.setswitchinterval(min(sys.getswitchinterval(), GIL_SWITCH_S))
        self._job = self._thread.submit(self._consume_and_fill, readback, work)

    def _consume_and_fill(
        self, readback: SampledReadback, work: list[tuple[int, Any, GrammarMatcher, int, int]]
    ) -> tuple[list[tuple[Any, GrammarEnd]], list[Any]]:
        """The job (on the gate's thread): (sequences whose grammar the token ended, with why and where;
        sequences whose slot now holds the mask of their next token)."""
        ids = readback.token_ids()  # waits for the step's ids only
        accepted = consume_tokens([(matcher, ids[i]) for i, _, matcher, _, _ in work], self.threads)
        ended: list[tuple[Any, GrammarEnd]] = []
        fills: list[tuple[GrammarMatcher, int]] = []
        filled: list[Any] = []
        for (_, seq, matcher, slot, position), ok in zip(work, accepted, strict=True):
            if not ok:
                ended.append((seq, ("error", position)))
            elif matcher.is_terminated:
                ended.append((seq, ("stop", position)))
            else:
                fills.append((matcher, slot))
                filled.append(seq)
        assert self._host_mask is not None
        fill_bitmasks(fills, self._host_mask, self.threads)
        return ended, filled

    def settle(self) -> None:
        """Wait for the step's grammar job, if any, and record what it found (an error in it is raised)."""
        job, self._job = self._job, None
        if job is None:
            return
        ended, filled = job.result()
        for seq, end in ended:
            seq.grammar_end = end
        for seq in filled:
            seq.mask_ready = True

    def release(self, seq: Constrained) -> None:
        """The sequence ended: its slot may be given out again (by `mask`, after the job it may be in)."""
        if seq.grammar_slot is not None:
            heapq.heappush(self._free_slots, seq.grammar_slot)
            seq.grammar_slot = None
            seq.mask_ready = False

    def _take_slot(self) -> int:
        """A free mask slot; the buffers grow (the job is settled: nothing else holds them) when full."""
        if self._free_slots:
            return heapq.heappop(self._free_slots)
        slot, self._num_slots = self._num_slots, self._num_slots + 1
        if self._host_mask is None or self._host_mask.shape[0] <= slot:
            size = max(self.max_rows, 2 * slot)
            host = allocate_bitmask(size, self.vocab_size, pin_memory=self.device.type == "cuda")
            device = torch.empty_like(host, device=self.device)
            if self._host_mask is not None and self._device_mask is not None:
                host[:slot] = self._host_mask[:slot]
                device[:slot] = self._device_mask[:slot]
            self._host_mask, self._device_mask = host, device
        return slot

    def close(self) -> None:
        job, self._job = self._job, None
        if job is not None and not job.cancel():
            job.exception()  # a running job writes the buffers: let it finish first
        if self._thread is not None:
            self._thread.shutdown(wait=True)
            self._thread = None
        self._held.clear()
        if self._compiler is not None:
            self._compiler.close()
