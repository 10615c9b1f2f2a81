"""Causal LMs with random weights in the shape of real ones, for throughput benchmarks.

Throughput does not depend on the weights, so a GPU benchmark of a Llama-3.2-1B-shaped model
needs no download: the model is built from its config with seed 0, and SmolLM2's tokenizer is
reused (its ids are a subset of the bigger vocabulary; ids above it decode to nothing).

The 8B and 70B shapes hold 16 GB and 140 GB of FP16 weights: tests check only their configs, and build
two layers of the 70B width on the meta device (shapes, no storage). No shape sets `rope_scaling`
(Llama-3.1 and 3.2 do): it changes the rotary frequencies, not the work of a step.
"""

from __future__ import annotations

from typing import Any

import torch

from worker.engine.model_files import DEFAULT_MODEL, LoadedModel, resolve_model_dir

# Llama-3.2-1B: the GPU benchmark model of DESIGN.md (W1-W3).
LLAMA_1B_SHAPE: dict[str, Any] = {
    "hidden_size": 2048,
    "num_hidden_layers": 16,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "intermediate_size": 8192,
    "vocab_size": 128256,
    "max_position_embeddings": 131072,
    "rope_theta": 500000.0,
    "tie_word_embeddings": True,
}
# Llama-3.1-8B: about 8.03e9 parameters, its own lm_head.
LLAMA_8B_SHAPE: dict[str, Any] = {
    "hidden_size": 4096,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "intermediate_size": 14336,
    "vocab_size": 128256,
    "max_position_embeddings": 131072,
    "rope_theta": 500000.0,
    "tie_word_embeddings": False,
}
# Llama-3-70B (3.1-70B has the same weights; positions as 3.1's): about 70.6e9 parameters.
LLAMA_70B_SHAPE: dict[str, Any] = {
    "hidden_size": 8192,
    "num_hidden_layers": 80,
    "num_attention_heads": 64,
    "num_key_value_heads": 8,
    "intermediate_size": 28672,
    "vocab_size": 128256,
    "max_position_embeddings": 131072,
    "rope_theta": 500000.0,
    "tie_word_embeddings": False,
}
# A tiny Llama for fast tests of shape handling (GQA group of 4, two layers).
TINY_SHAPE: dict[str, Any] = {
    "hidden_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 8,
    "num_key_value_heads": 2,
    "intermediate_size": 256,
    "vocab_size": 49152,
    "max_position_embeddings": 4096,
    "tie_word_embeddings": True,
}
SHAPES = {
    "llama-1b": LLAMA_1B_SHAPE,
    "llama-8b": LLAMA_8B_SHAPE,
    "llama-70b": LLAMA_70B_SHAPE,
    "tiny": TINY_SHAPE,
}
# Model names the worker and the benchmarks accept for these shapes (`LLM_MODEL=llama-1b-random`);
# `model_files.RANDOM_MODEL_NAMES` repeats them for the settings, which check names without torch.
RANDOM_MODELS = {
    "llama-1b-random": "llama-1b",
    "llama-8b-random": "llama-8b",
    "llama-70b-random": "llama-70b",
    "tiny-random": "tiny",
}


def load_default_tokenizer() -> Any:
    """SmolLM2's tokenizer, from the converted cache or the packaged GGUF."""
    from transformers import AutoTokenizer

    source, gguf_name = resolve_model_dir(DEFAULT_MODEL)
    if gguf_name is not None:
        return AutoTokenizer.from_pretrained(str(source.parent), gguf_file=gguf_name)  # type: ignore[union-attr]
    return AutoTokenizer.from_pretrained(str(source))


def llama_config(shape: str | dict[str, Any], tokenizer: Any = None) -> Any:
    """The `LlamaConfig` of a shape (a name of `SHAPES` or its fields), with the tokenizer's special ids."""
    from transformers import LlamaConfig

    fields = SHAPES[shape] if isinstance(shape, str) else shape
    special = ("bos_token_id", "eos_token_id", "pad_token_id")
    ids = {name: getattr(tokenizer, name) for name in special} if tokenizer is not None else {}
    return LlamaConfig(**fields, **ids)


def random_causal_lm(
    shape: str | dict[str, Any] = "llama-1b",
    *,
    device: str = "cpu",
    dtype: torch.dtype | None = None,
    seed: int = 0,
) -> LoadedModel:
    """A Llama-architecture model with seeded random weights, on `device`, plus SmolLM2's tokenizer.

    On `device="meta"` the model has shapes and no storage: how a shape too big for the host is inspected.
    """
    from transformers import AutoModelForCausalLM

    dtype = dtype or (torch.float16 if device.startswith("cuda") else torch.float32)
    tokenizer = load_default_tokenizer()
    config = llama_config(shape, tokenizer)
    torch.manual_seed(seed)
    # Built directly on the device in the target dtype: a 1B model never exists in FP32 on the host.
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.eval()
    name = shape if isinstance(shape, str) else "custom"
    return LoadedModel(model=model, tokenizer=tokenizer, source=f"random:{name}:seed{seed}")
