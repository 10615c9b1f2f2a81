"""A step's token bitmask: allocated on the host, filled by the matchers, applied to logits on the device.

Layout (llguidance's, and xgrammar's): int32 `[batch, ceil(vocab / 32)]`, bit `t % 32` of word `t // 32`
of a row set when token `t` is allowed. 49,152 tokens are 6 KiB a row, so a step's whole mask is one small
copy; the device expands it to `[rows, vocab]` booleans only for the rows that are constrained.

Why our own `apply_bitmask_`: llguidance's torch helper (`llguidance.torch`) wraps its kernel in
`torch.compile` (importing the module alone costs ~3 s of dynamo import, and the first call compiles with a
C++ or Triton toolchain) and has no row subset. The op below is a handful of elementwise kernels, the same
on CPU and GPU, with no host synchronisation, so the engine can queue it right behind the forward pass; where
the Triton kernels run it is one launch (`kernels/token_bitmask.py`), and the torch code is the reference.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from worker.engine.kernels import kernels_usable

_SHIFTS: dict[torch.device, torch.Tensor] = {}


def bitmask_width(vocab_size: int) -> int:
    """int32 words per row for `vocab_size` tokens."""
    return (vocab_size + 31) // 32


def allocate_bitmask(batch_size: int, vocab_size: int, *, pin_memory: bool | None = None) -> torch.Tensor:
    """A host bitmask for `batch_size` rows, every token allowed (-1: all bits set).

    Pinned when CUDA is available (`pin_memory=None`), so the engine's copy to the device can be
    `non_blocking`. Allocate it once per engine (max batch rows) and reuse it: filling never allocates.
    A pinned buffer is still being read by an in-flight copy until the step's tokens are read back, so the
    engine must not refill it before then (the sampled-token read of each step is that synchronisation).
    """
    pin = torch.cuda.is_available() if pin_memory is None else pin_memory
    return torch.full((batch_size, bitmask_width(vocab_size)), -1, dtype=torch.int32, pin_memory=pin)


def _shifts(device: torch.device) -> torch.Tensor:
    shifts = _SHIFTS.get(device)
    if shifts is None:
        shifts = _SHIFTS[device] = torch.arange(32, dtype=torch.int32, device=device)
    return shifts


def allowed_tokens(words: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Bool `[rows, vocab_size]` from bitmask rows `[rows, words]`; tokens past the mask's width are False."""
    bits = (words.unsqueeze(-1) >> _shifts(words.device)) & 1  # arithmetic shift: the sign bit is bit 31
    allowed = bits.flatten(1).bool()
    width = allowed.shape[1]
    if width >= vocab_size:
        return allowed[:, :vocab_size]
    pad = torch.zeros((allowed.shape[0], vocab_size - width), dtype=torch.bool, device=allowed.device)
    return torch.cat([allowed, pad], dim=1)


def apply_bitmask_(
    logits: torch.Tensor,
    bitmask: torch.Tensor,
    rows: torch.Tensor | Sequence[int] | None = None,
    mask_rows: torch.Tensor | None = None,
) -> torch.Tensor:
    """Set the logits of disallowed tokens to -inf, in place, and return `logits`.

    `logits` is `[batch, vocab]` (any float dtype) and `bitmask` `[rows, words]` int32 on the same device;
    row i of the mask is row i of the logits, unless `mask_rows` (a device index tensor, as long as `rows`)
    names the mask row of each of `rows`. `rows` (a device index tensor, or a list, which costs one
    small host-to-device copy) limits the masking to the constrained rows; None masks every row. Tokens past
    the mask's width (a model whose logits are wider than the vocabulary the mask was built for) are
    disallowed, never silently allowed.
    """
    if bitmask.dtype != torch.int32:
        raise TypeError(f"bitmask must be int32, got {bitmask.dtype}")
    if bitmask.device != logits.device:
        raise ValueError(f"bitmask is on {bitmask.device}, logits on {logits.device}: copy the mask first")
    index = None
    if rows is not None:
        index = rows if isinstance(rows, torch.Tensor) else torch.tensor(list(rows), dtype=torch.long)
        index = index.to(logits.device, non_blocking=True)
    if mask_rows is not None and (index is None or mask_rows.shape != index.shape):
        raise ValueError("mask_rows needs rows of the same length")
    if kernels_usable(logits.device) and logits.stride(-1) == 1 and bitmask.stride(-1) == 1:
        from worker.engine.kernels.token_bitmask import apply_bitmask_kernel_  # triton: where it runs

        apply_bitmask_kernel_(logits, bitmask, index, mask_rows)
        return logits
    return apply_bitmask_reference_(logits, bitmask, index, mask_rows)


def apply_bitmask_reference_(
    logits: torch.Tensor,
    bitmask: torch.Tensor,
    rows: torch.Tensor | None = None,
    mask_rows: torch.Tensor | None = None,
) -> torch.Tensor:
    """`apply_bitmask_` in torch ops (the kernel's reference); `rows` and `mask_rows` are index tensors on
    the device."""
    vocab = logits.shape[-1]
    if rows is None:
        logits.masked_fill_(~allowed_tokens(bitmask[: logits.shape[0]], vocab), float("-inf"))
        return logits
    if rows.numel() == 0:
        return logits
    allowed = allowed_tokens(bitmask.index_select(0, rows if mask_rows is None else mask_rows), vocab)
    masked = logits.index_select(0, rows).masked_fill_(~allowed, float("-inf"))
    logits.index_copy_(0, rows, masked)
    return logits
