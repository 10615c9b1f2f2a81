"""Log-probabilities of the sampled tokens and the most likely alternatives, computed on the device.

They come from the logits the token was drawn from: the processed logits (penalties, logit bias and
min_tokens applied, `sampler.process_logits`) divided by the row's temperature, through
`log_softmax`. Greedy rows use temperature 1: their values are the processed distribution itself,
where temperature 0 would make them a one-hot (0 for the argmax, -inf elsewhere). Top-k and top-p are not
applied: the values describe the distribution before truncation, so `top_logprobs` may list tokens
the row could not have drawn. (vLLM returns the raw model logits' logprobs by default; here the
request asks for the ones the sampler drew from.)

Only the rows that asked are computed, as one batch. Where the Triton kernels run (a GPU, or CPU
tensors under `TRITON_INTERPRET=1`) one read of each row gives its log-sum-exp and top k
(`kernels/logprob_stats.py`); elsewhere the reference below writes the [L, V] `log_softmax` and takes
a `topk` of the largest `top_logprobs` of the batch. Nothing is read back here; `SampledReadback` copies
the sampled ids and these values together, in one device-to-host copy started with the step and read
when its result is collected.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from worker.engine.base import TokenLogprob
from worker.engine.kernels import kernels_usable


@dataclass(frozen=True)
class LogprobRows:
    """Which logits rows want logprobs this step, and how (built on the host by `SamplingExtras`)."""

    rows: torch.Tensor | None  # int64 [L], the logits rows; None when every row of the batch wants them
    temperature: torch.Tensor  # float32 [L], the rows' temperatures (1 for greedy rows)
    row_ids: tuple[int, ...]  # the same rows, on the host
    top_counts: tuple[int, ...]  # each row's `top_logprobs`

    @property
    def max_top(self) -> int:
        return max(self.top_counts, default=0)


@dataclass(frozen=True)
class LogprobTensors:
    """One step's logprobs on the device, for the rows of `row_ids` (the rest asked for none)."""

    row_ids: tuple[int, ...]
    top_counts: tuple[int, ...]
    sampled: torch.Tensor  # float32 [L], the sampled token's logprob
    top_ids: torch.Tensor  # int64 [L, K], most likely first (K = the batch's largest top_logprobs)
    top_values: torch.Tensor  # float32 [L, K]


def compute_logprobs(logits: torch.Tensor, tokens: torch.Tensor, rows: LogprobRows) -> LogprobTensors:
    """Logprobs of `tokens` (int64 [B]) and the top alternatives under `logits` ([B, V], processed).

    The scores are `torch.div(logits, temperature)`, the very operation `sampler.sample` draws from,
    so a sampled row's values describe exactly the distribution its token came from (before top-k
    and top-p).
    """
    k = min(rows.max_top, logits.shape[-1])
    if kernels_usable(logits.device) and logits.stride(-1) == 1:
        from worker.engine.kernels.logprob_stats import logprob_stats  # triton: imported where it runs

        sampled, top_values, top_ids = logprob_stats(logits, tokens, rows.rows, rows.temperature, k)
        return LogprobTensors(rows.row_ids, rows.top_counts, sampled, top_ids, top_values)
    return compute_logprobs_reference(logits, tokens, rows)


def compute_logprobs_reference(
    logits: torch.Tensor, tokens: torch.Tensor, rows: LogprobRows
) -> LogprobTensors:
    """`compute_logprobs` in torch ops (the kernels' reference): whole `log_softmax` rows, then `topk`."""
    selected, sampled_ids = logits, tokens
    if rows.rows is not None:
        selected = logits.index_select(0, rows.rows)
        sampled_ids = tokens.index_select(0, rows.rows)
    logprobs = torch.log_softmax(torch.div(selected, rows.temperature.unsqueeze(-1)), dim=-1)
    sampled = logprobs.gather(-1, sampled_ids.unsqueeze(-1)).squeeze(-1)
    k = min(rows.max_top, logits.shape[-1])
    if k:
        top_values, top_ids = torch.topk(logprobs, k, dim=-1, sorted=True)
    else:
        top_values = logprobs.new_empty((logprobs.shape[0], 0))
        top_ids = sampled_ids.new_empty((logprobs.shape[0], 0))
    return LogprobTensors(rows.row_ids, rows.top_counts, sampled, top_ids, top_values)


def pack_sampled(tokens: torch.Tensor, logprobs: LogprobTensors | None) -> torch.Tensor:
    """The sampled ids ([B]) and the logprob tensors as one int32 device tensor (bit patterns), so the
    host reads them with one copy; `unpack_sampled` views the pieces back, exactly."""
    # int64 pieces first, so each one starts at an even int32 offset and views back as int64.
    pieces = [tokens.to(torch.int64).contiguous().view(torch.int32)]
    if logprobs is not None:
        pieces += [
            logprobs.top_ids.contiguous().view(-1).view(torch.int32),
            logprobs.sampled.to(torch.float32).contiguous().view(torch.int32),
            logprobs.top_values.to(torch.float32).contiguous().view(-1).view(torch.int32),
        ]
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces)


def unpack_sampled(
    packed: torch.Tensor, batch: int, logprobs: LogprobTensors | None
) -> tuple[list[int], list[TokenLogprob | None]]:
    """`pack_sampled`'s host copy back as the sampled ids and each row's `TokenLogprob` (None where not
    asked)."""
    token_ids = packed[: 2 * batch].view(torch.int64).tolist()
    if logprobs is None:
        return token_ids, [None] * batch
    num, k = logprobs.top_ids.shape
    ends = [2 * batch, 2 * batch + 2 * num * k, 2 * batch + 2 * num * k + num]
    top_ids = packed[ends[0] : ends[1]].view(torch.int64).view(num, k).tolist()
    sampled = packed[ends[1] : ends[2]].view(torch.float32).tolist()
    top_values = packed[ends[2] :].view(torch.float32).view(num, k).tolist()
    result: list[TokenLogprob | None] = [None] * batch
    for i, row in enumerate(logprobs.row_ids):
        count = logprobs.top_counts[i]
        top = tuple(zip(top_ids[i][:count], top_values[i][:count], strict=True))
        result[row] = TokenLogprob(token_ids[row], sampled[i], top)
    return token_ids, result


def read_sampled(
    tokens: torch.Tensor, logprobs: LogprobTensors | None
) -> tuple[list[int], list[TokenLogprob | None]]:
    """The sampled ids ([B]) and each row's `TokenLogprob` (None where not asked), in one host read
    (waits for the device; `SampledReadback` starts the copy without waiting)."""
    return unpack_sampled(pack_sampled(tokens, logprobs).cpu(), tokens.shape[0], logprobs)


class SampledReadback:
    """A step's sampled ids and logprobs on their way to the host, started when the step is launched.

    On CUDA the packed tensor is copied into pinned host memory on a side stream that waits only for
    this step's sampling, and an event marks the copy's end: `result()` waits for that event alone, so
    the host reads step N while step N+1, queued behind it, runs (async scheduling). Elsewhere the
    copy is the tensor itself.
    """

    _streams: dict[torch.device, torch.cuda.Stream] = {}

    def __init__(self, tokens: torch.Tensor, logprobs: LogprobTensors | None):
        self.batch = tokens.shape[0]
        self.logprobs = logprobs
        self.packed = pack_sampled(tokens, logprobs)  # kept alive until read: the side stream reads it
        self.event: torch.cuda.Event | None = None
        if self.packed.device.type != "cuda":
            self.host = self.packed
            return
        stream = self._streams.get(self.packed.device)
        if stream is None:
            stream = self._streams[self.packed.device] = torch.cuda.Stream(self.packed.device)
        stream.wait_stream(torch.cuda.current_stream(self.packed.device))
        self.host = torch.empty(self.packed.shape, dtype=torch.int32, pin_memory=True)
        with torch.cuda.stream(stream):
            self.host.copy_(self.packed, non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record(stream)

    def token_ids(self) -> list[int]:
        """Wait for the copy and read the sampled ids alone; reads only, so another thread may call it
        (the grammar gate's job does)."""
        if self.event is not None:
            self.event.synchronize()
        return self.host[: 2 * self.batch].view(torch.int64).tolist()

    def result(self) -> tuple[list[int], list[TokenLogprob | None]]:
        """Wait for the copy (not for later steps) and unpack it."""
        if self.event is not None:
            self.event.synchronize()
        return unpack_sampled(self.host, self.batch, self.logprobs)
