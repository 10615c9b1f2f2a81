"""Paged attention plugged into transformers' models through `AttentionInterface`.

A step runs every scheduled sequence flattened into one batch row (varlen, as vLLM): B=1 and
T = one token per decoding sequence + all prefill-chunk tokens, each with its own position id,
so no padding is ever computed (CUDA-graph buckets pad only the decode batch, with rows that
store and read nothing). Decoding sequences come first: tokens [0, num_decodes) are one query
each, the rest are prefill chunks. The model's attention modules stay unchanged; for each layer
they call `paged_attention_forward`, which writes the new tokens' K/V into the paged cache and
then attends each sequence's queries to its own context through its block table. The per-step
metadata comes from the model runner through `attention_context`, because transformers' forward
has no argument for it.

Two backends compute the same function. `triton` (the GPU path) stores K/V and reads it in place
with the kernels of `worker/engine/kernels/`, launching a fixed number of kernels per layer so
the decode forward can be captured in a CUDA graph. `torch` (`paged_attention_reference`) is
plain torch, exact, runs on CPU, and is the oracle the kernels are tested against.

With an INT8 cache (`LLM_KV_DTYPE=int8`) both backends take the layer's scales as well: the
reference dequantises the blocks it gathers (`quant/kv_int8.py`), the kernels quantise as they
store and dequantise as they load, so no full-precision copy of the cache is ever made. Such a
cache holds K and V rotated by a Hadamard matrix H (`kv_cache.py`): both stores rotate, the
attention function rotates the queries by H first and multiplies the output by H^T after (two
small matmuls per layer, on the cache's preallocated H), and the attention kernels and the
reference attend in the rotated basis unchanged. A float
cache of another dtype than the activations (FP16 KV under FP32 activations, say) is read and
cast to the queries' dtype the same way.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import AttentionInterface

from worker.engine.kernels import kernels_usable, num_decode_splits
from worker.engine.kv_cache import KVCache
from worker.engine.quant.kv_int8 import dequantize_kv

PAGED_ATTENTION = "engine_paged"
AttentionBackend = Literal["triton", "torch"]
# cuDNN's SDPA builds a new execution graph for every new context length (~5 ms of CPU per call on
# H100), and a decode step's longest context changes every step; the other kernels take any shape.
_SDPA_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def resolve_backend(requested: str, device: torch.device) -> AttentionBackend:
    """`auto` takes the Triton kernels wherever they run (CUDA), else the torch reference."""
    if requested == "torch":
        return "torch"
    usable = kernels_usable(device)
    if requested == "triton":
        if not usable:
            raise RuntimeError(
                f"Triton kernels cannot run on {device} here (no triton, or CPU without TRITON_INTERPRET=1)"
            )
        return "triton"
    if requested != "auto":
        raise ValueError(f"unknown attention backend {requested!r}")
    return "triton" if usable and device.type == "cuda" else "torch"


@dataclass
class AttentionMetadata:
    """Where one step's tokens go and what they read. Device tensors only, so a CUDA graph can hold them.

    Sequences are ordered decodes first. `query_start_loc` covers the prefill sequences only, with
    offsets relative to their first token (flat index `num_decodes`).
    """

    kv_cache: KVCache
    backend: AttentionBackend
    slot_mapping: torch.Tensor  # [T] int64 flat cache slot of each new token; -1 = padding, not stored
    block_tables: torch.Tensor  # [S, max_blocks] int32; entries past a sequence's blocks are never read
    context_lens: torch.Tensor  # [S] int32 K/V length of each sequence once this step's tokens are written
    num_decodes: int  # leading sequences with one query token each
    query_start_loc: torch.Tensor  # [S - num_decodes + 1] int32 offsets of the prefill chunks
    max_query_len: int  # longest prefill chunk (0 without prefills)
    decode_splits: int = 1  # context splits of the decode kernel (flash-decoding)
    # Host copies for the torch reference (unset in CUDA graphs, which never run the reference).
    query_lens_host: list[int] | None = None
    context_lens_host: list[int] | None = None
    # SnapKV observation windows (`kv_prune.py`), eager steps only: (row, flat index of its first query,
    # queries), and where each layer adds its scores of the row's kept tokens.
    score_requests: list[tuple[int, int, int]] = field(default_factory=list)
    scores: dict[int, torch.Tensor] = field(default_factory=dict)

    @classmethod
    def for_step(
        cls, kv_cache: KVCache, backend: AttentionBackend, slot_mapping: list[int],
        block_tables: list[list[int]], query_lens: list[int], context_lens: list[int], num_sms: int = 1,
    ) -> AttentionMetadata:  # fmt: skip
        """An eager step's metadata from host lists, one row per sequence, decodes (1 query token) first."""
        num_decodes = next((i for i, n in enumerate(query_lens) if n != 1), len(query_lens))
        prefill_starts = [0]
        for n in query_lens[num_decodes:]:
            prefill_starts.append(prefill_starts[-1] + n)
        width = max(len(t) for t in block_tables)
        tables = [t + [0] * (width - len(t)) for t in block_tables]

        def on_device(values: list[int] | list[list[int]], dtype: torch.dtype) -> torch.Tensor:
            return torch.tensor(values, dtype=dtype).to(kv_cache.device, non_blocking=True)

        return cls(
            kv_cache=kv_cache,
            backend=backend,
            slot_mapping=on_device(slot_mapping, torch.long),
            block_tables=on_device(tables, torch.int32),
            context_lens=on_device(context_lens, torch.int32),
            num_decodes=num_decodes,
            query_start_loc=on_device(prefill_starts, torch.int32),
            max_query_len=max(query_lens[num_decodes:], default=0),
            decode_splits=num_decode_splits(num_decodes, kv_cache.spec.num_kv_heads, num_sms),
            query_lens_host=query_lens,
            context_lens_host=context_lens,
        )


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


def current_metadata() -> AttentionMetadata:
    """The metadata of the forward in progress (set by `attention_context`)."""
    metadata = _current.get()
    if metadata is None:
        raise RuntimeError(f"{PAGED_ATTENTION} attention called outside attention_context()")
    return metadata


def _gather(
    cache: torch.Tensor, scales: torch.Tensor | None, blocks: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    """The blocks `blocks` (any index shape) of one layer's K or V, dequantised or cast to `dtype`."""
    if scales is None:
        return cache[blocks].to(dtype)
    return dequantize_kv(cache[blocks], scales[blocks], dtype)


def _decode_reference(
    query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
    context_lens: torch.Tensor, max_len: int, scale: float,
    k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None,
) -> torch.Tensor:  # fmt: skip
    """One query token per sequence, all sequences at once: [S, H, D] -> [S, H, D]."""
    num_seqs, num_heads, head_dim = query.shape
    num_kv_heads = k_cache.shape[2]
    tables = block_tables.long()
    # [S, max_blocks * block_size, kv_heads, D], cut to the longest context, as [S, kv_heads, L, D] views.
    keys = _gather(k_cache, k_scale, tables, query.dtype).flatten(1, 2)[:, :max_len].transpose(1, 2)
    values = _gather(v_cache, v_scale, tables, query.dtype).flatten(1, 2)[:, :max_len].transpose(1, 2)
    visible = torch.arange(max_len, device=query.device)[None, :] < context_lens[:, None]
    # GQA: the query heads of one kv head (h // group, as transformers' repeat_kv maps them) become
    # that head's query rows, so K/V are never repeated and any SDPA kernel with a mask applies.
    grouped = query.reshape(num_seqs, num_kv_heads, num_heads // num_kv_heads, head_dim)
    mask = visible[:, None, None, :]
    out = F.scaled_dot_product_attention(grouped, keys, values, attn_mask=mask, scale=scale)
    return out.reshape(num_seqs, num_heads, head_dim)


def _prefill_reference(
    query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_table: torch.Tensor,
    context_len: int, scale: float, k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None,
) -> torch.Tensor:  # fmt: skip
    """A chunk of n query tokens (the last n of `context_len`), causal over the context: [n, H, D]."""
    num_new, num_heads, head_dim = query.shape
    num_kv_heads = k_cache.shape[2]
    group = num_heads // num_kv_heads
    num_blocks = -(-context_len // k_cache.shape[1])
    table = block_table[:num_blocks].long()
    keys = _gather(k_cache, k_scale, table, query.dtype).flatten(0, 1)[:context_len].transpose(0, 1)
    values = _gather(v_cache, v_scale, table, query.dtype).flatten(0, 1)[:context_len].transpose(0, 1)
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
    query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, metadata: AttentionMetadata,
    scale: float, k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None,
) -> torch.Tensor:  # fmt: skip
    """Attention of the flat batch's queries [T, H, D] over the paged cache of one layer -> [T, H, D].

    The new tokens' K/V must already be in the cache. Decoding sequences are computed together;
    prefill chunks one sequence at a time, with a causal mask against the context. An INT8 cache
    comes with its scales (`KVCache.layer_scales`).
    """
    if metadata.context_lens_host is None or metadata.query_lens_host is None:
        raise ValueError("the torch reference needs the host copies of the step's lengths")
    out = torch.empty_like(query)
    n = metadata.num_decodes
    if n:
        out[:n] = _decode_reference(
            query[:n], k_cache, v_cache, metadata.block_tables[:n], metadata.context_lens[:n],
            max(metadata.context_lens_host[:n]), scale, k_scale, v_scale,
        )  # fmt: skip
    lo = n
    for i in range(n, len(metadata.context_lens_host)):
        hi = lo + metadata.query_lens_host[i]
        out[lo:hi] = _prefill_reference(
            query[lo:hi], k_cache, v_cache, metadata.block_tables[i], metadata.context_lens_host[i], scale,
            k_scale, v_scale,
        )  # fmt: skip
        lo = hi
    return out


def triton_paged_attention(
    query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, metadata: AttentionMetadata,
    scale: float, k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None,
    unrotate: bool = False,
) -> torch.Tensor:  # fmt: skip
    """The Triton kernels' attention of the step's queries [T, H, D] -> [T, H, D]. `unrotate` (an INT8
    cache, whose queries come in rotated by H): the output comes back times H^T, in the model's
    basis, from the kernels' epilogue (`KVCache.unrotate_output` is the torch path's)."""
    from worker.engine.kernels.paged_decode import paged_decode_attention
    from worker.engine.kernels.paged_prefill import paged_prefill_attention

    out = torch.empty(query.shape, dtype=query.dtype, device=query.device)
    n = metadata.num_decodes
    if n:
        paged_decode_attention(
            query[:n], k_cache, v_cache, metadata.block_tables[:n], metadata.context_lens[:n], scale,
            num_splits=metadata.decode_splits, out=out[:n], k_scale=k_scale, v_scale=v_scale,
            unrotate=unrotate,
        )  # fmt: skip
    if metadata.max_query_len:
        paged_prefill_attention(
            query[n:], k_cache, v_cache, metadata.block_tables, metadata.query_start_loc,
            metadata.context_lens, metadata.max_query_len, scale, out=out[n:], first_seq=n,
            k_scale=k_scale, v_scale=v_scale, unrotate=unrotate,
        )  # fmt: skip
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
    metadata = current_metadata()
    if query.shape[0] != 1:
        raise ValueError("paged attention expects the step flattened into one batch row")
    layer_idx: int = module.layer_idx  # type: ignore[assignment]
    new_keys, new_values = key[0].transpose(0, 1), value[0].transpose(0, 1)
    k_cache, v_cache = metadata.kv_cache.layer(layer_idx)
    k_scale, v_scale = metadata.kv_cache.layer_scales(layer_idx)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    q = query[0].transpose(0, 1)  # [T, H, D], a view
    kv_cache = metadata.kv_cache
    # An INT8 cache holds K H and V H (kv_cache.py): (q H).(k H) = q.k, and the output comes back as
    # (P V) H, multiplied by H^T below. Unchanged for a float cache.
    q = kv_cache.rotate_queries(q)
    if metadata.backend == "triton":
        from worker.engine.kernels.kv_store import store_kv

        store_kv(new_keys, new_values, k_cache, v_cache, metadata.slot_mapping, k_scale, v_scale)
        unrotate = kv_cache.rotation is not None
        out = triton_paged_attention(q, k_cache, v_cache, metadata, scale, k_scale, v_scale, unrotate)
    else:
        kv_cache.write(layer_idx, metadata.slot_mapping, new_keys, new_values)
        with sdpa_kernel(_SDPA_BACKENDS):
            out = paged_attention_reference(q, k_cache, v_cache, metadata, scale, k_scale, v_scale)
        out = kv_cache.unrotate_output(out)
    if metadata.score_requests:
        add_window_scores(q, k_cache, k_scale, metadata, scale)
    return out.unsqueeze(0), None


def add_window_scores(
    q: torch.Tensor, k_cache: torch.Tensor, k_scale: torch.Tensor | None, metadata: AttentionMetadata,
    scale: float,
) -> None:  # fmt: skip
    """Add this layer's SnapKV scores of each requested row's kept tokens (plain torch over the stored K).

    `q` must be in the stored keys' basis: rotated by H for an INT8 cache (`KVCache.rotate_queries`)."""
    from worker.engine.kv_prune import window_scores

    if metadata.context_lens_host is None:
        raise ValueError("SnapKV scores need the host copies of the step's lengths")
    block_size = k_cache.shape[1]
    for row, first, num_queries in metadata.score_requests:
        context_len = metadata.context_lens_host[row]
        table = metadata.block_tables[row, : -(-context_len // block_size)].long()
        keys = _gather(k_cache, k_scale, table, q.dtype).flatten(0, 1)[:context_len]
        scores = window_scores(q[first : first + num_queries], keys, scale, context_len)
        previous = metadata.scores.get(row)
        metadata.scores[row] = scores if previous is None else previous + scores


def register_paged_attention() -> str:
    """Register the paged attention function with transformers (idempotent); returns its name."""
    AttentionInterface.register(PAGED_ATTENTION, paged_attention_forward)
    return PAGED_ATTENTION
