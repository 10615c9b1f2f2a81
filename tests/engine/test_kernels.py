"""The Triton kernels against the torch reference, on random tensors.

Without a GPU they run on CPU tensors under Triton's interpreter (tests/conftest.py sets
TRITON_INTERPRET=1), so CI checks the same kernel code that the GPU compiles; tests/gpu/ repeats
the comparison on the GPU in FP16/BF16 and times nothing.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from worker.engine.attention import AttentionMetadata, paged_attention_reference
from worker.engine.kernels import kernels_usable, num_decode_splits
from worker.engine.kv_cache import KVCache, KVCacheSpec

pytest.importorskip("triton")
if not kernels_usable(torch.device("cpu")) and not torch.cuda.is_available():
    pytest.skip("Triton kernels need a GPU or TRITON_INTERPRET=1", allow_module_level=True)

from worker.engine.kernels.kv_store import store_kv  # noqa: E402
from worker.engine.kernels.paged_decode import paged_decode_attention  # noqa: E402
from worker.engine.kernels.paged_prefill import paged_prefill_attention  # noqa: E402

DEVICE = torch.device("cpu")


def random_step(
    gen: torch.Generator, shapes: list[tuple[int, int]], heads: int, kv_heads: int, dim: int,
    block_size: int = 4, num_blocks: int = 96,
) -> tuple[KVCache, AttentionMetadata, torch.Tensor]:  # fmt: skip
    """A cache holding each sequence's whole context at scattered blocks, and the step's metadata.

    `shapes` lists (context length after the step, query tokens), decodes (1 query token) first.
    """
    cache = KVCache(KVCacheSpec(1, kv_heads, dim, torch.float32), num_blocks, block_size, DEVICE)
    cache.data.normal_(generator=gen)  # stale data in every slot the step must not read
    free = torch.randperm(num_blocks, generator=gen).tolist()
    tables, slots = [], []
    for context_len, new in shapes:
        table = [free.pop() for _ in range(-(-context_len // block_size))]
        seq_slots = torch.tensor(
            [table[p // block_size] * block_size + p % block_size for p in range(context_len)]
        )
        keys = torch.randn(context_len, kv_heads, dim, generator=gen)
        values = torch.randn(context_len, kv_heads, dim, generator=gen)
        cache.write(0, seq_slots, keys, values)
        tables.append(table)
        slots.append(seq_slots[-new:])
    metadata = AttentionMetadata.for_step(
        cache, "torch", torch.cat(slots).tolist(), tables, [n for _, n in shapes], [c for c, _ in shapes]
    )
    query = torch.randn(sum(new for _, new in shapes), heads, dim, generator=gen)
    return cache, metadata, query


@pytest.mark.parametrize(("heads", "kv_heads", "dim"), [(8, 2, 32), (9, 3, 64), (4, 4, 40)])
@pytest.mark.parametrize("num_splits", [1, 3, 8])
def test_decode_kernel_matches_reference(
    heads: int, kv_heads: int, dim: int, num_splits: int
):
    gen = torch.Generator().manual_seed(heads * 100 + num_splits)
    shapes = [(1, 1), (9, 1), (70, 1), (33, 1), (16, 1)]
    cache, metadata, query = random_step(gen, shapes, heads, kv_heads, dim)
    k_cache, v_cache = cache.layer(0)
    expected = paged_attention_reference(query, k_cache, v_cache, metadata, dim**-0.5)
    out = torch.full_like(query, float("nan"))
    paged_decode_attention(
        query, k_cache, v_cache, metadata.block_tables, metadata.context_lens, dim**-0.5,
        num_splits=num_splits, out=out, block_n=16,
    )  # fmt: skip
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_decode_kernel_reads_strided_queries_and_zeroes_padding_rows():
    gen = torch.Generator().manual_seed(7)
    cache, metadata, query = random_step(gen, [(12, 1), (5, 1)], 8, 2, 32)
    k_cache, v_cache = cache.layer(0)
    expected = paged_attention_reference(query, k_cache, v_cache, metadata, 0.2)
    # As transformers hands it over: [H, T, D] memory seen as [T, H, D]; plus two padding rows.
    strided = (
        torch.cat([query, torch.randn(2, 8, 32, generator=gen)]).transpose(0, 1).contiguous().transpose(0, 1)
    )
    tables = torch.cat(
        [metadata.block_tables, torch.zeros(2, metadata.block_tables.shape[1], dtype=torch.int32)]
    )
    lens = torch.cat([metadata.context_lens, torch.zeros(2, dtype=torch.int32)])
    out = paged_decode_attention(strided, k_cache, v_cache, tables, lens, 0.2, num_splits=2, block_n=16)
    torch.testing.assert_close(out[:2], expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(out[2:], torch.zeros_like(out[2:]))


@pytest.mark.parametrize(("heads", "kv_heads", "dim"), [(8, 2, 32), (6, 3, 40)])
def test_prefill_kernel_matches_reference_for_first_chunks_later_chunks_and_prefix_hits(
    heads: int, kv_heads: int, dim: int
):
    gen = torch.Generator().manual_seed(heads + dim)
    # (context after the step, chunk): a whole prompt, a later chunk, a chunk longer than a tile,
    # a prompt whose first 24 tokens came from the prefix cache, a 2-token tail.
    shapes = [(7, 7), (13, 5), (45, 37), (40, 16), (30, 2)]
    cache, metadata, query = random_step(gen, shapes, heads, kv_heads, dim)
    k_cache, v_cache = cache.layer(0)
    expected = paged_attention_reference(query, k_cache, v_cache, metadata, dim**-0.5)
    out = torch.full_like(query, float("nan"))
    paged_prefill_attention(
        query, k_cache, v_cache, metadata.block_tables, metadata.query_start_loc, metadata.context_lens,
        metadata.max_query_len, dim**-0.5, out=out, block_m=16, block_n=16,
    )  # fmt: skip
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_store_kv_writes_only_its_slots_and_skips_padding():
    gen = torch.Generator().manual_seed(3)
    k_cache = torch.randn(8, 4, 2, 16, generator=gen)
    v_cache = torch.randn(8, 4, 2, 16, generator=gen)
    before_k, before_v = k_cache.clone(), v_cache.clone()
    # [KV, T, D] memory seen as [T, KV, D], as the attention function receives it.
    keys = torch.randn(2, 5, 16, generator=gen).transpose(0, 1)
    values = torch.randn(2, 5, 16, generator=gen).transpose(0, 1)
    slots = torch.tensor([3, 17, -1, 30, 0])
    store_kv(keys, values, k_cache, v_cache, slots)
    flat_k, flat_v = before_k.view(32, 2, 16), before_v.view(32, 2, 16)
    for i, slot in enumerate(slots.tolist()):
        if slot >= 0:
            flat_k[slot], flat_v[slot] = keys[i], values[i]
    assert torch.equal(k_cache, before_k)
    assert torch.equal(v_cache, before_v)


def test_both_backends_give_one_function_on_a_mixed_step():
    """Decodes and prefill chunks in one step, through the attention entry point of each backend."""
    from worker.engine.attention import triton_paged_attention

    gen = torch.Generator().manual_seed(11)
    cache, metadata, query = random_step(gen, [(20, 1), (3, 1), (18, 18), (50, 9)], 8, 2, 32)
    metadata.decode_splits = 2
    k_cache, v_cache = cache.layer(0)
    expected = paged_attention_reference(query, k_cache, v_cache, metadata, 0.17)
    torch.testing.assert_close(triton_paged_attention(query, k_cache, v_cache, metadata, 0.17), expected)


def test_decode_splits_fill_the_gpu_and_stay_bounded():
    assert num_decode_splits(1, 8, 132) == 32
    assert num_decode_splits(4, 8, 132) == 16
    assert num_decode_splits(32, 8, 132) == 2
    assert num_decode_splits(64, 8, 132) == 1
    assert num_decode_splits(0, 8, 132) == 32
    assert {num_decode_splits(b, 8, 132) for b in range(0, 300)} == {1, 2, 4, 8, 16, 32}


def test_fused_layer_kernels_match_transformers_llama_math():
    """RMSNorm, SiLU-and-mul and RoPE + KV store against the torch code they replace."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    from worker.engine.kernels.rms_norm import rms_norm
    from worker.engine.kernels.rope_store import rope_and_store
    from worker.engine.kernels.silu_mul import silu_mul

    gen = torch.Generator().manual_seed(5)
    x, weight = torch.randn(7, 48, generator=gen), torch.randn(48, generator=gen)
    expected = weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))
    torch.testing.assert_close(rms_norm(x, weight, 1e-6), expected)
    gate_up = torch.randn(5, 2 * 40, generator=gen)
    torch.testing.assert_close(silu_mul(gate_up), F.silu(gate_up[:, :40]) * gate_up[:, 40:])

    heads, kv_heads, dim, tokens = 6, 2, 16, 5
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * dim, generator=gen)
    angles = torch.randn(tokens, dim // 2, generator=gen)
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)
    k_cache, v_cache = torch.zeros(4, 4, kv_heads, dim), torch.zeros(4, 4, kv_heads, dim)
    slots = torch.tensor([3, 9, -1, 0, 14])
    query = rope_and_store(qkv, cos, sin, k_cache, v_cache, slots, heads, kv_heads, dim)
    q, k, v = qkv.split([heads * dim, kv_heads * dim, kv_heads * dim], dim=-1)
    q_ref, k_ref = apply_rotary_pos_emb(
        q.view(1, tokens, heads, dim).transpose(1, 2), k.view(1, tokens, kv_heads, dim).transpose(1, 2),
        cos[None], sin[None],
    )  # fmt: skip
    torch.testing.assert_close(query, q_ref[0].transpose(0, 1))
    stored = slots >= 0
    flat_k, flat_v = k_cache.view(-1, kv_heads, dim), v_cache.view(-1, kv_heads, dim)
    torch.testing.assert_close(flat_k[slots[stored]], k_ref[0].transpose(0, 1)[stored])
    torch.testing.assert_close(flat_v[slots[stored]], v.view(tokens, kv_heads, dim)[stored])
    untouched = torch.ones(16, dtype=torch.bool)
    untouched[slots[stored]] = False
    assert not flat_k[untouched].any() and not flat_v[untouched].any()  # the padding row stored nothing
