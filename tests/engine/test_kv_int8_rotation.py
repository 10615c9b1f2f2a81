"""INT8 KV cache with K/V rotated by a Hadamard matrix before quantising (`kv_int8_scheme`, a prototype of
the torch backend): the matrix, the reference attention over a rotated cache, and SmolLM2's greedy tokens
against the FP32 cache (`loadtest/kv_rotation_study.py` measures the variants)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from engine_helpers import CHAT_PROMPTS, common_prefix, greedy_tokens

from worker.engine.attention import AttentionMetadata, attention_context, paged_attention_forward
from worker.engine.kv_cache import KVCache, KVCacheSpec
from worker.engine.llm_engine import PagedEngine
from worker.engine.model_loader import LoadedModel
from worker.engine.quant.kv_int8 import dequantize_kv, hadamard_matrix, kv_rotation

CPU = torch.device("cpu")


def test_hadamard_matrix_is_orthonormal():
    for n in (1, 2, 16, 64, 128):
        for random_signs in (False, True):
            h = hadamard_matrix(n, torch.float64, random_signs=random_signs)
            torch.testing.assert_close(h @ h.T, torch.eye(n, dtype=torch.float64))
            torch.testing.assert_close(h.abs(), torch.full_like(h, n**-0.5))
    h = hadamard_matrix(64)
    assert torch.equal(h, h.T) and not torch.equal(hadamard_matrix(64, random_signs=True), h)
    with pytest.raises(ValueError, match="power-of-two"):
        hadamard_matrix(48)
    assert kv_rotation("symmetric", 64) is None
    with pytest.raises(ValueError, match="kv_int8_scheme must be one of"):
        kv_rotation("asym", 64)


def outlier_keys(gen: torch.Generator, tokens: int, kv_heads: int, dim: int) -> torch.Tensor:
    """Keys with two outlier channels per head (~5x the RMS at their largest), as SmolLM2's."""
    keys = torch.randn(tokens, kv_heads, dim, generator=gen)
    keys[..., 3] *= 6.0
    keys[..., dim // 2 + 3] *= 4.0
    return keys * (torch.rand(tokens, kv_heads, 1, generator=gen) * 3 + 0.1)


def attend(cache: KVCache, query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """One prefill of all of `keys`' tokens through `paged_attention_forward`: [T, H, D] -> [T, H, D]."""
    tokens = keys.shape[0]
    block_size = cache.block_size
    table = list(range(-(-tokens // block_size)))
    metadata = AttentionMetadata.for_step(cache, "torch", list(range(tokens)), [table], [tokens], [tokens])
    module = SimpleNamespace(layer_idx=0)
    with attention_context(metadata):
        out, _ = paged_attention_forward(
            module,  # type: ignore[arg-type]
            query.transpose(0, 1)[None], keys.transpose(0, 1)[None], values.transpose(0, 1)[None], None,
        )  # fmt: skip
    return out[0]


def test_rotated_cache_attends_like_the_unrotated_reconstruction_and_closer_to_fp32():
    gen = torch.Generator().manual_seed(0)
    tokens, heads, kv_heads, dim = 40, 6, 2, 64
    keys, values = outlier_keys(gen, tokens, kv_heads, dim), torch.randn(tokens, kv_heads, dim, generator=gen)
    query = torch.randn(tokens, heads, dim, generator=gen) * 2
    outs, errors = {}, {}
    for name, dtype, scheme in (
        ("fp32", torch.float32, "symmetric"), ("int8", torch.int8, "symmetric"),
        ("hadamard", torch.int8, "hadamard"),
    ):  # fmt: skip
        cache = KVCache(KVCacheSpec(1, kv_heads, dim, dtype, scheme), 8, 16, CPU)
        outs[name] = attend(cache, query, keys, values)
        if cache.scales is not None:
            k, v = cache.layer(0)
            k_s, v_s = cache.layer_scales(0)
            assert k_s is not None and v_s is not None
            rotation = torch.eye(dim) if cache.rotation is None else cache.rotation
            # What the cache holds, rotated back: every read sees exactly this.
            k_back = (dequantize_kv(k, k_s, torch.float32) @ rotation.T).flatten(0, 1)[:tokens]
            v_back = (dequantize_kv(v, v_s, torch.float32) @ rotation.T).flatten(0, 1)[:tokens]
            errors[name] = (k_back - keys).norm().item() / keys.norm().item()
            exact = KVCache(KVCacheSpec(1, kv_heads, dim, torch.float32), 8, 16, CPU)
            torch.testing.assert_close(outs[name], attend(exact, query, k_back, v_back), rtol=1e-5, atol=1e-5)
    # The rotation halves the keys' rounding error (measured 1.11% -> 0.56%) and the output's (2.3% -> 1.3%).
    assert errors["hadamard"] < 0.6 * errors["int8"], errors
    rel = {n: ((outs[n] - outs["fp32"]).norm() / outs["fp32"].norm()).item() for n in ("int8", "hadamard")}
    assert rel["hadamard"] < 0.8 * rel["int8"], rel


@pytest.mark.model
def test_hadamard_int8_kv_engine_agrees_with_the_fp32_cache_on_greedy_tokens(smol: LoadedModel):
    options = {"kv_cache_bytes": 32 << 20, "attention_backend": "torch"}
    baseline_engine = PagedEngine(smol.model, smol.tokenizer, **options)  # type: ignore[arg-type]
    baseline = greedy_tokens(baseline_engine, CHAT_PROMPTS, 16)
    baseline_engine.close()
    engine = PagedEngine(
        smol.model, smol.tokenizer, kv_dtype="int8", kv_int8_scheme="hadamard", **options  # type: ignore[arg-type]
    )  # fmt: skip
    assert engine.kv_cache.rotation is not None
    rotated = greedy_tokens(engine, CHAT_PROMPTS, 16)
    engine.close()
    prefixes = [common_prefix(b, q) for b, q in zip(baseline, rotated, strict=True)]
    # Measured (torch 2.13 CPU, one thread): [16, 16, 16, 16, 16, 16, 16, 9], 7 of 8 identical over 16
    # tokens; the plain INT8 cache gives [16, 16, 16, 12, 0, 9, 5, 16] here (4 of 8). The one divergence
    # left is a tie of the FP32 model (top-2 logit margin 0.007), so this can move with the platform.
    assert sum(p == 16 for p in prefixes) >= 7, prefixes
