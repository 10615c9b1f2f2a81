"""INT8 KV cache (`LLM_KV_DTYPE=int8`): the quantiser's error bound, the pool's block count at a byte
budget, the Triton store and attention kernels against the torch reference (under the interpreter
without a GPU), and SmolLM2 through `PagedEngine` against the FP32 cache."""

from __future__ import annotations

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
    greedy_tokens,
    request,
)

from worker.engine.attention import AttentionMetadata, paged_attention_reference
from worker.engine.factory import create_engine
from worker.engine.kernels import kernels_usable
from worker.engine.kv_cache import KVCache, KVCacheSpec, num_blocks_for_budget, resolve_kv_dtype
from worker.engine.llm_engine import PagedEngine
from worker.engine.model_loader import LoadedModel
from worker.engine.quant.kv_int8 import KV_SCALE_DTYPE, dequantize_kv, quantize_kv
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
    engine = PagedEngine(smol.model, smol.tokenizer, kv_cache_bytes=8 << 20, attention_backend="torch")
    ids = chat(engine, "Explain how a refrigerator keeps food cold, step by step.")
    engine.add_request(request("r", ids, max_tokens=1))
    drain(engine)
    cache = engine.kv_cache.data  # [layers, 2, blocks, block_size, kv_heads, D]
    # The slots the prompt wrote (the pool starts zeroed), wherever its blocks are.
    written = cache.flatten(2, 3).abs().amax(-1).amax(-1).amax(0).amax(0) > 0
    assert int(written.sum()) == len(ids)
    bounds = {"K": 0.015, "V": 0.01}
    for kind, name in enumerate(bounds):
        rel = check_error_bound(cache[:, kind].flatten(1, 2)[:, written])
        # Measured 1.15% for K (its largest element is ~5x its RMS, so the step is coarser) and
        # 0.65% for V.
        assert rel < bounds[name], (name, rel)
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
    assert cache.scales is not None and cache.scales.shape == (30, 2, num_blocks, 16, 3)
    assert cache.nbytes == num_blocks * spec.bytes_per_block(16) <= 8 << 20


def test_kv_dtype_setting_and_its_resolution():
    assert WorkerSettings().kv_dtype == "auto"
    assert WorkerSettings(kv_dtype="int8").kv_dtype == "int8"
    with pytest.raises(pydantic.ValidationError):
        WorkerSettings(kv_dtype="int4")  # type: ignore[arg-type]
    with pytest.raises(pydantic.ValidationError, match="LLM_KV_DTYPE=int8 needs LLM_ENGINE=hf"):
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
    out = paged_attention_reference(query, *int8.layer(0), metadata, 32**-0.5, *int8.layer_scales(0))
    exact = paged_attention_reference(query, *fp32.layer(0), metadata, 32**-0.5)
    rel = ((out - exact).norm() / exact.norm()).item()
    assert rel < 0.02, rel  # measured 0.9% (D = 32: coarser than the 0.6% per element, errors add over keys)
    # The reference computes exactly attention over the dequantised cache.
    k, v = int8.layer(0)
    k_s, v_s = int8.layer_scales(0)
    assert k_s is not None and v_s is not None
    dequantized = paged_attention_reference(
        query, dequantize_kv(k, k_s, torch.float32), dequantize_kv(v, v_s, torch.float32), metadata, 32**-0.5
    )
    torch.testing.assert_close(out, dequantized)


@needs_kernels
@pytest.mark.parametrize(("heads", "kv_heads", "dim"), [(8, 2, 32), (9, 3, 64), (4, 4, 40)])
@pytest.mark.parametrize("num_splits", [1, 4])
def test_int8_decode_kernel_matches_reference(heads: int, kv_heads: int, dim: int, num_splits: int):
    from worker.engine.kernels.paged_decode import paged_decode_attention

    gen = torch.Generator().manual_seed(heads * 100 + num_splits)
    shapes = [(1, 1), (9, 1), (70, 1), (33, 1), (16, 1)]
    cache, _, metadata, query = random_int8_step(gen, shapes, heads, kv_heads, dim)
    k, v = cache.layer(0)
    k_s, v_s = cache.layer_scales(0)
    expected = paged_attention_reference(query, k, v, metadata, dim**-0.5, k_s, v_s)
    out = torch.full_like(query, float("nan"))
    paged_decode_attention(
        query, k, v, metadata.block_tables, metadata.context_lens, dim**-0.5, num_splits=num_splits,
        out=out, block_n=16, k_scale=k_s, v_scale=v_s,
    )  # fmt: skip
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="needs its scales"):
        paged_decode_attention(query, k, v, metadata.block_tables, metadata.context_lens, 0.1)


@needs_kernels
@pytest.mark.parametrize(("heads", "kv_heads", "dim"), [(8, 2, 32), (6, 3, 40)])
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
    metadata.decode_splits = 2
    args = (*cache.layer(0), metadata, 0.17, *cache.layer_scales(0))
    torch.testing.assert_close(triton_paged_attention(query, *args), paged_attention_reference(query, *args))


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
def test_int8_store_kernel_writes_what_the_reference_writes_and_skips_padding():
    from worker.engine.kernels.kv_store import store_kv

    gen = torch.Generator().manual_seed(3)
    spec = KVCacheSpec(1, 2, 24, torch.int8)
    kernel, reference = KVCache(spec, 8, 4, CPU), KVCache(spec, 8, 4, CPU)
    for cache in (kernel, reference):
        cache.data.fill_(7)
    # [KV, T, D] memory seen as [T, KV, D], as the attention function receives it; one zero vector.
    keys = (torch.randn(2, 5, 24, generator=gen) * 4).transpose(0, 1)
    keys[3, 1] = 0.0
    values = torch.randn(2, 5, 24, generator=gen).transpose(0, 1)
    slots = torch.tensor([3, 17, -1, 30, 0])
    store_kv(keys, values, *kernel.layer(0), slots, *kernel.layer_scales(0))
    stored = slots >= 0
    reference.write(0, slots[stored], keys[stored], values[stored])
    assert torch.equal(kernel.data, reference.data)
    assert kernel.scales is not None and reference.scales is not None
    assert torch.equal(kernel.scales, reference.scales)


@needs_kernels
def test_int8_rope_store_kernel_quantises_the_rotated_keys_like_the_reference():
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    from worker.engine.kernels.rope_store import rope_and_store

    gen = torch.Generator().manual_seed(5)
    heads, kv_heads, dim, tokens = 6, 2, 16, 5
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * dim, generator=gen) * 3
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
        cos[None], sin[None],
    )  # fmt: skip
    torch.testing.assert_close(query, q_ref[0].transpose(0, 1))
    stored = slots >= 0
    reference.write(0, slots[stored], k_ref[0].transpose(0, 1)[stored], v.view(tokens, kv_heads, dim)[stored])
    # The kernel's rotation may differ from transformers' in the last bit, which can move a value
    # across a rounding boundary: at most one INT8 step, and the scales agree to FP16 rounding.
    assert (kernel.data.int() - reference.data.int()).abs().max() <= 1
    assert kernel.scales is not None and reference.scales is not None
    torch.testing.assert_close(kernel.scales, reference.scales, rtol=1e-3, atol=0)


# Eight short chat prompts for the greedy comparison against the FP32 cache.
PROMPTS = CHAT_PROMPTS
NEW_TOKENS = 16


@pytest.mark.model
def test_int8_kv_engine_agrees_with_the_fp32_cache_on_greedy_tokens(smol: LoadedModel):
    baseline_engine = PagedEngine(
        smol.model, smol.tokenizer, kv_cache_bytes=32 << 20, attention_backend="torch"
    )
    baseline = greedy_tokens(baseline_engine, PROMPTS, NEW_TOKENS)
    baseline_engine.close()
    # Through the worker's own wiring: settings -> factory -> PagedEngine(kv_dtype="int8").
    engine = create_engine(
        WorkerSettings(kv_dtype="int8", device="cpu", dtype="float32", kv_cache_bytes=32 << 20)
    )
    assert isinstance(engine, PagedEngine)
    described = engine.describe()
    assert (described["kv_dtype"], described["dtype"], described["weights"]) == ("int8", "fp32", "fp32")
    assert engine.kv_cache.scales is not None
    assert described["kv_pool_bytes"] == engine.kv_cache.nbytes <= 32 << 20
    int8 = greedy_tokens(engine, PROMPTS, NEW_TOKENS)
    engine.close()
    prefixes = [common_prefix(b, q) for b, q in zip(baseline, int8, strict=True)]
    # Measured (torch 2.13 CPU): common prefixes [16, 16, 16, 12, 0, 9, 16, 16]: 7 of 8 prompts give the
    # FP32 cache's first 8 tokens, 5 of 8 all 16, 79% of the tokens before a divergence. Each
    # divergence is a near-tie of the FP32 model flipped by the ~1% rounding noise of INT8 K/V (top-2
    # logit margins 0.04, 0.12 and 0.36 at tokens 0, 9 and 12); a BF16 cache keeps all 16 tokens of
    # all 8 prompts. A broken cache (scales of the wrong slot, K and V swapped, a missed dequantise)
    # produces unrelated text from the first token on.
    assert sum(p >= 8 for p in prefixes) >= 7, prefixes
    assert sum(prefixes) >= 0.7 * NEW_TOKENS * len(PROMPTS), prefixes


@pytest.mark.model
def test_int8_kv_blocks_stay_shareable_through_the_prefix_cache(smol: LoadedModel):
    """A second request on the same prompt reuses the first one's INT8 blocks (and with them their
    scales) and computes the same tokens as the first."""
    engine = PagedEngine(
        smol.model, smol.tokenizer, kv_cache_bytes=16 << 20, attention_backend="torch", kv_dtype="int8"
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
    """The fused layers (RoPE + quantising store) and the INT8 attention kernels on the real model."""
    results: dict[str, dict[str, list[int]]] = {}
    for backend in ("torch", "triton"):
        engine = PagedEngine(
            smol.model, smol.tokenizer, kv_cache_bytes=16 << 20, max_batch_tokens=64,
            max_prefill_chunk_tokens=40, attention_backend=backend, kv_dtype="int8",
        )  # fmt: skip
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
