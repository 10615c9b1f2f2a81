"""Per-sequence token statistics on the device, for the repetition, frequency and presence penalties.

The penalties need, per sequence, which tokens its prompt holds and how often each token occurs in
its output. Sending the token ids every step would cost a host-to-device copy proportional to the
context; instead each penalised sequence owns a row of two device tables:

- `prompt_mask` bool [capacity, V]: True where the token occurs in the prompt;
- `output_counts` int32 [capacity, V]: how many times the token was sampled.

A row is filled once, when the sequence first samples with a penalty (`row_of`: the prompt's tokens
and any output tokens it already has, so a sequence recomputed after preemption keeps its counts),
then kept current by `record`, which adds each step's sampled tokens on the device right after
sampling, with no host round trip. `release` returns the row when the sequence ends.

How the model runner uses it, once per step::

    rows = penalties.rows_for(seqs)       # state row of each logits row, -1 without penalties
    extras = SamplingExtras.from_params(..., penalty_rows=rows)
    ...                                   # process_logits, sample, then record the sampled tokens
    penalties.release(seq.seq_id)         # when a sequence finishes (or is preempted, see below)

Only sequences that set a penalty get a row, and the tables are allocated when the first one does:
a server whose requests never use penalties spends neither memory nor kernels on them. Their size is
capacity x V x 5 bytes (capacity 256 at V 152k: 195 MB), which is why capacity is the engine's
maximum number of running sequences rather than anything larger. A preempted sequence may keep its
row (its tokens do not change) or release it to make room; `row_of` rebuilds it from the tokens.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable
from collections.abc import Sequence as Seq
from typing import Protocol

import torch

from worker.engine.base import SamplingParams


def uses_penalties(params: SamplingParams) -> bool:
    """True when the request sets a repetition, frequency or presence penalty (and so needs a row)."""
    return (
        params.repetition_penalty != 1.0 or params.frequency_penalty != 0.0 or params.presence_penalty != 0.0
    )


class PenalizedSequence(Protocol):
    """What `PenaltyState.rows_for` reads of a sequence (`worker.engine.sequence.Sequence` has it)."""

    @property
    def seq_id(self) -> str: ...

    @property
    def token_ids(self) -> Seq[int]: ...

    @property
    def num_prompt_tokens(self) -> int: ...

    @property
    def sampling(self) -> SamplingParams: ...


class PenaltyState:
    """Device rows of prompt masks and output token counts, one per penalised sequence."""

    def __init__(self, capacity: int, vocab_size: int, device: torch.device | str):
        if capacity <= 0 or vocab_size <= 0:
            raise ValueError(f"capacity {capacity} and vocab size {vocab_size} must be positive")
        self.capacity = capacity
        self.vocab_size = vocab_size
        self.device = torch.device(device)
        # Allocated by the first `row_of`; None until a sequence needs a penalty.
        self.output_counts: torch.Tensor | None = None  # int32 [capacity, vocab_size]
        self.prompt_mask: torch.Tensor | None = None  # bool [capacity, vocab_size]
        self._rows: dict[Hashable, int] = {}
        self._free = list(range(capacity - 1, -1, -1))  # pop() hands out the lowest row first

    @property
    def allocated(self) -> bool:
        return self.output_counts is not None

    def __len__(self) -> int:
        """Rows in use."""
        return len(self._rows)

    def __contains__(self, seq_key: Hashable) -> bool:
        return seq_key in self._rows

    def row_of(self, seq_key: Hashable, prompt_ids: Seq[int], output_ids: Seq[int]) -> int:
        """The row of `seq_key`, filled from its tokens on first use; later calls return it unchanged.

        A new row is zeroed, the prompt's tokens are set in `prompt_mask` and the output tokens counted
        into `output_counts`: one host-to-device copy of the ids and a few kernels, queued on the
        device. The ids are checked on the host (an out-of-range index would abort the device).
        """
        row = self._rows.get(seq_key)
        if row is not None:
            return row
        if not self._free:
            raise RuntimeError(f"no penalty row left for {seq_key!r}: all {self.capacity} are in use")
        ids = torch.tensor([*prompt_ids, *output_ids], dtype=torch.int64)
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.vocab_size):
            raise ValueError(f"token ids of {seq_key!r} outside the vocabulary [0, {self.vocab_size})")
        if self.output_counts is None or self.prompt_mask is None:
            self.output_counts = torch.zeros(
                self.capacity, self.vocab_size, dtype=torch.int32, device=self.device
            )
            self.prompt_mask = torch.zeros(
                self.capacity, self.vocab_size, dtype=torch.bool, device=self.device
            )
        row = self._free.pop()
        self._rows[seq_key] = row
        counts, mask = self.output_counts[row], self.prompt_mask[row]
        counts.zero_()
        mask.zero_()
        if ids.numel():
            if self.device.type == "cuda":
                ids = ids.pin_memory()
            ids = ids.to(self.device, non_blocking=True)
            num_prompt = len(prompt_ids)
            if num_prompt:
                mask.index_fill_(0, ids[:num_prompt], True)
            if ids.numel() > num_prompt:
                output = ids[num_prompt:]
                counts.index_add_(0, output, torch.ones_like(output, dtype=torch.int32))
        return row

    def rows_for(self, seqs: Iterable[PenalizedSequence]) -> list[int]:
        """The row of each sequence that sets a penalty (`row_of`), -1 for the others.

        The token lists are sliced only for a sequence that has no row yet, so a step pays nothing
        proportional to the context once every row exists.
        """
        rows = []
        for seq in seqs:
            if not uses_penalties(seq.sampling):
                rows.append(-1)
                continue
            row = self._rows.get(seq.seq_id)
            if row is None:
                n = seq.num_prompt_tokens
                row = self.row_of(seq.seq_id, seq.token_ids[:n], seq.token_ids[n:])
            rows.append(row)
        return rows

    def release(self, seq_key: Hashable) -> None:
        """Give the row of `seq_key` back (no-op without one). Host only: `row_of` zeroes a row on reuse,
        after any `record` already queued for it, since both run in the device's queue order."""
        row = self._rows.pop(seq_key, None)
        if row is not None:
            self._free.append(row)

    def record(self, rows: torch.Tensor, tokens: torch.Tensor) -> None:
        """Count `tokens[i]` once more in row `rows[i]`, on the device (no host synchronisation).

        `rows` (int64 [P], distinct) holds only penalised sequences' rows, no -1 entries: the caller
        selects them (`SamplingExtras.penalties` keeps their state rows and logits rows, and
        `sampler.record_sampled` picks their tokens out of the step's). `tokens` is int64 [P] on the
        same device.
        """
        if rows.numel() == 0:
            return
        if self.output_counts is None:
            raise RuntimeError("penalty rows recorded before any row was assigned")
        # The rows are distinct, so each (row, token) entry gets one 1: a flat `index_add_` (one kernel,
        # atomic adds on the GPU) rather than `index_put_(accumulate=True)`, which sorts the indices.
        flat = rows * self.vocab_size + tokens
        self.output_counts.view(-1).index_add_(0, flat, torch.ones_like(flat, dtype=torch.int32))


def apply_penalties(
    logits: torch.Tensor,
    prompt_mask: torch.Tensor | None,
    output_counts: torch.Tensor,
    repetition: torch.Tensor | None,
    frequency: torch.Tensor | None,
    presence: torch.Tensor | None,
) -> torch.Tensor:
    """The penalised `logits` (float32 [P, V]); `logits` itself may be updated in place too.

    `prompt_mask` (bool) and `output_counts` (int32) are the rows' [P, V] statistics; each penalty is a
    float32 [P] per-row value, or None when no row of the batch uses it (the work is then skipped;
    `prompt_mask` may be None when `repetition` is). The order and formulas are vLLM's:

    - repetition (transformers / vLLM): tokens in the prompt or the output have their logit divided
      by the penalty when positive, multiplied by it otherwise;
    - frequency (OpenAI): logit -= frequency * count in the output;
    - presence (OpenAI): logit -= presence once the token occurs in the output.
    """
    if repetition is not None:
        assert prompt_mask is not None
        # Unseen tokens are scaled by exactly 1, which leaves them bit-identical.
        scale = torch.where(prompt_mask | (output_counts > 0), repetition.unsqueeze(1), 1.0)
        logits = torch.where(logits > 0, logits / scale, logits * scale)
    if frequency is not None:
        logits.sub_(frequency.unsqueeze(1) * output_counts)
    if presence is not None:
        logits.sub_(presence.unsqueeze(1) * (output_counts > 0))
    return logits
