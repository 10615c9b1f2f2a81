"""Paged attention plugged into transformers' models through `AttentionInterface`.

A step runs every scheduled sequence flattened into one batch row (varlen, as vLLM): B=1 and
T = all prefill-chunk tokens + one token per decoding sequence, each with its own position id,
so no padding is ever computed. The model's attention modules stay unchanged; for each layer
they call `paged_attention_forward`, which writes the new tokens' K/V into the paged cache and
then attends each sequence's queries to its own context, gathered through its block table.
The per-step metadata (slot mapping, block tables, lengths) comes from the model runner through
`attention_context`, because transformers' forward has no argument for it.

`paged_attention_reference` is the kernel seam: plain torch, exact, runs on CPU; faster
kernels (Triton) must match it.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import AttentionInterface

from worker.engine.kv_cache import KVCache

PAGED_ATTENTION = "engine_paged"
# cuDNN's SDPA builds a new execution graph for every new context length (~5 ms of CPU per call on
# H100), and a decode step's longest context changes every step; the other kernels take any shape.
_SDPA_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


@dataclass
class AttentionMetadata:
    """Where one step's tokens go and what they read; sequences appear in the order of the flat batch."""

    kv_cache: KVCache
    slot_mapping: torch.Tensor  # [T] flat cache slot of each new token
    block_tables: torch.Tensor  # [S, max_blocks] int64, padded with 0
    query_start_loc: list[int]  # S + 1 offsets of each sequence's tokens in the flat batch
    context_lens: list[int]  # K/V length of each sequence once this step's tokens are written
    context_lens_tensor: torch.Tensor  # [S] the same, on the device

    def __post_init__(self) -> None:
        # Split once per step, not once per layer: decodes (one new token) run batched, prefills one by one.
        starts = self.query_start_loc
        decodes = [i for i in range(self.num_seqs) if starts[i + 1] - starts[i] == 1]
        self.prefill_seqs = [i for i in range(self.num_seqs) if starts[i + 1] - starts[i] > 1]
        device = self.slot_mapping.device
        self.decode_seqs = torch.tensor(decodes, dtype=torch.long).to(device, non_blocking=True)
        self.decode_tokens = torch.tensor([starts[i] for i in decodes], dtype=torch.long).to(
            device, non_blocking=True
        )
        self.decode_max_len = max((self.context_lens[i] for i in decodes), default=0)

    @property
    def num_seqs(self) -> int:
        return len(self.context_lens)


_current: contextvars.ContextVar[AttentionMetadata | None] = contextvars.ContextVar(
    "paged_attention_metadata", default=None
)


@contextlib.contextmanager
def attention_context(metadata: AttentionMetadata) -> Iterator[None]:
    """Make `metadata` visible to `paged_attention_forward` for the duration of one model forward."""
    token = _current.set(metadata)
    try:
        yield
    finally:
        _current.reset(token)


def _decode_attention(
    query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
    context_lens: torch.Tensor, max_len: int, scale: float,
) -> torch.Tensor:  # fmt: skip
    """One query token per sequence, all sequences at once: [S, H, D] -> [S, H, D]."""
    num_seqs, num_heads, head_dim = query.shape
    num_kv_heads = k_cache.shape[2]
    # [S, max_blocks * block_size, kv_heads, D], cut to the longest context, as [S, kv_heads, L, D] views.
    keys = k_cache[block_tables].flatten(1, 2)[:, :max_len].transpose(1, 2)
    values = v_cache[block_tables].flatten(1, 2)[:, :max_len].transpose(1, 2)
    visible = torch.arange(max_len, device=query.device)[None, :] < context_lens[:, None]
    # GQA: the query heads of one kv head (h // group, as transformers' repeat_kv maps them) become
    # that head's query rows, so K/V are never repeated and any SDPA kernel with a mask applies.
    grouped = query.reshape(num_seqs, num_kv_heads, num_heads // num_kv_heads, head_dim)
    mask = visible[:, None, None, :]
    out = F.scaled_dot_product_attention(grouped, keys, values, attn_mask=mask, scale=scale)
    return out.reshape(num_seqs, num_heads, head_dim)


def _prefill_attention(
    query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_table: torch.Tensor,
    context_len: int, scale: float,
) -> torch.Tensor:  # fmt: skip
    """A chunk of n query tokens (the last n of `context_len`), causal over the context: [n, H, D]."""
    num_new, num_heads, head_dim = query.shape
    num_kv_heads = k_cache.shape[2]
    group = num_heads // num_kv_heads
    num_blocks = -(-context_len // k_cache.shape[1])
    keys = k_cache[block_table[:num_blocks]].flatten(0, 1)[:context_len].transpose(0, 1)
    values = v_cache[block_table[:num_blocks]].flatten(0, 1)[:context_len].transpose(0, 1)
    # Query i sits at position context_len - num_new + i and sees keys up to that position.
    q_pos = torch.arange(context_len - num_new, context_len, device=query.device)
    visible = torch.arange(context_len, device=query.device)[None, :] <= q_pos[:, None]
    # GQA as in decode: [kv_heads, group * n, D] queries against [kv_heads, L, D], mask repeated per group.
    grouped = query.reshape(num_new, num_kv_heads, group, head_dim).permute(1, 2, 0, 3)
    out = F.scaled_dot_product_attention(
        grouped.reshape(num_kv_heads, group * num_new, head_dim), keys, values,
        attn_mask=visible.repeat(group, 1), scale=scale,
    )  # fmt: skip
    out = out.reshape(num_kv_heads, group, num_new, head_dim).permute(2, 0, 1, 3)
    return out.reshape(num_new, num_heads, head_dim)


def paged_attention_reference(
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    metadata: AttentionMetadata,
    scale: float,
) -> torch.Tensor:
    """Attention of the flat batch's queries [T, H, D] over the paged cache of one layer -> [T, H, D].

    The new tokens' K/V must already be in the cache. Decoding sequences (one query token) are
    computed together; prefill chunks one sequence at a time, with a causal mask against the context.
    """
    out = torch.empty_like(query)
    if metadata.decode_max_len:
        rows, tokens = metadata.decode_seqs, metadata.decode_tokens
        out[tokens] = _decode_attention(
            query[tokens], k_cache, v_cache, metadata.block_tables[rows],
            metadata.context_lens_tensor[rows], metadata.decode_max_len, scale,
        )  # fmt: skip
    starts = metadata.query_start_loc
    for i in metadata.prefill_seqs:
        lo, hi = starts[i], starts[i + 1]
        out[lo:hi] = _prefill_attention(
            query[lo:hi], k_cache, v_cache, metadata.block_tables[i], metadata.context_lens[i], scale
        )
    return out


def paged_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: object,
) -> tuple[torch.Tensor, None]:
    """transformers attention function: query [1, H, T, D], key/value [1, KV, T, D] -> [1, T, H, D]."""
    metadata = _current.get()
    if metadata is None:
        raise RuntimeError(f"{PAGED_ATTENTION} attention called outside attention_context()")
    if query.shape[0] != 1:
        raise ValueError("paged attention expects the step flattened into one batch row")
    window = kwargs.get("sliding_window")
    if isinstance(window, int) and max(metadata.context_lens) > window:
        raise NotImplementedError("sliding-window attention is not supported by the paged engine yet")
    layer_idx: int = module.layer_idx  # type: ignore[assignment]
    new_keys, new_values = key[0].transpose(0, 1), value[0].transpose(0, 1)
    metadata.kv_cache.write(layer_idx, metadata.slot_mapping, new_keys, new_values)
    k_cache, v_cache = metadata.kv_cache.layer(layer_idx)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    with sdpa_kernel(_SDPA_BACKENDS):
        out = paged_attention_reference(query[0].transpose(0, 1), k_cache, v_cache, metadata, scale)
    return out.unsqueeze(0), None


def register_paged_attention() -> str:
    """Register the paged attention function with transformers (idempotent); returns its name."""
    AttentionInterface.register(PAGED_ATTENTION, paged_attention_forward)
    return PAGED_ATTENTION
