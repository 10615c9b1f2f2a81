"""Runs one engine step through the model: flat inputs, paged-attention metadata, logits, sampling.

The transformers model runs with `use_cache=False`: our paged cache replaces its KV cache, and
the attention function registered in `attention.py` reads and writes it. Rows are ordered
decodes first (one query token each), then prefill chunks. Logits are computed only at the last
scheduled token of each sequence that reaches the end of its tokens this step (a decode, or the
final chunk of a prefill); a sequence in the middle of a chunked prefill samples nothing.

A step made only of decodes replays a captured CUDA graph (`cuda_graphs.py`) when the engine has
them; any step with a prefill chunk runs the model eagerly, with variable length. Sampling runs
on the device; reading the sampled ids back is the step's one host synchronisation.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from worker.engine.attention import (
    AttentionBackend,
    AttentionMetadata,
    attention_context,
    register_paged_attention,
)
from worker.engine.base import TokenLogprob
from worker.engine.block_manager import BlockManager
from worker.engine.cuda_graphs import DecodeGraphs
from worker.engine.kv_cache import KVCache
from worker.engine.logprobs import LogprobTensors, SampledReadback
from worker.engine.penalties import PenaltyState
from worker.engine.sampler import SamplingExtras, SamplingTensors, sample_with_extras
from worker.engine.sequence import FUTURE_TOKEN, Sequence
from worker.engine.structured.bitmask import apply_bitmask_, bitmask_width
from worker.engine.structured.gate import GrammarGate


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
class Unsampled:
    """What a step's sampling needs, kept from its launch when the sampling is deferred (`launch`)."""

    logits: torch.Tensor  # [K, vocab], row i for seqs[i]
    seqs: list[Sequence]
    positions: list[int]  # where each sequence's sampled token goes in its `token_ids`
    tensors: SamplingTensors
    extras: SamplingExtras


@dataclass
class LaunchedStep:
    """A step queued on the device: its sampled ids, read back (the step's one sync) by `result`."""

    tokens: torch.Tensor | None  # int64 [K] on the device; the next step may read them there
    rows: list[int]  # index in the scheduled list of each sampled token
    num_scheduled: int
    # SnapKV scores of the kept tokens of scored prefill chunks, by index in the scheduled list.
    scores: dict[int, torch.Tensor] = field(default_factory=dict)
    logprobs: LogprobTensors | None = None  # of the sampled rows that asked for them
    readback: SampledReadback | None = None  # the ids and logprobs on their way to the host
    unsampled: Unsampled | None = None  # set while the sampling is deferred (`ModelRunner.sample`)

    def __post_init__(self) -> None:
        if self.tokens is not None and self.readback is None:
            self.readback = SampledReadback(self.tokens, self.logprobs)

    def result(self) -> tuple[list[int | None], list[TokenLogprob | None]]:
        """The sampled token of each scheduled sequence, None mid-prefill, and its logprobs where asked
        (waits for this step's copy only: one read for both)."""
        sampled: list[int | None] = [None] * self.num_scheduled
        logprobs: list[TokenLogprob | None] = [None] * self.num_scheduled
        if self.readback is not None:
            ids, lps = self.readback.result()
            for row, token, lp in zip(self.rows, ids, lps, strict=True):
                sampled[row] = token
                logprobs[row] = lp
        return sampled, logprobs


def is_future_input(item: ScheduledSequence) -> bool:
    """True if the row's input token was sampled by the previous step and is not read back yet (only a
    decode row's can be: a sequence's future tokens are its last ones, and prefill chunks end before)."""
    first = item.seq.first_future
    if first is None or item.start + item.num_tokens <= first:
        return False
    if item.num_tokens != 1 or item.seq.token_ids[item.start] != FUTURE_TOKEN:
        raise RuntimeError(f"sequence {item.seq.seq_id!r} scheduled past a token not read back")
    return True


def _tokens_of(prev_tokens: torch.Tensor | None) -> torch.Tensor:
    if prev_tokens is None:
        raise RuntimeError("a decode row's input is a future token, but no previous step's tokens were given")
    return prev_tokens


def sliding_window(config: Any) -> int | None:
    """The model's attention window if it uses one (the paged engine attends to the full context)."""
    window = getattr(config, "sliding_window", None)
    if isinstance(window, int) and getattr(config, "use_sliding_window", True):
        return window
    return None


class ModelRunner:
    """Owns the model and the KV cache tensors; turns a scheduled step into sampled tokens."""

    def __init__(
        self, model: Any, kv_cache: KVCache, block_manager: BlockManager, device: torch.device,
        backend: AttentionBackend = "torch", graphs: DecodeGraphs | None = None, score_window: int = 0,
        grammars: GrammarGate | None = None, eos_token_ids: frozenset[int] = frozenset(),
        max_seqs: int = 256,
    ):  # fmt: skip
        self.model = model
        self.kv_cache = kv_cache
        self.block_manager = block_manager
        self.device = device
        self.backend = backend
        self.graphs = graphs
        # SnapKV (`kv_prune.py`): the last this many queries of a budgeted sequence's prefill chunk score
        # its kept blocks (0 = never).
        self.score_window = score_window
        self.grammars = grammars  # structured output: masks the logits of constrained sequences
        self.eos_token_ids = eos_token_ids  # masked by `min_tokens`
        self.vocab_size = grammars.vocab_size if grammars is not None else int(model.config.vocab_size)
        # Token counts of the sequences with penalties, on the device (allocated at the first such one).
        self.penalties = PenaltyState(max_seqs, self.vocab_size, device)
        self.window = sliding_window(model.config)
        self.num_sms = (
            torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1
        )
        model.set_attn_implementation(register_paged_attention())

    @staticmethod
    def order(scheduled: list[ScheduledSequence]) -> list[int]:
        """Row order of a step: single-token rows (decodes) first, then prefill chunks, stable."""
        return sorted(range(len(scheduled)), key=lambda i: scheduled[i].num_tokens > 1)

    def _check_window(self, context_lens: list[int]) -> None:
        if self.window is not None and max(context_lens) > self.window:
            raise NotImplementedError("sliding-window attention is not supported by the paged engine yet")

    def _eager_logits(
        self,
        rows: list[ScheduledSequence],
        scores: dict[int, torch.Tensor] | None = None,
        prev_tokens: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, list[int]]:
        """Run the flat batch eagerly; returns logits of the completing rows and their indices in `rows`.

        Positions are the tokens' true indices; context lengths count the kept tokens (a pruned sequence's
        evicted blocks are not in its table). SnapKV scores of the rows that ask for them go to `scores`.
        """
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        query_lens: list[int] = []
        context_lens: list[int] = []
        logits_indices: list[int] = []
        sampled_rows: list[int] = []
        score_requests: list[tuple[int, int, int]] = []
        future_dst: list[int] = []  # input positions whose token the previous step sampled on the device
        future_src: list[int] = []
        for i, item in enumerate(rows):
            seq = item.seq
            start, end = item.start, item.start + item.num_tokens
            if is_future_input(item):
                future_dst.append(len(input_ids))
                future_src.append(seq.future_row)
            if self.score_window and seq.kv_budget_tokens and item.num_tokens > 1:
                window = min(self.score_window, item.num_tokens)
                score_requests.append((i, len(input_ids) + item.num_tokens - window, window))
            input_ids.extend(seq.token_ids[start:end])
            positions.extend(range(start, end))
            slots.extend(self.block_manager.slot_mapping(seq, start, end))
            query_lens.append(item.num_tokens)
            context_lens.append(seq.kv_len(end))
            if item.completes:
                logits_indices.append(len(input_ids) - 1)
                sampled_rows.append(i)
        self._check_window(context_lens)
        metadata = AttentionMetadata.for_step(
            self.kv_cache,
            self.backend,
            slots,
            [item.seq.block_table for item in rows],
            query_lens,
            context_lens,
            self.num_sms,
        )
        if score_requests and scores is not None:
            metadata.score_requests = score_requests
            metadata.scores = scores

        def on_device(values: list[int]) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.long).to(self.device, non_blocking=True)

        if not sampled_rows:
            logits_to_keep: Any = on_device([len(input_ids) - 1])  # nothing sampled; keep one row
        else:
            logits_to_keep = on_device(logits_indices)
        ids = on_device(input_ids)
        if future_dst:
            ids[on_device(future_dst)] = _tokens_of(prev_tokens)[on_device(future_src)]
        with attention_context(metadata):
            out = self.model(
                input_ids=ids.unsqueeze(0),
                position_ids=on_device(positions).unsqueeze(0),
                use_cache=False,
                logits_to_keep=logits_to_keep,
            )
        return out.logits[0], sampled_rows

    def _graph_logits(
        self, rows: list[ScheduledSequence], prev_tokens: torch.Tensor | None = None
    ) -> torch.Tensor:
        assert self.graphs is not None
        context_lens = [item.seq.kv_len(item.start + 1) for item in rows]
        self._check_window(context_lens)
        future = [(i, item.seq.future_row) for i, item in enumerate(rows) if is_future_input(item)]
        return self.graphs.run(
            future=(future, _tokens_of(prev_tokens)) if future else None,
            input_ids=[item.seq.token_ids[item.start] for item in rows],
            positions=[item.start for item in rows],
            slots=[self.block_manager.slot_mapping(item.seq, item.start, item.start + 1)[0] for item in rows],
            context_lens=context_lens,
            block_tables=[item.seq.block_table for item in rows],
            evictions=[item.seq.num_evicted_blocks for item in rows],
        )

    @torch.inference_mode()
    def warm_up(self, prefill_tokens: int = 16) -> None:
        """One eager forward (a decode row and a prefill chunk) that reads and writes nothing of the cache.

        Compiles the step's Triton kernels before the first request pays for it. Every row has context
        length 0 and slot -1: attention returns zeros and no K/V is stored.
        """
        num_tokens = 1 + prefill_tokens
        metadata = AttentionMetadata.for_step(
            self.kv_cache,
            self.backend,
            [-1] * num_tokens,
            [[0], [0]],
            [1, prefill_tokens],
            [0, 0],
            self.num_sms,
        )
        ids = torch.zeros(1, num_tokens, dtype=torch.long, device=self.device)
        with attention_context(metadata):
            logits = self.model(input_ids=ids, position_ids=ids, use_cache=False, logits_to_keep=1).logits
        # The grammar mask's kernel too (~0.3 s to build on a fresh host): a first JSON-schema reply would
        # otherwise wait for it.
        words = bitmask_width(logits.shape[-1])
        everything = torch.full((1, words), -1, dtype=torch.int32, device=self.device)
        first = torch.zeros(1, dtype=torch.long, device=self.device)
        apply_bitmask_(logits[:, -1], everything, rows=first, mask_rows=first)

    def uses_graph(self, rows: list[ScheduledSequence]) -> bool:
        return (
            self.graphs is not None
            and all(item.num_tokens == 1 for item in rows)
            and len(rows) <= self.graphs.buckets[-1]
            and max(len(item.seq.block_table) for item in rows) <= self.graphs.max_blocks_per_seq
        )

    @torch.inference_mode()
    def launch(
        self, scheduled: list[ScheduledSequence], prev_tokens: torch.Tensor | None = None,
        defer_sampling: bool = False,
    ) -> LaunchedStep:  # fmt: skip
        """Queue the step's forward and sampling on the device; the host reads nothing back yet.

        A decode row whose input token is still a `FUTURE_TOKEN` takes it from `prev_tokens`, the
        previous step's sampled ids, on the device (row `seq.future_row`): async scheduling launches this
        step before the host has read the previous one back.

        With `defer_sampling`, a step with constrained rows queues only its forward: its grammar masks
        need the previous step's tokens, which the grammar gate's job is still consuming, so the engine
        plans and queues its next work first and calls `sample` later (before the next forward, which
        reads this step's ids). Whatever the sampling reads of the sequences is taken now.
        """
        if not scheduled:
            return LaunchedStep(None, [], 0)
        order = self.order(scheduled)
        rows = [scheduled[i] for i in order]
        row_scores: dict[int, torch.Tensor] = {}
        if self.uses_graph(rows):
            logits, sampled_rows = self._graph_logits(rows, prev_tokens), list(range(len(rows)))
        else:
            logits, sampled_rows = self._eager_logits(rows, row_scores, prev_tokens)
        scores = {order[row]: t for row, t in row_scores.items()}
        if not sampled_rows:
            return LaunchedStep(None, [], len(scheduled), scores)
        seqs = [rows[i].seq for i in sampled_rows]
        penalty_rows = self.penalties.rows_for(seqs)
        params, steps = [s.sampling for s in seqs], [s.sampling_step for s in seqs]
        tensors = SamplingTensors.from_params(params, steps, self.device)
        extras = SamplingExtras.from_params(
            params, steps, self.device, vocab_size=self.vocab_size, eos_token_ids=self.eos_token_ids,
            penalty_rows=penalty_rows,
        )  # fmt: skip
        unsampled = Unsampled(logits[: len(sampled_rows)], seqs, [len(s) for s in seqs], tensors, extras)
        launched = LaunchedStep(None, [order[i] for i in sampled_rows], len(scheduled), scores)
        if defer_sampling and any(s.matcher is not None for s in seqs):
            launched.unsampled = unsampled
        else:
            self._sample(launched, unsampled)
        return launched

    @torch.inference_mode()
    def sample(self, launched: LaunchedStep) -> None:
        """Queue a deferred sampling (`launch(defer_sampling=True)`); nothing if it was not deferred."""
        unsampled, launched.unsampled = launched.unsampled, None
        if unsampled is not None:
            self._sample(launched, unsampled)

    def _sample(self, launched: LaunchedStep, unsampled: Unsampled) -> None:
        if self.grammars is not None:
            self.grammars.mask(unsampled.logits, unsampled.seqs)  # waits for the gate's previous job
        tokens, logprobs = sample_with_extras(
            unsampled.logits, unsampled.tensors, unsampled.extras, self.penalties
        )
        launched.tokens, launched.logprobs = tokens, logprobs
        launched.readback = SampledReadback(tokens, logprobs)
        if self.grammars is not None:  # consumes and fills beside the engine's thread
            self.grammars.after_sampling(launched.readback, unsampled.seqs, unsampled.positions)
