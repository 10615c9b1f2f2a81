"""KV pruning: a per-sequence token budget, kept as attention sinks plus chosen blocks plus recent ones.

A sequence with a budget B (`LLM_KV_BUDGET_TOKENS`, or the request's `kv_budget_tokens`) never
attends to more than B cached tokens: before a step computes n new tokens, whole blocks are
evicted from the middle of its block table until kept + n <= B (a prefill chunk is also cut so
that it fits). The first `sink_tokens` (rounded up to a block) are never evicted: they are the
attention sinks of StreamingLLM (Xiao et al., 2023), the tokens that soak up the softmax mass
of every later query. Which middle block goes first is the mode:

  window  the oldest (StreamingLLM: sinks + a recent window).
  snapkv  the block the prompt's last query window attended to least (SnapKV, Li et al., 2024).
          Each prefill chunk of such a sequence scores its kept blocks: the attention of its last
          `obs_window` queries, summed over layers, heads and queries and over the tokens of each
          block (`window_scores`, torch over the stored K, on any device). While prefilling, the
          lowest-scored block goes. Blocks written later (decoded tokens) have no score: once
          decoding, prompt blocks go by score while they hold more than half of the non-sink
          budget, then the decoded blocks slide as a window, oldest first. The last `obs_window`
          tokens' blocks are kept while anything else can go. SnapKV proper prefills the whole
          prompt with full attention and compresses once; here a prompt longer than the budget is
          compressed chunk by chunk (a sequence never holds more than its budget), so a later
          chunk attends to what the earlier chunks' windows kept. A prompt within the budget is
          prefilled whole and compressed by score as decoding outgrows the budget.

Positions. Kept tokens keep their original RoPE positions (K is stored already rotated) and new
tokens get their true index; attention reads the block table with the evicted blocks removed, so
its context length is the number of kept tokens. StreamingLLM instead re-numbers positions
inside the cache (it stores K before RoPE and rotates at every read), because its models meet
positions beyond their training context. We keep true positions because a kept block is never
written again: a block shared with another sequence through the prefix cache, or an INT8 block
with its scales, stays exactly as computed, and nothing is re-rotated. The price is that a
sequence's positions still grow past the budget, so it must stay within the model's
`max_position_embeddings` (8192 for SmolLM2), as without pruning.

Sharing. Eviction drops this sequence's reference only: a block another sequence reads keeps its
contents and its count. Blocks computed after a sequence's first eviction saw a pruned context,
so they are never published to the prefix cache; blocks computed before it are exact and stay
shared.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

from worker.engine.sequence import Sequence

PruneMode = Literal["window", "snapkv"]
PRUNE_MODES: tuple[str, ...] = ("window", "snapkv")
DEFAULT_SINK_TOKENS = 4
DEFAULT_OBS_WINDOW = 32


@dataclass(frozen=True)
class PrunePolicy:
    """The engine's pruning knobs; a sequence's own budget lives on the sequence (0 = no pruning)."""

    block_size: int = 16
    default_budget_tokens: int = 0
    sink_tokens: int = DEFAULT_SINK_TOKENS
    mode: PruneMode = "window"
    obs_window: int = DEFAULT_OBS_WINDOW

    def __post_init__(self) -> None:
        if self.mode not in PRUNE_MODES:
            raise ValueError(f"LLM_KV_PRUNE_MODE must be one of {', '.join(PRUNE_MODES)}; got {self.mode!r}")
        if self.sink_tokens < 0 or self.default_budget_tokens < 0:
            raise ValueError("KV budget and sink tokens must be >= 0")
        problem = self.budget_problem(self.default_budget_tokens)
        if problem:
            raise ValueError(f"LLM_KV_BUDGET_TOKENS: {problem}")

    @property
    def sink_blocks(self) -> int:
        return -(-self.sink_tokens // self.block_size)

    @property
    def min_budget_tokens(self) -> int:
        """The smallest budget that works: the sink blocks plus one block."""
        return (self.sink_blocks + 1) * self.block_size

    def budget_problem(self, budget: int) -> str | None:
        """Why `budget` cannot be a sequence's budget, or None if it can (0 = off)."""
        if budget < 0:
            return "kv_budget_tokens must be >= 0"
        if 0 < budget < self.min_budget_tokens:
            return (
                f"kv_budget_tokens must be 0 (off) or at least {self.min_budget_tokens} "
                f"(the {self.sink_blocks * self.block_size} sink tokens plus one block of {self.block_size})"
            )
        return None

    def budget_of(self, requested: int | None) -> int:
        return self.default_budget_tokens if requested is None else requested

    def cap_blocks(self, budget: int) -> int:
        """Most blocks a sequence with this budget ever holds (kept tokens <= budget, plus slack)."""
        return -(-budget // self.block_size) + 1

    def max_prefix_blocks(self, budget: int, worst_case: bool = False) -> int:
        """Prefix-cache hits a budgeted sequence may take: leave at least one block for its first chunk.

        Under worst-case reservation only the sink blocks: a shared block it evicted later would free
        nothing, so the blocks reserved at admission would no longer cover its growth; with private
        blocks every eviction returns one to the pool for the next one it needs.
        """
        if worst_case:
            return min(self.sink_blocks, max(budget // self.block_size - 1, 0))
        return max(budget // self.block_size - 1, 0)

    def chunk_cap(self, budget: int) -> int:
        """Largest prefill chunk of a budgeted sequence: half of what is not sinks, so a chunk still
        attends to a recent window of about the same size."""
        return max((budget - self.sink_blocks * self.block_size) // 2, 1)

    def fit(self, seq: Sequence, num_tokens: int) -> tuple[int, list[int]]:
        """Evict blocks so that `num_tokens` new tokens fit the budget; returns (tokens to compute now,
        evicted block ids, in eviction order). The caller drops the evicted blocks' references."""
        budget = seq.kv_budget_tokens
        if budget <= 0:
            return num_tokens, []
        if num_tokens > 1:
            num_tokens = min(num_tokens, self.chunk_cap(budget))
        evicted: list[int] = []
        while seq.kv_len(seq.num_computed_tokens) + num_tokens > budget:
            victim = self.victim(seq)
            if victim is None:
                break
            evicted.append(seq.evict_block(victim, self.block_size))
        kept = seq.kv_len(seq.num_computed_tokens)
        return max(min(num_tokens, budget - kept), 1), evicted

    def victim(self, seq: Sequence) -> int | None:
        """Table index of the next block to evict: full, computed, not a sink; None if there is none."""
        bs = self.block_size
        full = seq.kv_len(seq.num_computed_tokens) // bs  # table entries [0, full) are full and computed
        first = self.sink_blocks
        if full <= first:
            return None
        if self.mode == "window":
            return first
        # Keep the blocks of the last obs_window computed tokens while any other block can go.
        protected = -(-self.obs_window // bs)
        candidates = range(first, max(full - protected, first)) or range(first, full)
        scored = [i for i in candidates if i < len(seq.block_scores)]
        unscored = [i for i in candidates if i >= len(seq.block_scores)]
        # Prompt blocks (scored) compete by score until they hold at most half of the non-sink budget;
        # past that, the generated blocks (unscored) slide as a window, oldest first.
        prompt_blocks = max(min(len(seq.block_scores), len(seq.block_table)) - first, 0)
        if scored and (not unscored or prompt_blocks * bs > (seq.kv_budget_tokens - first * bs) // 2):
            return min(scored, key=lambda i: (seq.block_scores[i], i))
        return unscored[0] if unscored else None


def window_scores(query: torch.Tensor, keys: torch.Tensor, scale: float, context_len: int) -> torch.Tensor:
    """SnapKV's observation: attention of the last w queries [w, H, D] (at the end of a context of
    `context_len` kept tokens) over keys [context_len, KV, D], causal, summed over queries and heads:
    [context_len] float32."""
    num_q, num_heads, head_dim = query.shape
    num_kv_heads = keys.shape[1]
    group = num_heads // num_kv_heads
    q = query.float().reshape(num_q, num_kv_heads, group, head_dim)
    logits = torch.einsum("wkgd,lkd->wkgl", q, keys.float()) * scale
    q_pos = torch.arange(context_len - num_q, context_len, device=query.device)
    visible = torch.arange(context_len, device=query.device)[None, :] <= q_pos[:, None]
    logits = logits.masked_fill(~visible[:, None, None, :], -math.inf)
    return logits.softmax(dim=-1).sum(dim=(0, 1, 2))


def block_scores(token_scores: torch.Tensor, block_size: int) -> list[float]:
    """Per-block sums of per-token scores (the last block may be partial)."""
    n = token_scores.shape[0]
    pad = -n % block_size
    padded = torch.nn.functional.pad(token_scores.float(), (0, pad))
    return padded.reshape(-1, block_size).sum(dim=1).tolist()
