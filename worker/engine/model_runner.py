"""Runs one engine step through the model: flat inputs, paged-attention metadata, logits, sampling.

The transformers model runs with `use_cache=False`: our paged cache replaces its KV cache, and
the attention function registered in `attention.py` reads and writes it. Logits are computed
only at the last scheduled token of each sequence that reaches the end of its tokens this step
(a decode, or the final chunk of a prefill); a sequence in the middle of a chunked prefill
samples nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from worker.engine.attention import AttentionMetadata, attention_context, register_paged_attention
from worker.engine.block_manager import BlockManager
from worker.engine.kv_cache import KVCache
from worker.engine.sampler import sample_next_tokens
from worker.engine.sequence import Sequence


@dataclass
class ScheduledSequence:
    """A sequence and how many of its uncomputed tokens this step computes, from `start` on."""

    seq: Sequence
    num_tokens: int
    start: int = field(init=False)

    def __post_init__(self) -> None:
        self.start = self.seq.num_computed_tokens

    @property
    def completes(self) -> bool:
        """True if this step reaches the sequence's last token, so its logits give the next token."""
        return self.start + self.num_tokens == len(self.seq)

    @property
    def is_decode(self) -> bool:
        """One sampled token fed back (prompt and recomputed tokens count as prefill)."""
        return self.num_tokens == 1 and self.start >= self.seq.num_prompt_tokens


@dataclass
class StepInputs:
    input_ids: torch.Tensor  # [1, T]
    position_ids: torch.Tensor  # [1, T]
    logits_indices: torch.Tensor  # [K] flat positions whose logits are sampled
    sampling_rows: list[int]  # index into the scheduled list of each sampled row
    metadata: AttentionMetadata


class ModelRunner:
    """Owns the model and the KV cache tensors; turns a scheduled step into sampled tokens."""

    def __init__(self, model: Any, kv_cache: KVCache, block_manager: BlockManager, device: torch.device):
        self.model = model
        self.kv_cache = kv_cache
        self.block_manager = block_manager
        self.device = device
        model.set_attn_implementation(register_paged_attention())

    def prepare(self, scheduled: list[ScheduledSequence]) -> StepInputs:
        """Flatten the step into one batch row and build the attention metadata."""
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        query_start_loc = [0]
        context_lens: list[int] = []
        logits_indices: list[int] = []
        sampling_rows: list[int] = []
        for row, item in enumerate(scheduled):
            seq = item.seq
            start, end = item.start, item.start + item.num_tokens
            input_ids.extend(seq.token_ids[start:end])
            positions.extend(range(start, end))
            slots.extend(self.block_manager.slot_mapping(seq, start, end))
            query_start_loc.append(len(input_ids))
            context_lens.append(end)
            if item.completes:
                logits_indices.append(len(input_ids) - 1)
                sampling_rows.append(row)
        max_blocks = max(len(item.seq.block_table) for item in scheduled)
        tables = [item.seq.block_table + [0] * (max_blocks - len(item.seq.block_table)) for item in scheduled]

        def as_tensor(values: list[int] | list[list[int]]) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.long).to(self.device, non_blocking=True)

        metadata = AttentionMetadata(
            kv_cache=self.kv_cache,
            slot_mapping=as_tensor(slots),
            block_tables=as_tensor(tables),
            query_start_loc=query_start_loc,
            context_lens=context_lens,
            context_lens_tensor=as_tensor(context_lens),
        )
        return StepInputs(
            input_ids=as_tensor(input_ids).unsqueeze(0),
            position_ids=as_tensor(positions).unsqueeze(0),
            logits_indices=as_tensor(logits_indices),
            sampling_rows=sampling_rows,
            metadata=metadata,
        )

    @torch.inference_mode()
    def execute(self, scheduled: list[ScheduledSequence]) -> list[int | None]:
        """Run the step; returns the sampled token of each scheduled sequence, None mid-prefill."""
        if not scheduled:
            return []
        inputs = self.prepare(scheduled)
        sampled: list[int | None] = [None] * len(scheduled)
        with attention_context(inputs.metadata):
            out = self.model(
                input_ids=inputs.input_ids,
                position_ids=inputs.position_ids,
                use_cache=False,
                logits_to_keep=inputs.logits_indices,
            )
        if not inputs.sampling_rows:
            return sampled
        logits = out.logits[0]
        seqs = [scheduled[row].seq for row in inputs.sampling_rows]
        tokens = sample_next_tokens(logits, [s.sampling for s in seqs], [s.generator for s in seqs])
        for row, token in zip(inputs.sampling_rows, tokens, strict=True):
            sampled[row] = token
        return sampled
