"""A step's token bitmask applied to its logits in one launch: disallowed tokens set to -inf, in place.

`worker.engine.structured.bitmask.apply_bitmask_` is the reference: it expands the mask's rows to
[rows, words, 32] integers, then booleans, and masks a gathered copy of the rows (about eight kernels
and three full-size temporaries). Here each program reads its tokens' words (one int32 per 32 tokens)
and writes -inf only where a bit is clear: no temporaries, one kernel. Layout as the reference's:
row i of the mask is row i of the logits, bit t % 32 of word t // 32 set when token t is allowed, and
tokens past the mask's width are disallowed; with a mask-row index, logits row `rows[i]` takes mask row
`mask_rows[i]` (the paged engine keeps one mask row per constrained sequence, not per batch row).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 4096


@triton.jit
def _apply_bitmask_kernel(
    logits_ptr, stride_logits, mask_ptr, stride_mask, rows_ptr, mask_rows_ptr, vocab_size, num_words,
    HAS_ROWS: tl.constexpr, HAS_MASK_ROWS: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    i = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    row = tl.load(rows_ptr + i).to(tl.int64) if HAS_ROWS else i.to(tl.int64)
    mask_row = tl.load(mask_rows_ptr + i).to(tl.int64) if HAS_MASK_ROWS else row
    word = cols // 32
    words = tl.load(
        mask_ptr + mask_row * stride_mask + word, mask=(cols < vocab_size) & (word < num_words), other=0
    )
    allowed = ((words >> (cols % 32)) & 1) != 0
    tl.store(logits_ptr + row * stride_logits + cols, float("-inf"), mask=(cols < vocab_size) & ~allowed)


def apply_bitmask_kernel_(
    logits: torch.Tensor, bitmask: torch.Tensor, rows: torch.Tensor | None,
    mask_rows: torch.Tensor | None = None,
) -> None:  # fmt: skip
    """Mask `logits` ([B, V], contiguous rows) in place by `bitmask` (int32 [B', words], B' >= the rows
    used), on the rows of `rows` (int64 on the device; None: every row of `logits`), row `rows[i]` by
    mask row `mask_rows[i]` where given (else by mask row `rows[i]`)."""
    if logits.stride(-1) != 1 or bitmask.stride(-1) != 1:
        raise ValueError("the logits and the bitmask need contiguous rows")
    num_rows = logits.shape[0] if rows is None else rows.shape[0]
    if num_rows == 0:
        return
    vocab = logits.shape[-1]
    _apply_bitmask_kernel[(num_rows, triton.cdiv(vocab, BLOCK))](
        logits, logits.stride(0), bitmask, bitmask.stride(0), bitmask if rows is None else rows,
        bitmask if mask_rows is None else mask_rows, vocab, bitmask.shape[-1], HAS_ROWS=rows is not None,
        HAS_MASK_ROWS=mask_rows is not None, BLOCK=BLOCK, num_warps=4,
    )  # fmt: skip
