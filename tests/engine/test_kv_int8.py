"""INT8 KV cache (`LLM_KV_DTYPE=int8`, K/V rotated by a Hadamard matrix before quantising): the
quantiser's error bound, the rotation and the head_dims it accepts, the pool's block count at a byte
budget, the Triton store and attention kernels against the torch reference (under the interpreter
without a GPU), and SmolLM2 through `PagedEngine` against the FP32 cache."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pydantic
import pytest
import torch
from engine_helpers import (
    CHAT_PROMPTS,
    SYSTEM_PROMPT,
    chat,
    collect,
    common_prefix,
    drain,
    engine_config,
    greedy_tokens,
    request,
    teacher_forced_logits,
)

from worker.engine.attention import (
    AttentionMetadata,
    attention_context,
    paged_attention_forward,
    paged_attention_reference,
)
from worker.engine.factory import create_engine
from worker.engine.kernels import kernels_usable
from worker.engine.kv_cache import KVCache, KVCacheSpec, num_blocks_for_budget, resolve_kv_dtype
from worker.engine.model_files import LoadedModel
from worker.engine.paged_engine import PagedEngine
from worker.engine.quant.kv_int8 import (
    KV_SCALE_DTYPE,
    check_head_dim,
    dequantize_kv,
    hadamard_matrix,
    kv_rotation,
    quantize_kv,
)
from worker.engine.random_model import random_causal_lm
from worker.settings import WorkerSettings

CPU = torch.device("cpu")
needs_kernels = pytest.mark.skipif(
    not kernels_usable(CPU) and not torch.cuda.is_available(), reason="needs TRITON_INTERPRET=1 or a GPU"
)


def check_error_bound(x: torch.Tensor) -> float:
    """Every element within half a quantisation step of its vector's scale; returns the relative error."""
    q, scale = quantize_kv(x)
    assert q.dtype == torch.int8 and scale.dtype == KV_SCALE_DTYPE == torch.float16
    assert q.shape == x.shape and scale.shape == x.shape[:-1]
    back = dequantize_kv(q, scale, torch.float32)
    # Half a step, plus FP32 rounding of the division and product (a few ulps of |x|).
    bound = 0.5 * scale.float()[..., None] + 1e-6 * x.abs()
    assert ((back - x.float()).abs() <= bound).all()
    # The largest element of each vector maps to +-127 or next to it (scale rounded to FP16), unless
    # the vector is so small that its scale was raised to FP16's smallest normal (see kv_int8.py).
    in_range = x.abs().amax(-1) >= 127 * torch.finfo(torch.float16).tiny
    assert (q.abs().amax(-1)[in_range] >= 126).all()
    return ((back - x).norm() / x.norm()).item()


def test_quantise_dequantise_stays_within_half_a_step_on_random_vectors():
    gen = torch.Generator().manual_seed(0)
    # Vectors of very different magnitudes (per token, per head), one outlier channel, a zero vector.
    x = torch.randn(64, 4, 64, generator=gen) * torch.logspace(-2, 2, 64)[:, None, None]
    x[5, 1, 17] = 300.0
    rel = check_error_bound(x)
    assert rel < 0.01, rel  # measured 0.6% (Gaussian: step / sqrt(12) against sigma)
    # Below FP16's normal range the step stops shrinking: still within half a step (2^-15).
    tiny = torch.randn(2, 64, generator=gen) * 1e-4
    check_error_bound(tiny)
    assert (quantize_kv(tiny)[1] == torch.finfo(torch.float16).tiny).all()
    zero = torch.zeros(3, 64)
    q, scale = quantize_kv(zero)
    assert not q.any() and (scale > 0).all() and not dequantize_kv(q, scale, torch.float32).any()
    # Ties round away from zero, as the Triton kernels round.
    q, scale = quantize_kv(torch.tensor([[127.0, 0.5, -0.5, 1.5, -2.5]]))
    assert scale.item() == 1.0 and q.tolist() == [[127, 1, -1, 2, -3]]


@pytest.mark.model
def test_quantise_dequantise_error_on_smollm2_keys_and_values(smol: LoadedModel):
    """The real K (after RoPE) and V of every layer, as the FP32 engine stored them for a chat prompt."""
    engine = PagedEngine(
        smol.model, smol.tokenizer, engine_config(kv_cache_bytes=8 << 20, attention_backend="torch")
    )
    ids = chat(engine, "Explain how a refrigerator keeps food cold, step by step.")
    engine.add_request(request("r", ids, max_tokens=1))
    drain(engine)
    cache = engine.kv_cache.data  # [layers, 2, blocks, block_size, kv_heads, D]
    # The slots the prompt wrote (the pool starts zeroed), wherever its blocks are.
    written = cache.flatten(2, 3).abs().amax(-1).amax(-1).amax(0).amax(0) > 0
    assert int(written.sum()) == len(ids)
    h = kv_rotation(cache.shape[-1])
    bounds = {"K": (0.015, 0.007), "V": (0.01, 0.007)}
    for kind, name in enumerate(bounds):
        vectors = cache[:, kind].flatten(1, 2)[:, written]
        plain = check_error_bound(vectors)
        # What the INT8 cache stores: the vectors times H (orthonormal, so the error is the same
        # measured in either basis), within half a step of the rotated vector's scale.
        rotated = check_error_bound(vectors @ h)
        # Measured: K 1.15% unrotated (its largest element is ~5x its RMS, so the step is coarser),
        # 0.55% rotated; V 0.65% -> 0.59%.
        assert plain < bounds[name][0] and rotated < bounds[name][1], (name, plain, rotated)
        assert rotated < (0.6 if name == "K" else 0.95) * plain, (name, plain, rotated)
    engine.close()


def test_int8_pool_holds_1_9x_the_blocks_of_fp16_at_the_same_budget():
    budget = 256 << 20  # LLM_KV_CACHE_BYTES' default
    shapes = {"SmolLM2-135M": (30, 3, 64), "Llama-3.2-1B": (16, 8, 64), "head_dim 128": (32, 8, 128)}
    ratios = {}
    for name, (layers, kv_heads, dim) in shapes.items():
        fp16, int8 = (KVCacheSpec(layers, kv_heads, dim, dtype) for dtype in (torch.float16, torch.int8))
        # Per token per KV head: D bytes and a 2-byte FP16 scale, against 2 D bytes.
        assert int8.bytes_per_block(16) == layers * 2 * 16 * kv_heads * (dim + 2)
        assert fp16.bytes_per_block(16) == layers * 2 * 16 * kv_heads * dim * 2
        blocks = [num_blocks_for_budget(spec, 16, CPU, budget) for spec in (fp16, int8)]
        ratios[name] = blocks[1] / blocks[0]
    # 2 * 64 / 66 = 1.939 at head_dim 64, 256 / 130 = 1.969 at 128; the floor of the block counts
    # moves the third decimal: SmolLM2 728 -> 1,412 blocks (1.940x), Llama-3.2-1B 512 -> 992 (1.9375x).
    assert ratios["SmolLM2-135M"] == pytest.approx(1412 / 728) and ratios["SmolLM2-135M"] >= 1.9
    assert ratios["Llama-3.2-1B"] == pytest.approx(992 / 512) and ratios["Llama-3.2-1B"] >= 1.9
    assert ratios["head_dim 128"] >= 1.96
    # The pool allocated holds exactly what was counted, scales included, within the budget.
    spec = KVCacheSpec(30, 3, 64, torch.int8)
    num_blocks = num_blocks_for_budget(spec, 16, CPU, 8 << 20)
    cache = KVCache(spec, num_blocks, 16, CPU)
    assert cache.scales is not None and cache.scales.shape == (30, 2, num_blocks, 3, 16)  # head-major
    assert cache.layer_scales(0)[0].shape == (num_blocks, 16, 3)  # type: ignore[union-attr]
    assert cache.nbytes == num_blocks * spec.bytes_per_block(16) <= 8 << 20


def test_hadamard_matrix_is_orthonormal_and_symmetric():
    for n in (1, 2, 16, 64, 128):
        for random_signs in (False, True):
            h = hadamard_matrix(n, torch.float64, random_signs=random_signs)
            torch.testing.assert_close(h @ h.T, torch.eye(n, dtype=torch.float64))
            torch.testing.assert_close(h.abs(), torch.full_like(h, n**-0.5))
    h = kv_rotation(64)
    assert h.dtype == torch.float32 and torch.equal(h, h.T) and torch.equal(h, hadamard_matrix(64))
    # Sylvester's entry (i, j) is (-1)^popcount(i & j) / sqrt(n), as the store kernels generate it.
    signs = torch.tensor([[(-1.0) ** bin(i & j).count("1") for j in range(64)] for i in range(64)])
    assert torch.equal(h * 8, signs)
    with pytest.raises(ValueError, match="power-of-two"):
        hadamard_matrix(48)


def test_an_int8_cache_needs_a_power_of_two_head_dim():
    for head_dim in (16, 64, 128, 256):
        check_head_dim(head_dim)
    # SmolLM2-135M (576 / 9 heads) and Llama-3.2-1B (2048 / 32 heads) both have head_dim 64.
    assert 576 // 9 == 2048 // 32 == 64
    with pytest.raises(ValueError, match="LLM_KV_DTYPE=int8 needs a power-of-two head_dim"):
        KVCacheSpec(2, 2, 48, torch.int8)
    KVCacheSpec(2, 2, 48, torch.float16)  # a float cache takes any head_dim
    # A model with head_dim 48 (96 / 2 heads) is refused when the engine is built, with the reason.
    shape = {"hidden_size": 96, "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1,
             "intermediate_size": 64, "vocab_size": 49152, "max_position_embeddings": 256}  # fmt: skip
    loaded = random_causal_lm(shape, device="cpu", dtype=torch.float32)
    with pytest.raises(ValueError, match="head_dim is 48: use LLM_KV_DTYPE=auto, fp16 or bf16"):
        PagedEngine(loaded.model, loaded.tokenizer, engine_config(kv_cache_bytes=1 << 20, kv_dtype="int8"))
    engine = PagedEngine(
        loaded.model, loaded.tokenizer, engine_config(kv_cache_bytes=1 << 20, kv_dtype="fp16")
    )
    assert engine.kv_cache.rotation is None
    engine.close()


def outlier_keys(gen: torch.Generator, tokens: int, kv_heads: int, dim: int) -> torch.Tensor:
    """Keys with two outlier channels per head (~5x the RMS at their largest), as SmolLM2's."""
    keys = torch.randn(tokens, kv_heads, dim, generator=gen)
    keys[..., 3] *= 6.0
    keys[..., dim // 2 + 3] *= 4.0
    return keys * (torch.rand(tokens, kv_heads, 1, generator=gen) * 3 + 0.1)


def attend(cache: KVCache, query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """One prefill of all of `keys`' tokens through `paged_attention_forward`: [T, H, D] -> [T, H, D]."""
    tokens = keys.shape[0]
    table = list(range(-(-tokens // cache.block_size)))
    metadata = AttentionMetadata.for_step(cache, "torch", list(range(tokens)), [table], [tokens], [tokens])
    with attention_context(metadata):
        out, _ = paged_attention_forward(
            SimpleNamespace(layer_idx=0),  # type: ignore[arg-type]
            query.transpose(0, 1)[None], keys.transpose(0, 1)[None], values.transpose(0, 1)[None], None,
        )  # fmt: skip
    return out[0]


def test_the_rotated_cache_attends_like_its_reconstruction_and_closer_to_fp32_than_plain_int8():
    gen = torch.Generator().manual_seed(0)
    tokens, heads, kv_heads, dim = 40, 6, 2, 64
    keys, values = outlier_keys(gen, tokens, kv_heads, dim), torch.randn(tokens, kv_heads, dim, generator=gen)
    query = torch.randn(tokens, heads, dim, generator=gen) * 2

    def fp32_attend(k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return attend(KVCache(KVCacheSpec(1, kv_heads, dim, torch.float32), 8, 16, CPU), query, k, v)

    exact = fp32_attend(keys, values)
    cache = KVCache(KVCacheSpec(1, kv_heads, dim, torch.int8), 8, 16, CPU)
    rotated = attend(cache, query, keys, values)
    k, v = cache.layer(0)
    k_s, v_s = cache.layer_scales(0)
    assert cache.rotation is not None and k_s is not None and v_s is not None
    # What the cache holds, rotated back: every read sees exactly this.
    k_back = (dequantize_kv(k, k_s, torch.float32) @ cache.rotation.T).flatten(0, 1)[:tokens]
    v_back = (dequantize_kv(v, v_s, torch.float32) @ cache.rotation.T).flatten(0, 1)[:tokens]
    torch.testing.assert_close(rotated, fp32_attend(k_back, v_back), rtol=1e-5, atol=1e-5)
    # Against quantising the same vectors unrotated (the INT8 format before the rotation).
    k_plain, v_plain = (dequantize_kv(*quantize_kv(x), torch.float32) for x in (keys, values))
    plain = fp32_attend(k_plain, v_plain)

    def rel(a: torch.Tensor, b: torch.Tensor) -> float:
        return ((a - b).norm() / b.norm()).item()

    # The rotation halves the keys' rounding error (measured 1.11% -> 0.56%) and the output's (2.3% -> 1.3%).
    assert rel(k_back, keys) < 0.6 * rel(k_plain, keys)
    assert rel(rotated, exact) < 0.8 * rel(plain, exact), (rel(rotated, exact), rel(plain, exact))


def test_kv_dtype_setting_and_its_resolution():
    assert WorkerSettings().kv_dtype == "auto"
    assert WorkerSettings(kv_dtype="int8").kv_dtype == "int8"
    with pytest.raises(pydantic.ValidationError):
        WorkerSettings(kv_dtype="int4")  # type: ignore[arg-type]
    with pytest.raises(pydantic.ValidationError, match="LLM_KV_DTYPE=int8 needs LLM_ENGINE=paged"):
        WorkerSettings(kv_dtype="int8", engine="static")
    assert resolve_kv_dtype("auto", torch.bfloat16) == torch.bfloat16
    assert resolve_kv_dtype("int8", torch.float16) == torch.int8
    assert resolve_kv_dtype("fp16", torch.float32) == torch.float16
    with pytest.raises(ValueError, match="LLM_KV_DTYPE must be one of"):
        resolve_kv_dtype("fp8", torch.float16)


def random_int8_step(
    gen: torch.Generator, shapes: list[tuple[int, int]], heads: int, kv_heads: int, dim: int,
    block_size: int = 4, num_blocks: int = 96,
) -> tuple[KVCache, KVCache, AttentionMetadata, torch.Tensor]:  # fmt: skip
    """The same contexts in an INT8 cache and an FP32 one (same block tables), and the step's metadata.

    `shapes` lists (context length after the step, query tokens), decodes (1 query token) first.
    Keys get a different magnitude per token and head, as real keys do.
    """
    int8 = KVCache(KVCacheSpec(1, kv_heads, dim, torch.int8), num_blocks, block_size, CPU)
    fp32 = KVCache(KVCacheSpec(1, kv_heads, dim, torch.float32), num_blocks, block_size, CPU)
    # Stale data in every slot the step must not read.
    int8.data.random_(-127, 128, generator=gen)
    assert int8.scales is not None
    int8.scales.uniform_(0.5, 2.0, generator=gen)
    free = torch.randperm(num_blocks, generator=gen).tolist()
    tables, slots = [], []
    for context_len, new in shapes:
        table = [free.pop() for _ in range(-(-context_len // block_size))]
        seq_slots = torch.tensor(
            [table[p // block_size] * block_size + p % block_size for p in range(context_len)]
        )
        magnitude = torch.rand(context_len, kv_heads, 1, generator=gen) * 3 + 0.1
        keys = torch.randn(context_len, kv_heads, dim, generator=gen) * magnitude
        values = torch.randn(context_len, kv_heads, dim, generator=gen)
        for cache in (int8, fp32):
            cache.write(0, seq_slots, keys, values)
        tables.append(table)
        slots.append(seq_slots[-new:])
    metadata = AttentionMetadata.for_step(
        int8, "torch", torch.cat(slots).tolist(), tables, [n for _, n in shapes], [c for c, _ in shapes]
    )
    query = torch.randn(sum(new for _, new in shapes), heads, dim, generator=gen)
    return int8, fp32, metadata, query


def test_int8_reference_attention_stays_close_to_fp32_attention():
    gen = torch.Generator().manual_seed(1)
    int8, fp32, metadata, query = random_int8_step(gen, [(40, 1), (9, 1), (30, 30), (50, 7)], 8, 2, 32)
    # The cache holds K H and V H: the queries go in rotated, the output comes out times H^T.
    rotated_query = int8.rotate_queries(query)
    rotated_out = paged_attention_reference(
        rotated_query, *int8.layer(0), metadata, 32**-0.5, *int8.layer_scales(0)
    )
    out = int8.unrotate_output(rotated_out)
    exact = paged_attention_reference(query, *fp32.layer(0), metadata, 32**-0.5)
    rel = ((out - exact).norm() / exact.norm()).item()
    assert rel < 0.02, rel  # measured 0.9% (D = 32: coarser than the 0.6% per element, errors add over keys)
    # The reference computes exactly attention over the dequantised cache (in the rotated basis).
    k, v = int8.layer(0)
    k_s, v_s = int8.layer_scales(0)
    assert k_s is not None and v_s is not None
    dequantized = paged_attention_reference(
        rotated_query, dequantize_kv(k, k_s, torch.float32), dequantize_kv(v, v_s, torch.float32), metadata,
        32**-0.5,
    )  # fmt: skip
    torch.testing.assert_close(rotated_out, dequantized)


@needs_kernels
@pytest.mark.parametrize(("heads", "kv_heads", "dim"), [(8, 2, 32), (9, 3, 64), (4, 4, 16)])
@pytest.mark.parametrize("num_splits", [1, 4])
def test_int8_decode_kernel_matches_reference(heads: int, kv_heads: int, dim: int, num_splits: int):
    from worker.engine.kernels.paged_decode import paged_decode_attention

    gen = torch.Generator().manual_seed(heads * 100 + num_splits)
    shapes = [(1, 1), (9, 1), (70, 1), (33, 1), (16, 1)]
    cache, _, metadata, query = random_int8_step(gen, shapes, heads, kv_heads, dim)
    k, v = cache.layer(0)
    k_s, v_s = cache.layer_scales(0)
    expected = paged_attention_reference(query, k, v, metadata, dim**-0.5, k_s, v_s)
    assert v.stride(1) == 1  # the cache holds V transposed per block: read as whole blocks
    # ... and a copy laid out like K (position-major), read position by position: the same result.
    for values in (v, v.contiguous()):
        out = torch.full_like(query, float("nan"))
        paged_decode_attention(
            query, k, values, metadata.block_tables, metadata.context_lens, dim**-0.5, num_splits=num_splits,
            out=out, block_n=16, k_scale=k_s, v_scale=v_s,
        )  # fmt: skip
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="needs its scales"):
        paged_decode_attention(query, k, v, metadata.block_tables, metadata.context_lens, 0.1)


@needs_kernels
def test_int8_attention_kernels_refuse_scales_not_head_major():
    """The kernels read two neighbouring positions' scales as one word: a token-major copy of the
    same scales (unit stride over the heads) is refused, not misread."""
    from worker.engine.kernels.paged_decode import paged_decode_attention

    gen = torch.Generator().manual_seed(3)
    cache, _, metadata, query = random_int8_step(gen, [(9, 1), (33, 1)], 8, 2, 32)
    k, v = cache.layer(0)
    k_s, v_s = cache.layer_scales(0)
    assert k_s is not None and v_s is not None and k_s.stride(1) == 1
    args = (query, k, v, metadata.block_tables, metadata.context_lens, 0.1)
    with pytest.raises(ValueError, match="head-major"):
        paged_decode_attention(*args, k_scale=k_s.contiguous(), v_scale=v_s.contiguous())
    with pytest.raises(ValueError, match="share one layout"):
        paged_decode_attention(*args, k_scale=k_s, v_scale=v_s.contiguous())


@needs_kernels
@pytest.mark.parametrize(("heads", "kv_heads", "dim"), [(8, 2, 32), (6, 3, 16)])
def test_int8_prefill_kernel_matches_reference(heads: int, kv_heads: int, dim: int):
    from worker.engine.kernels.paged_prefill import paged_prefill_attention

    gen = torch.Generator().manual_seed(heads + dim)
    # A whole prompt, a later chunk, a chunk longer than a tile, a prefix hit, a 2-token tail.
    shapes = [(7, 7), (13, 5), (45, 37), (40, 16), (30, 2)]
    cache, _, metadata, query = random_int8_step(gen, shapes, heads, kv_heads, dim)
    k, v = cache.layer(0)
    k_s, v_s = cache.layer_scales(0)
    expected = paged_attention_reference(query, k, v, metadata, dim**-0.5, k_s, v_s)
    out = torch.full_like(query, float("nan"))
    paged_prefill_attention(
        query, k, v, metadata.block_tables, metadata.query_start_loc, metadata.context_lens,
        metadata.max_query_len, dim**-0.5, out=out, block_m=16, block_n=16, k_scale=k_s, v_scale=v_s,
    )  # fmt: skip
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


@needs_kernels
def test_int8_mixed_step_through_the_triton_entry_point():
    from worker.engine.attention import triton_paged_attention

    gen = torch.Generator().manual_seed(11)
    cache, _, metadata, query = random_int8_step(gen, [(20, 1), (3, 1), (18, 18), (50, 9)], 8, 2, 32)
    args = (*cache.layer(0), metadata, 0.17, *cache.layer_scales(0))
    expected = paged_attention_reference(query, *args)
    for splits in (1, 2):
        metadata.decode_splits = splits
        torch.testing.assert_close(triton_paged_attention(query, *args), expected)
        # The kernels' epilogue takes the output back to the model's basis (times H^T), as the torch
        # path's `unrotate_output` does after the reference: decode rows (one split and partials
        # merged) and prefill rows alike.
        unrotated = triton_paged_attention(query, *args, unrotate=True)
        torch.testing.assert_close(unrotated, cache.unrotate_output(expected))
        assert (unrotated - expected).abs().max() > 0.01  # the rotation is not the identity here


@needs_kernels
def test_float_cache_of_another_dtype_than_the_queries():
    """An FP16 cache read by FP32 queries (LLM_KV_DTYPE=fp16 under FP32 activations): both backends cast."""
    from worker.engine.attention import triton_paged_attention

    gen = torch.Generator().manual_seed(12)
    _, fp32, metadata, query = random_int8_step(gen, [(20, 1), (18, 18)], 8, 2, 32)
    fp16 = KVCache(KVCacheSpec(1, 2, 32, torch.float16), fp32.num_blocks, fp32.block_size, CPU)
    fp16.data.copy_(fp32.data)
    args = (*fp16.layer(0), metadata, 0.17)
    expected = paged_attention_reference(query, *args)
    assert expected.dtype == torch.float32
    torch.testing.assert_close(triton_paged_attention(query, *args), expected, rtol=1e-5, atol=1e-5)


@needs_kernels
@pytest.mark.parametrize(("kv_heads", "dim"), [(2, 32), (3, 64), (1, 16), (2, 128)])
def test_int8_store_kernel_rotates_and_quantises_what_the_reference_writes_and_skips_padding(
    kv_heads: int, dim: int
):
    from worker.engine.kernels.kv_store import store_kv

    gen = torch.Generator().manual_seed(3 + dim)
    spec = KVCacheSpec(1, kv_heads, dim, torch.int8)
    kernel, reference = KVCache(spec, 8, 4, CPU), KVCache(spec, 8, 4, CPU)
    for cache in (kernel, reference):
        cache.data.fill_(7)
    # [KV, T, D] memory seen as [T, KV, D], as the attention function receives it; one zero vector,
    # outlier channels in the keys.
    keys = (outlier_keys(gen, 5, kv_heads, dim).transpose(0, 1).contiguous() * 4).transpose(0, 1)
    keys[3, 0] = 0.0
    values = torch.randn(kv_heads, 5, dim, generator=gen).transpose(0, 1)
    slots = torch.tensor([3, 17, -1, 30, 0])
    store_kv(keys, values, *kernel.layer(0), slots, *kernel.layer_scales(0))
    stored = slots >= 0
    reference.write(0, slots[stored], keys[stored], values[stored])
    assert kernel.scales is not None and reference.scales is not None
    # The kernel's rotation sums in another order than the torch matmul, which could move a value
    # across a rounding boundary: at most one INT8 step, the scales to FP16 rounding (bit-exact as
    # measured under the interpreter).
    assert (kernel.data.int() - reference.data.int()).abs().max() <= 1
    torch.testing.assert_close(kernel.scales, reference.scales, rtol=1e-3, atol=0)
    # What the slots hold is K H and V H quantised: rotated back, each vector within half a step.
    h = hadamard_matrix(dim)
    k, v = (x.reshape(-1, kv_heads, dim)[slots[stored]] for x in kernel.layer(0))
    k_s, v_s = (x.reshape(-1, kv_heads)[slots[stored]] for x in kernel.layer_scales(0))  # type: ignore[union-attr]
    for q, scale, x in ((k, k_s, keys[stored]), (v, v_s, values[stored])):
        expected_q, expected_scale = quantize_kv(x @ h)
        assert (q.int() - expected_q.int()).abs().max() <= 1
        back = dequantize_kv(q, scale, torch.float32) @ h.T
        # Half a step per rotated element; rotated back, an element gathers sqrt(D) of them at most.
        assert ((back - x).norm(dim=-1) <= (0.5 + 1e-3) * scale.float() * dim**0.5 + 1e-6).all()
    assert not k[2, 0].any() and k_s[2, 0] == torch.finfo(torch.float16).tiny  # the zero key (slot 30)


@needs_kernels
@pytest.mark.parametrize(("heads", "kv_heads", "dim", "dtype"), [
    (6, 2, 16, torch.float32), (9, 3, 64, torch.float32), (4, 2, 64, torch.float16),
])  # fmt: skip
def test_int8_rope_store_kernel_rotates_keys_values_and_queries_like_the_reference(
    heads: int, kv_heads: int, dim: int, dtype: torch.dtype
):
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    from worker.engine.kernels.rope_store import rope_and_store

    gen = torch.Generator().manual_seed(5 + dim)
    tokens = 5
    qkv = (torch.randn(tokens, (heads + 2 * kv_heads) * dim, generator=gen) * 3).to(dtype)
    angles = torch.randn(tokens, dim // 2, generator=gen)
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)
    spec = KVCacheSpec(1, kv_heads, dim, torch.int8)
    kernel, reference = KVCache(spec, 4, 4, CPU), KVCache(spec, 4, 4, CPU)
    slots = torch.tensor([3, 9, -1, 0, 14])
    query = rope_and_store(
        qkv, cos, sin, *kernel.layer(0), slots, heads, kv_heads, dim, *kernel.layer_scales(0)
    )
    q, k, v = qkv.split([heads * dim, kv_heads * dim, kv_heads * dim], dim=-1)
    q_ref, k_ref = apply_rotary_pos_emb(
        q.view(1, tokens, heads, dim).transpose(1, 2), k.view(1, tokens, kv_heads, dim).transpose(1, 2),
        cos[None].to(dtype), sin[None].to(dtype),
    )  # fmt: skip
    # The queries come back after RoPE and times H, rounded to the model dtype as the torch path rounds.
    assert query.dtype == dtype
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 1e-3, "atol": 1e-3}
    torch.testing.assert_close(query, reference.rotate_queries(q_ref[0].transpose(0, 1)), **tol)
    stored = slots >= 0
    reference.write(0, slots[stored], k_ref[0].transpose(0, 1)[stored], v.view(tokens, kv_heads, dim)[stored])
    # The kernel's RoPE and rotation may differ from the reference in the last bit, which can move a
    # value across a rounding boundary: at most one INT8 step, and the scales agree to FP16 rounding.
    assert (kernel.data.int() - reference.data.int()).abs().max() <= 1
    assert kernel.scales is not None and reference.scales is not None
    torch.testing.assert_close(kernel.scales, reference.scales, rtol=1e-3, atol=0)


@pytest.mark.parametrize("dtype", ["fp16", "bf16", "fp32"])
def test_rotating_store_kernels_compile_for_hopper(dtype: str):
    """The store kernels with the rotation compiled to sm_90 cubins (no GPU needed; `hopper_compile.py`
    in a process without the interpreter): the compiler takes the in-register Hadamard tile and its
    tl.dot, on the tensor cores for FP16/BF16 (the interpreter cannot multiply BF16 tiles)."""
    env = {**os.environ, "TRITON_INTERPRET": "0", "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    script = Path(__file__).with_name("hopper_compile.py")
    done = subprocess.run(
        [sys.executable, str(script), dtype, "kv-store"], env=env, capture_output=True, text=True
    )
    if done.returncode == 3:  # this Triton has no ahead-of-time compiler
        pytest.skip(done.stdout.strip())
    assert done.returncode == 0, done.stderr[-3000:]
    unit = "fma" if dtype == "fp32" else "mma"
    assert done.stdout.split() == ["store", unit, "rope", unit] * 3


def test_int8_decode_loop_copies_scales_asynchronously_on_hopper():
    """The decode kernel compiled to sm_90 (`hopper_compile.py decode`, no GPU needed): with an INT8
    cache, Triton's software pipeline copies K, V and both scale tiles asynchronously, as it copies
    K and V of a float cache. Read as 16-bit values the scales stayed synchronous loads in the loop,
    one memory round trip per tile (4 copies, as for FP16, instead of 8), which kept the kernel from the HBM
    bandwidth it reaches with FP16."""
    env = {**os.environ, "TRITON_INTERPRET": "0", "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    script = Path(__file__).with_name("hopper_compile.py")
    command = [sys.executable, str(script), "fp16", "decode"]
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode == 3:  # this Triton has no ahead-of-time compiler
        pytest.skip(done.stdout.strip())
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == ["decode", "4", "decode", "8", "decode", "8"]


def forward_step(
    cache: KVCache, backend: str, shapes: list[tuple[int, int]], keys: list[torch.Tensor],
    values: list[torch.Tensor], query: torch.Tensor, tables: list[list[int]],
    score_requests: list[tuple[int, int, int]] | None = None,
) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:  # fmt: skip
    """Write each sequence's context before the step (the torch write), then run the step's new tokens
    through `paged_attention_forward` on `backend`: the output [T, H, D] and any SnapKV scores."""
    block_size = cache.block_size
    slots = []
    for (context_len, new), table, k, v in zip(shapes, tables, keys, values, strict=True):
        seq_slots = torch.tensor(
            [table[p // block_size] * block_size + p % block_size for p in range(context_len)]
        )
        cache.write(0, seq_slots[:-new], k[:-new], v[:-new])
        slots.append(seq_slots[-new:])
    new_k = torch.cat([k[-n:] for (_, n), k in zip(shapes, keys, strict=True)])
    new_v = torch.cat([v[-n:] for (_, n), v in zip(shapes, values, strict=True)])
    metadata = AttentionMetadata.for_step(
        cache, backend, torch.cat(slots).tolist(), tables, [n for _, n in shapes],  # type: ignore[arg-type]
        [c for c, _ in shapes],
    )  # fmt: skip
    metadata.decode_splits = 2
    if score_requests:
        metadata.score_requests = score_requests
    with attention_context(metadata):
        out, _ = paged_attention_forward(
            SimpleNamespace(layer_idx=0),  # type: ignore[arg-type]
            query.transpose(0, 1)[None], new_k.transpose(0, 1)[None], new_v.transpose(0, 1)[None], None,
        )  # fmt: skip
    return out[0], metadata.scores


@needs_kernels
def test_mixed_step_on_a_rotated_int8_cache_through_the_triton_path_gives_the_torch_path():
    """Decodes and prefill chunks in one step through `paged_attention_forward`: the Triton store and
    attention with the queries rotated and the output rotated back, against the torch path on the
    same INT8 cache and against FP32 attention; SnapKV scores of a prefill row against the FP32
    cache's (they see the stored, rotated keys, so the queries must be rotated too)."""
    gen = torch.Generator().manual_seed(21)
    heads, kv_heads, dim, block_size = 8, 2, 32, 4
    shapes = [(20, 1), (3, 1), (18, 18), (50, 9)]
    keys = [outlier_keys(gen, c, kv_heads, dim) for c, _ in shapes]
    values = [torch.randn(c, kv_heads, dim, generator=gen) for c, _ in shapes]
    query = torch.randn(sum(n for _, n in shapes), heads, dim, generator=gen)
    free = torch.randperm(64, generator=gen).tolist()
    tables = [[free.pop() for _ in range(-(-c // block_size))] for c, _ in shapes]
    score_requests = [(3, 20 + 9 - 6, 6)]  # the last 6 queries of the 9-token chunk (flat index 23)
    results = {}
    for name, dtype, backend in (
        ("fp32", torch.float32, "torch"), ("torch", torch.int8, "torch"), ("triton", torch.int8, "triton"),
    ):  # fmt: skip
        cache = KVCache(KVCacheSpec(1, kv_heads, dim, dtype), 64, block_size, CPU)
        results[name] = forward_step(cache, backend, shapes, keys, values, query, tables, score_requests)
        if dtype == torch.int8:
            assert cache.rotation is not None
    torch.testing.assert_close(results["triton"][0], results["torch"][0], rtol=1e-4, atol=1e-4)
    exact = results["fp32"][0]
    rel = ((results["triton"][0] - exact).norm() / exact.norm()).item()
    assert rel < 0.02, rel  # measured 0.9%; an output left in the rotated basis is 140% off
    for name in ("torch", "triton"):
        scores = results[name][1][3]
        assert scores.shape == (50,)
        torch.testing.assert_close(scores, results["fp32"][1][3], rtol=0.05, atol=0.02)


# Eight short chat prompts for the greedy comparison against the FP32 cache.
PROMPTS = CHAT_PROMPTS
NEW_TOKENS = 16


@pytest.mark.model
def test_int8_kv_engine_agrees_with_the_fp32_cache_on_greedy_tokens(smol: LoadedModel):
    options = {"kv_cache_bytes": 32 << 20, "attention_backend": "torch"}
    baseline_engine = PagedEngine(smol.model, smol.tokenizer, engine_config(**options))  # type: ignore[arg-type]
    prompts = [chat(baseline_engine, p) for p in PROMPTS]
    baseline = greedy_tokens(baseline_engine, PROMPTS, NEW_TOKENS)
    baseline_engine.close()
    # Through the worker's own wiring: settings -> factory -> PagedEngine(kv_dtype="int8").
    engine = create_engine(
        WorkerSettings(
            kv_dtype="int8", device="cpu", dtype="float32", kv_cache_bytes=32 << 20
        ).engine_config()
    )
    assert isinstance(engine, PagedEngine)
    described = engine.describe()
    assert (described["kv_dtype"], described["dtype"], described["weights"]) == ("int8", "fp32", "fp32")
    assert engine.kv_cache.scales is not None and engine.kv_cache.rotation is not None
    assert described["kv_pool_bytes"] == engine.kv_cache.nbytes <= 32 << 20
    int8 = greedy_tokens(engine, PROMPTS, NEW_TOKENS)
    engine.close()
    prefixes = [common_prefix(b, q) for b, q in zip(baseline, int8, strict=True)]
    # Measured (torch 2.13 CPU, one thread, Intel Xeon; the rotation study, now in git history,
    # gave the same on this machine): common prefixes [16, 16, 16, 16, 16, 16, 16, 9], 7 of 8 prompts
    # identical over 16 tokens, the bar. The INT8 format before the rotation gave
    # [16, 16, 16, 12, 0, 9, 5, 16] here (4 of 8) and [16, 16, 16, 12, 0, 9, 16, 16] on an AMD EPYC.
    # The one divergence left is a near-tie of the FP32 model (top-2 logit margin 0.007 at token 9 of
    # "Why do leaves change color in autumn?"), which the float rounding order alone decides, so the
    # greedy figure is asserted with that one prompt of slack and the robust check is below.
    assert sum(p == NEW_TOKENS for p in prefixes) >= 6 and sum(p >= 8 for p in prefixes) >= 7, prefixes
    assert sum(prefixes) >= 0.85 * NEW_TOKENS * len(PROMPTS), prefixes  # measured 121 of 128 (95%)
    # Teacher forced: each prompt followed by the FP32 cache's 16 tokens, prefilled once; the 128 logit
    # rows that predicted them, INT8 against FP32. Wherever the FP32 model is not near a tie (top-2
    # margin above 0.1: 120 of the 128 rows) the INT8 cache picks the same token. Measured: 1 flip
    # in 128 rows (margin 0.007), RMS logit error 0.071 (0.183 before the rotation, with 4 flips at
    # margins 0.36, 0.04, 0.12, 0.04), mean KL 2.1e-4.
    ref = teacher_forced_logits(
        PagedEngine(smol.model, smol.tokenizer, engine_config(enable_prefix_caching=False, **options)),  # type: ignore[arg-type]
        prompts, baseline,
    )  # fmt: skip
    int8 = engine_config(enable_prefix_caching=False, kv_dtype="int8", **options)  # type: ignore[arg-type]
    got = teacher_forced_logits(
        PagedEngine(smol.model, smol.tokenizer, int8),
        prompts, baseline,
    )  # fmt: skip
    top2 = ref.topk(2, dim=-1).values
    clear = top2[..., 0] - top2[..., 1] > 0.1
    assert int(clear.sum()) >= 100, int(clear.sum())
    assert torch.equal(got.argmax(-1)[clear], ref.argmax(-1)[clear])
    assert (ref.argmax(-1) != got.argmax(-1)).sum() <= 2
    assert (got - ref).pow(2).mean().sqrt() < 0.12


@pytest.mark.model
def test_int8_kv_blocks_stay_shareable_through_the_prefix_cache(smol: LoadedModel):
    """A second request on the same prompt reuses the first one's INT8 blocks (and with them their
    scales) and computes the same tokens as the first."""
    engine = PagedEngine(
        smol.model,
        smol.tokenizer,
        engine_config(kv_cache_bytes=16 << 20, attention_backend="torch", kv_dtype="int8"),
    )
    prompt = chat(engine, "Where do refrigerated goods go?", SYSTEM_PROMPT)
    engine.add_request(request("first", prompt, max_tokens=6, ignore_eos=True))
    first = drain(engine)["first"]
    engine.add_request(request("second", prompt, max_tokens=6, ignore_eos=True))
    second = drain(engine)["second"]
    # Every full block of the prompt but the last comes from the cache (the last token is recomputed).
    assert second[-1].cached_tokens >= 16 * ((len(prompt) - 1) // 16) >= 160
    assert collect(second)[0] == collect(first)[0]
    engine.close()


@pytest.mark.model
@pytest.mark.skipif(not kernels_usable(CPU), reason="needs TRITON_INTERPRET=1")
def test_int8_kv_triton_path_gives_the_torch_path_tokens(smol: LoadedModel):
    """The fused layers (RoPE + rotating, quantising store, rotated queries) and the INT8 attention
    kernels on the real model."""
    results: dict[str, dict[str, list[int]]] = {}
    for backend in ("torch", "triton"):
        engine = PagedEngine(
            smol.model,
            smol.tokenizer,
            engine_config(
                kv_cache_bytes=16 << 20,
                max_batch_tokens=64,
                max_prefill_chunk_tokens=40,
                attention_backend=backend,
                kv_dtype="int8",
            ),
        )
        assert engine.kv_cache.rotation is not None
        if backend == "triton":
            engine.runner.warm_up()  # compiles the kernels; must leave the cache untouched
            assert not engine.kv_cache.data.any()
        prompt = chat(engine, "What is the capital of France?", "Answer briefly.")
        # Chunked prefill (40-token chunks), a prefix hit, and decodes sharing steps with prefills.
        for rid, ids in (("full", prompt), ("prefix", prompt[:-3] + prompt[-3:]), ("short", prompt[:20])):
            engine.add_request(request(rid, ids, max_tokens=4, ignore_eos=True))
        results[backend] = {rid: collect(outs)[0] for rid, outs in drain(engine).items()}
        engine.close()
    assert results["triton"] == results["torch"]
    assert all(len(tokens) == 4 for tokens in results["torch"].values())


@pytest.mark.skipif(not kernels_usable(CPU), reason="needs TRITON_INTERPRET=1")
def test_int8_kv_fused_and_unfused_triton_paths_give_the_torch_path_tokens():
    """The two Triton stores of a rotated cache on a tiny Llama (head_dim 16, padded to tl.dot's 16
    rows): fused RoPE + store (queries rotated in the kernel) and the unfused store_kv (queries
    rotated in torch), each against the torch reference, with SnapKV scoring the prefills."""
    loaded = random_causal_lm("tiny", device="cpu", dtype=torch.float32)
    results = {}
    for backend, fused in (("torch", True), ("triton", True), ("triton", False)):
        engine = PagedEngine(
            loaded.model,
            loaded.tokenizer,
            engine_config(
                kv_cache_bytes=4 << 20,
                max_prefill_chunk_tokens=32,
                attention_backend=backend,
                fused_layers=fused,
                kv_dtype="int8",
                kv_budget_tokens=48,
                kv_prune_mode="snapkv",
            ),
        )
        assert (engine._fused is not None) == (backend == "triton" and fused)
        engine.add_request(request("a", list(range(100, 170)), max_tokens=12, ignore_eos=True))
        engine.add_request(request("b", list(range(300, 310)), max_tokens=20, ignore_eos=True))
        outputs = drain(engine)
        results[(backend, fused)] = {rid: collect(outs)[0] for rid, outs in outputs.items()}
        assert next(o for o in outputs["a"] if o.finished).kv_evicted_tokens > 0
        engine.close()
    assert results[("triton", True)] == results[("torch", True)] == results[("triton", False)]
