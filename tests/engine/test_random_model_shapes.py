"""The 8B and 70B benchmark shapes: their configs, checked without building them (16 GB and 140 GB in FP16).

The parameter count formula is checked against a model once, on the meta device (shapes, no storage):
two layers of the 70B width. Over the full configs it gives the published sizes of Llama-3.1-8B and
Llama-3-70B exactly. What is new in them for the engine, an lm_head of its own, runs at the tiny size.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from engine_helpers import collect, drain, engine_config, greedy_reference, request

from worker.engine.model_files import RANDOM_MODEL_NAMES
from worker.engine.paged_engine import PagedEngine
from worker.engine.random_model import (
    LLAMA_70B_SHAPE,
    RANDOM_MODELS,
    TINY_SHAPE,
    llama_config,
    random_causal_lm,
)


def llama_parameters(config: Any) -> int:
    """Weights of a Llama: embeddings (and an untied lm_head), per layer attention, MLP and two norms."""
    hidden, layers, vocab = config.hidden_size, config.num_hidden_layers, config.vocab_size
    head_dim = hidden // config.num_attention_heads
    q_and_o = 2 * hidden * config.num_attention_heads * head_dim
    k_and_v = 2 * hidden * config.num_key_value_heads * head_dim
    per_layer = q_and_o + k_and_v + 3 * hidden * config.intermediate_size + 2 * hidden
    embeddings = vocab * hidden * (1 if config.tie_word_embeddings else 2)
    return embeddings + layers * per_layer + hidden  # + the final norm


# (model name, hidden, layers, heads, KV heads, intermediate, parameters as published)
SHAPES = [
    ("llama-8b-random", 4096, 32, 32, 8, 14336, 8_030_261_248),
    ("llama-70b-random", 8192, 80, 64, 8, 28672, 70_553_706_496),
]


@pytest.mark.parametrize(("name", "hidden", "layers", "heads", "kv_heads", "intermediate", "params"), SHAPES)
def test_big_shapes_have_the_published_sizes(
    name: str, hidden: int, layers: int, heads: int, kv_heads: int, intermediate: int, params: int
) -> None:
    assert name in RANDOM_MODEL_NAMES
    config = llama_config(RANDOM_MODELS[name])
    shape = (
        config.hidden_size, config.num_hidden_layers, config.num_attention_heads,
        config.num_key_value_heads, config.intermediate_size,
    )  # fmt: skip
    assert shape == (hidden, layers, heads, kv_heads, intermediate)
    assert (config.vocab_size, config.head_dim, config.tie_word_embeddings) == (128256, 128, False)
    assert config.rope_parameters == {"rope_theta": 500000.0, "rope_type": "default"}  # no rope_scaling
    assert config.max_position_embeddings == 131072
    assert llama_parameters(config) == params


def test_two_layers_of_the_70b_width_build_on_the_meta_device() -> None:
    loaded = random_causal_lm({**LLAMA_70B_SHAPE, "num_hidden_layers": 2}, device="meta", dtype=torch.float16)
    model = loaded.model
    weights = list(model.parameters())
    assert {p.device.type for p in weights} == {"meta"} and {p.dtype for p in weights} == {torch.float16}
    assert sum(p.numel() for p in weights) == llama_parameters(model.config)
    assert model.lm_head.weight is not model.model.embed_tokens.weight  # untied: a lm_head of its own
    assert model.model.layers[0].mlp.gate_proj.weight.shape == (28672, 8192)
    assert model.model.layers[0].self_attn.k_proj.weight.shape == (8 * 128, 8192)


def test_an_untied_random_llama_matches_generate() -> None:
    loaded = random_causal_lm({**TINY_SHAPE, "tie_word_embeddings": False}, device="cpu", dtype=torch.float32)
    assert loaded.model.lm_head.weight is not loaded.model.model.embed_tokens.weight
    engine = PagedEngine(loaded.model, loaded.tokenizer, engine_config(kv_cache_bytes=8 << 20))
    prompts = [list(range(100, 100 + n)) for n in (7, 30)]
    expected = [greedy_reference(loaded, p, 8) for p in prompts]
    for i, prompt in enumerate(prompts):
        engine.add_request(request(f"u{i}", prompt, max_tokens=8, ignore_eos=True))
    outputs = drain(engine)
    assert [collect(outputs[f"u{i}"])[0] for i in range(2)] == expected
