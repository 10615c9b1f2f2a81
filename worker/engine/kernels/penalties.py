"""The repetition, frequency and presence penalties of a step's penalised rows, in one launch, in place.

`worker.engine.penalties.apply_penalties` is the reference (vLLM's formulas and order). Written with
torch ops it reads and writes every [P, vocab] intermediate: the rows' statistics are gathered
(`index_select` of the counts and the prompt mask), the scale, the comparisons and the products are
each a full tensor, and the result is copied back into the logits. At 256 rows and a 128k vocabulary
that is about 2 GB of memory traffic and 15 kernels per step. Here each program reads its slice of
one logits row, that sequence's counts and prompt mask (by state row, no gather), and writes the
penalised slice back: 13 bytes per entry, one kernel.

Divisions use `div_rn` (IEEE round-to-nearest, as torch divides), so on CPU tensors under the
interpreter the result equals the reference bit for bit; on the GPU the compiler may contract a
multiply and a subtract into one FMA, a difference of at most one rounding.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 2048


@triton.jit
def _penalties_kernel(
    logits_ptr, stride_logits, logit_rows_ptr, state_rows_ptr, counts_ptr, mask_ptr, stride_state,
    repetition_ptr, frequency_ptr, presence_ptr, vocab_size,
    HAS_LOGIT_ROWS: tl.constexpr, HAS_REPETITION: tl.constexpr, HAS_FREQUENCY: tl.constexpr,
    HAS_PRESENCE: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    i = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    inside = cols < vocab_size
    row = tl.load(logit_rows_ptr + i).to(tl.int64) if HAS_LOGIT_ROWS else i.to(tl.int64)
    state = tl.load(state_rows_ptr + i).to(tl.int64)
    x_ptrs = logits_ptr + row * stride_logits + cols
    x = tl.load(x_ptrs, mask=inside, other=0.0)
    counts = tl.load(counts_ptr + state * stride_state + cols, mask=inside, other=0)
    seen_in_output = counts > 0
    if HAS_REPETITION:
        repetition = tl.load(repetition_ptr + i)
        in_prompt = tl.load(mask_ptr + state * stride_state + cols, mask=inside, other=0) != 0
        scale = tl.where(in_prompt | seen_in_output, repetition, 1.0)
        x = tl.where(x > 0, tl.math.div_rn(x, scale), x * scale)
    if HAS_FREQUENCY:
        x = x - tl.load(frequency_ptr + i) * counts.to(tl.float32)
    if HAS_PRESENCE:
        x = x - tl.load(presence_ptr + i) * seen_in_output.to(tl.float32)
    tl.store(x_ptrs, x, mask=inside)


def apply_penalties_(
    logits: torch.Tensor,
    logit_rows: torch.Tensor | None,
    state_rows: torch.Tensor,
    output_counts: torch.Tensor,
    prompt_mask: torch.Tensor | None,
    repetition: torch.Tensor | None,
    frequency: torch.Tensor | None,
    presence: torch.Tensor | None,
) -> torch.Tensor:
    """Penalise rows of `logits` (float32 [B, V], contiguous rows) in place and return it.

    Row i of the work is logits row `logit_rows[i]` (row i when None) with the statistics of state row
    `state_rows[i]` (int64 [P]) of `output_counts` (int32 [capacity, V]) and `prompt_mask` (bool, the
    same shape; may be None when `repetition` is). Each penalty is float32 [P], or None when no row uses
    it (the kernel is specialised without it).
    """
    if logits.dtype != torch.float32 or logits.stride(-1) != 1:
        raise ValueError("penalties apply to float32 logits with contiguous rows")
    num_rows = state_rows.shape[0]
    vocab = logits.shape[-1]
    if num_rows == 0:
        return logits
    if repetition is not None and prompt_mask is None:
        raise ValueError("a repetition penalty needs the prompt mask")
    same_layout = prompt_mask is None or prompt_mask.stride() == output_counts.stride()
    if output_counts.shape[-1] != vocab or not same_layout:
        raise ValueError("the counts and the prompt mask must be [capacity, vocab] with one layout")
    mask = prompt_mask.view(torch.uint8) if prompt_mask is not None else output_counts
    placeholder = state_rows  # never read: its flag is off
    _penalties_kernel[(num_rows, triton.cdiv(vocab, BLOCK))](
        logits, logits.stride(0), placeholder if logit_rows is None else logit_rows, state_rows,
        output_counts, mask, output_counts.stride(0),
        placeholder if repetition is None else repetition, placeholder if frequency is None else frequency,
        placeholder if presence is None else presence, vocab,
        HAS_LOGIT_ROWS=logit_rows is not None, HAS_REPETITION=repetition is not None,
        HAS_FREQUENCY=frequency is not None, HAS_PRESENCE=presence is not None, BLOCK=BLOCK, num_warps=4,
    )  # fmt: skip
    return logits
