"""What a step's logprobs need of each asking row, in one read of its logits: log-sum-exp and top-k.

The reference (`worker.engine.logprobs`, torch ops) divides the rows by their temperature, writes the
whole `log_softmax` and runs `torch.topk` over it; at 256 rows and a 128k vocabulary the radix top-k
alone was 0.4 ms of an H100 step. Only the normaliser and the best k entries are needed, so here each
program reads one chunk of one row once and writes, for that chunk, its maximum, the sum of exp(score -
maximum) and its k largest scores with their token ids (k passes of max-and-remove over the chunk held
in registers; k is at most 20). A second launch, one program per row, merges the chunks: the row's
log-sum-exp from the partial sums, its top k from the chunks' candidates, and the sampled token's logprob.
Two launches in all, where the reference is a dozen kernels; the step is host-bound, so launches count.

Scores are `logits / temperature` with an IEEE division (`div_rn`, as `torch.div`), so a sampled token's
logprob equals the reference up to the summation order of the normaliser (float32: within 1e-5 of it).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 4096


@triton.jit
def _logprob_stats_kernel(
    logits_ptr, stride_logits, rows_ptr, temperature_ptr, vocab_size,
    chunk_max_ptr, chunk_sum_ptr, top_values_ptr, top_ids_ptr,
    HAS_ROWS: tl.constexpr, K: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    i = tl.program_id(0)
    chunk = tl.program_id(1)
    num_chunks = tl.num_programs(1)
    offsets = tl.arange(0, BLOCK)
    cols = chunk * BLOCK + offsets
    inside = cols < vocab_size
    row = tl.load(rows_ptr + i).to(tl.int64) if HAS_ROWS else i.to(tl.int64)
    x = tl.load(logits_ptr + row * stride_logits + cols, mask=inside, other=float("-inf")).to(tl.float32)
    scores = tl.math.div_rn(x, tl.load(temperature_ptr + i))
    peak = tl.max(scores, 0)
    shift = tl.where(peak > float("-inf"), peak, 0.0)  # an all -inf chunk sums to 0, not NaN
    total = tl.sum(tl.exp(scores - shift), 0)
    out = i * num_chunks + chunk
    tl.store(chunk_max_ptr + out, peak)
    tl.store(chunk_sum_ptr + out, total)
    for k in tl.static_range(K):
        best = tl.max(scores, 0)
        first = tl.min(tl.where(scores == best, offsets, BLOCK), 0)  # the lowest index of the maximum
        tl.store(top_values_ptr + out * K + k, best)
        # Past the vocabulary only once a chunk has fewer than K tokens, all -inf: still a token id.
        token = tl.minimum(chunk * BLOCK + first, vocab_size - 1)
        tl.store(top_ids_ptr + out * K + k, token.to(tl.int64))
        scores = tl.where(offsets == first, float("-inf"), scores)


@triton.jit
def _merge_kernel(
    chunk_max_ptr, chunk_sum_ptr, top_values_ptr, top_ids_ptr, logits_ptr, stride_logits, rows_ptr,
    tokens_ptr, temperature_ptr, num_chunks, sampled_out_ptr, values_out_ptr, ids_out_ptr,
    HAS_ROWS: tl.constexpr, K: tl.constexpr, CHUNKS: tl.constexpr, CANDIDATES: tl.constexpr,
):  # fmt: skip
    i = tl.program_id(0)
    chunks = tl.arange(0, CHUNKS)
    peaks = tl.load(chunk_max_ptr + i * num_chunks + chunks, mask=chunks < num_chunks, other=float("-inf"))
    sums = tl.load(chunk_sum_ptr + i * num_chunks + chunks, mask=chunks < num_chunks, other=0.0)
    peak = tl.max(peaks, 0)
    shift = tl.where(peak > float("-inf"), peak, 0.0)
    lse = shift + tl.log(tl.sum(sums * tl.exp(peaks - shift), 0))
    row = tl.load(rows_ptr + i).to(tl.int64) if HAS_ROWS else i.to(tl.int64)
    token = tl.load(tokens_ptr + row)
    raw = tl.load(logits_ptr + row * stride_logits + token).to(tl.float32)
    tl.store(sampled_out_ptr + i, tl.math.div_rn(raw, tl.load(temperature_ptr + i)) - lse)
    slots = tl.arange(0, CANDIDATES)
    inside = slots < num_chunks * K
    values = tl.load(top_values_ptr + i * num_chunks * K + slots, mask=inside, other=float("-inf"))
    for k in tl.static_range(K):
        best = tl.max(values, 0)
        # Among equal scores the lowest slot: the lowest chunk, so the lowest token id.
        first = tl.min(tl.where(inside & (values == best), slots, CANDIDATES), 0)
        tl.store(values_out_ptr + i * K + k, best - lse)
        tl.store(ids_out_ptr + i * K + k, tl.load(top_ids_ptr + i * num_chunks * K + first))
        values = tl.where(slots == first, float("-inf"), values)
        inside = inside & (slots != first)


def logprob_stats(
    logits: torch.Tensor, tokens: torch.Tensor, rows: torch.Tensor | None, temperature: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(sampled token's logprob [L], top logprobs [L, k], their token ids [L, k]) under `logits[rows] / T`.

    `logits` is [B, V] (any float dtype, contiguous rows), `tokens` int64 [B] the sampled ids, `rows`
    int64 [L] the rows that want logprobs (None: every row) and `temperature` float32 [L]. Top entries are
    largest first; among equal values the lower token id comes first. Two launches: the chunks, then
    one program per row merging them.
    """
    if logits.stride(-1) != 1:
        raise ValueError("logprob stats read logits with contiguous rows")
    num_rows = temperature.shape[0]
    vocab = logits.shape[-1]
    k = min(k, vocab)
    num_chunks = triton.cdiv(vocab, BLOCK)
    device = logits.device
    chunk_max = torch.empty(num_rows, num_chunks, dtype=torch.float32, device=device)
    chunk_sum = torch.empty_like(chunk_max)
    # At least one column each: an empty tensor may have no storage to point the kernel at (k = 0).
    top_values = torch.empty(num_rows, num_chunks * max(k, 1), dtype=torch.float32, device=device)
    top_ids = torch.empty(num_rows, num_chunks * max(k, 1), dtype=torch.int64, device=device)
    sampled = torch.empty(num_rows, dtype=torch.float32, device=device)
    values = torch.empty(num_rows, max(k, 1), dtype=torch.float32, device=device)
    ids = torch.empty(num_rows, max(k, 1), dtype=torch.int64, device=device)
    if num_rows:
        row_index = temperature if rows is None else rows  # read only when HAS_ROWS
        _logprob_stats_kernel[(num_rows, num_chunks)](
            logits, logits.stride(0), row_index, temperature, vocab,
            chunk_max, chunk_sum, top_values, top_ids,
            HAS_ROWS=rows is not None, K=k, BLOCK=BLOCK, num_warps=8,
        )  # fmt: skip
        _merge_kernel[(num_rows,)](
            chunk_max, chunk_sum, top_values, top_ids, logits, logits.stride(0), row_index,
            tokens, temperature, num_chunks, sampled, values, ids,
            HAS_ROWS=rows is not None, K=k, CHUNKS=triton.next_power_of_2(num_chunks),
            CANDIDATES=triton.next_power_of_2(max(num_chunks * k, 1)), num_warps=4,
        )  # fmt: skip
    return sampled, values[:, :k], ids[:, :k]
