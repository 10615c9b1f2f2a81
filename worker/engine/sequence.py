"""The state of one request inside the paged engine: its tokens, its KV blocks, its progress.

A sequence's tokens are the prompt followed by the tokens sampled so far. Progress is one
number, `num_computed_tokens`: how many leading tokens already have their K/V in the cache.
Prefill, chunked prefill, decode and recompute after preemption are all "compute the tokens
from `num_computed_tokens` up to the end", which keeps the scheduler and the model runner
free of per-phase special cases.
"""

from __future__ import annotations

import enum
import math
from typing import TYPE_CHECKING, Literal

from worker.engine.base import FinishReason, GenerationRequest, SamplingParams
from worker.engine.detokenizer import Decoder, IncrementalDetokenizer

# The value of a sampled token whose id the host has not read back yet (async scheduling, `paged_engine.py`):
# the device feeds the real id to the next step; no host reader may see this (a penalty row refuses it).
FUTURE_TOKEN = -1

if TYPE_CHECKING:
    from worker.engine.structured import GrammarMatcher, GrammarSpec


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class Sequence:
    """One request: token ids, block table, computed-token count, sampling state, detokenizer."""

    def __init__(
        self,
        request: GenerationRequest,
        tokenizer: Decoder | None = None,
    ):
        if not request.prompt_token_ids:
            raise ValueError(f"request {request.seq_id!r} has an empty prompt")
        self.seq_id = request.seq_id
        self.request = request
        self.token_ids: list[int] = list(request.prompt_token_ids)
        self.num_prompt_tokens = len(request.prompt_token_ids)
        self.num_computed_tokens = 0
        self.block_table: list[int] = []
        # Chained digests of this sequence's full blocks, in order (a memo of its tokens, filled by the
        # block manager); block i's digest covers tokens [0, (i + 1) * block_size).
        self.block_hashes: list[bytes] = []
        # Leading blocks of the block table already published for prefix sharing.
        self.num_registered_blocks = 0
        self.status = SequenceStatus.WAITING
        self.finish_reason: FinishReason | None = None
        # Prompt tokens served from the prefix cache at first admission (reported as usage).
        self.cached_tokens = 0
        self.num_preemptions = 0
        self.waited_steps = 0
        # KV pruning (`kv_prune.py`): the token budget (0 = off), whole blocks evicted from the middle of
        # the block table (so table index = logical block - num_evicted_blocks past the last eviction),
        # eviction scores of the kept blocks (by table index; missing = not scored), and usage figures.
        self.kv_budget_tokens = 0
        self.num_evicted_blocks = 0
        self.num_evicted_tokens = 0
        self.block_scores: list[float] = []
        self.kv_peak_tokens = 0
        self.kv_evicted_tokens = 0  # over the sequence's life, recomputes after preemption included
        # Structured output (`worker/engine/structured`): where the reply stands in its grammar, once
        # the grammar is compiled (None: unconstrained, or not compiled yet).
        self.matcher: GrammarMatcher | None = None
        # Its row of the gate's mask buffers, from its first constrained sample until it ends, and whether
        # that row holds the mask of its next token (filled by the gate's job after the last consume).
        self.grammar_slot: int | None = None
        self.mask_ready = False
        # Set by the gate's job when a token completes the grammar ("stop") or is refused ("error"), with
        # that token's position: the engine ends the reply there and drops any token computed after it.
        self.grammar_end: tuple[Literal["stop", "error"], int] | None = None
        self.max_prefix_blocks: int | None = None  # prefix-cache hits it may take (None: any)
        # Async scheduling: tokens from `first_future` on are sampled on the device but not read back yet
        # (`FUTURE_TOKEN` in `token_ids`); the last of them is row `future_row` of the latest step's
        # sampled ids, from which the device feeds it to the next step.
        self.first_future: int | None = None
        self.future_row = 0
        self.detokenizer = (
            IncrementalDetokenizer(tokenizer, request.prompt_token_ids, request.sampling.stop)
            if tokenizer is not None
            else None
        )

    @property
    def sampling(self) -> SamplingParams:
        return self.request.sampling

    @property
    def grammar(self) -> GrammarSpec | None:
        return self.request.grammar

    @property
    def priority(self) -> int:
        return self.request.priority

    @property
    def arrival_s(self) -> float:
        return self.request.arrival_s

    @property
    def deadline_s(self) -> float | None:
        return self.request.deadline_s

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def num_completion_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def sampling_step(self) -> int:
        """The step index of the next sampled token (tokens sampled so far), which keys seeded noise."""
        return self.num_completion_tokens

    @property
    def num_uncomputed_tokens(self) -> int:
        """Tokens whose K/V is not in the cache yet (the whole remaining prompt, or 1 when decoding)."""
        return len(self.token_ids) - self.num_computed_tokens

    @property
    def is_prefilling(self) -> bool:
        return self.num_uncomputed_tokens > 1

    @property
    def max_total_tokens(self) -> int:
        """Tokens whose K/V may ever be stored: the last sampled token is never fed back."""
        return self.num_prompt_tokens + max(self.sampling.max_tokens, 1) - 1

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    @property
    def num_resolved_tokens(self) -> int:
        """Tokens whose ids the host knows (all but the sampled ones still on their way back)."""
        return len(self.token_ids) if self.first_future is None else self.first_future

    def add_future_token(self, row: int) -> int:
        """Append a token sampled at `row` of a step just launched; returns its position in `token_ids`."""
        if self.first_future is None:
            self.first_future = len(self.token_ids)
        self.token_ids.append(FUTURE_TOKEN)
        self.future_row = row
        return len(self.token_ids) - 1

    def resolve_token(self, position: int, token_id: int) -> None:
        """The host read back the token at `position` (futures resolve in order)."""
        self.token_ids[position] = token_id
        if self.first_future == position:
            self.first_future = position + 1 if position + 1 < len(self.token_ids) else None

    def drop_future_tokens(self) -> None:
        """Forget the tokens not read back yet (the sequence ended: they are never streamed)."""
        if self.first_future is not None:
            del self.token_ids[self.first_future :]
            self.first_future = None

    def append_token(self, token_id: int) -> str:
        """Record a sampled token; returns the text delta that is safe to stream now."""
        self.token_ids.append(token_id)
        return self.decode_token(token_id)

    def decode_token(self, token_id: int) -> str:
        """Feed an appended token to the detokenizer (separately, so decoding can overlap the GPU)."""
        if self.detokenizer is None:
            return ""
        return self.detokenizer.add(token_id)

    def kv_len(self, num_tokens: int) -> int:
        """Cached tokens the first `num_tokens` tokens leave once evicted blocks are dropped."""
        return num_tokens - self.num_evicted_tokens

    def block_score(self, index: int) -> float:
        """Eviction score of the kept block at table `index`; unscored blocks sort after every scored one."""
        return self.block_scores[index] if index < len(self.block_scores) else math.inf

    def evict_block(self, index: int, block_size: int) -> int:
        """Drop the kept block at table `index` from this sequence; returns its id (the caller drops the
        reference). Only full, computed blocks before the tail are evicted, so later positions shift by
        exactly one block."""
        block_id = self.block_table.pop(index)
        if index < len(self.block_scores):
            del self.block_scores[index]
        self.num_evicted_blocks += 1
        self.num_evicted_tokens += block_size
        self.kv_evicted_tokens += block_size
        return block_id

    def reset_for_recompute(self) -> None:
        """Forget all cached K/V (after preemption); prompt and sampled tokens are recomputed later."""
        self.num_computed_tokens = 0
        self.block_table = []
        self.num_evicted_blocks = 0
        self.num_evicted_tokens = 0
        self.block_scores = []
        self.num_registered_blocks = 0
        self.status = SequenceStatus.WAITING
        self.num_preemptions += 1
