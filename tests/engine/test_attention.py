"""The paged attention reference against dense causal attention, on random tensors (no model)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from worker.engine.attention import AttentionMetadata, paged_attention_reference
from worker.engine.kv_cache import KVCache, KVCacheSpec


def test_matches_dense_causal_attention_with_gqa_chunks_and_decodes():
    gen = torch.Generator().manual_seed(0)
    heads, kv_heads, dim, block_size, num_blocks = 6, 2, 8, 4, 64
    cache = KVCache(KVCacheSpec(1, kv_heads, dim, torch.float32), num_blocks, block_size, torch.device("cpu"))
    # (context length after the step, new tokens), decodes first: two decodes, a first chunk, a later chunk.
    shapes = [(9, 1), (1, 1), (7, 7), (13, 5)]
    free = torch.randperm(num_blocks, generator=gen).tolist()
    tables, queries, slots, dense = [], [], [], []
    for context_len, new in shapes:
        table = [free.pop() for _ in range(-(-context_len // block_size))]
        keys = torch.randn(context_len, kv_heads, dim, generator=gen)
        values = torch.randn(context_len, kv_heads, dim, generator=gen)
        seq_slots = torch.tensor(
            [table[p // block_size] * block_size + p % block_size for p in range(context_len)]
        )
        cache.write(0, seq_slots, keys, values)  # the whole context, as earlier steps and this one would
        q = torch.randn(new, heads, dim, generator=gen)
        tables.append(table)
        queries.append(q)
        slots.append(seq_slots[-new:])
        # Dense reference: the new queries are the last `new` positions of the context.
        k = keys.repeat_interleave(heads // kv_heads, dim=1).transpose(0, 1)
        v = values.repeat_interleave(heads // kv_heads, dim=1).transpose(0, 1)
        mask = torch.ones(new, context_len, dtype=torch.bool).tril(context_len - new)
        dense.append(F.scaled_dot_product_attention(q.transpose(0, 1), k, v, attn_mask=mask).transpose(0, 1))
    metadata = AttentionMetadata.for_step(
        cache, "torch", torch.cat(slots).tolist(), tables, [n for _, n in shapes], [c for c, _ in shapes]
    )
    assert metadata.num_decodes == 2 and metadata.query_start_loc.tolist() == [0, 7, 12]
    k_cache, v_cache = cache.layer(0)
    out = paged_attention_reference(torch.cat(queries), k_cache, v_cache, metadata, dim**-0.5)
    torch.testing.assert_close(out, torch.cat(dense), rtol=1e-5, atol=1e-5)
