"""Causal LMs with random weights in the shape of real ones, for throughput benchmarks.

Throughput does not depend on the weights, so a GPU benchmark of a Llama-3.2-1B-shaped model
needs no download: the model is built from its config with seed 0, and SmolLM2's tokenizer is
reused (its ids are a subset of the bigger vocabulary; ids above it decode to nothing).
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
SHAPES = {"llama-1b": LLAMA_1B_SHAPE, "tiny": TINY_SHAPE}
# Model names the worker and the benchmarks accept for these shapes (`LLM_MODEL=llama-1b-random`).
RANDOM_MODELS = {"llama-1b-random": "llama-1b", "tiny-random": "tiny"}


def load_default_tokenizer() -> Any:
    """SmolLM2's tokenizer, from the converted cache or the packaged GGUF."""
    from transformers import AutoTokenizer

    source, gguf_name = resolve_model_dir(DEFAULT_MODEL)
    if gguf_name is not None:
        return AutoTokenizer.from_pretrained(str(source.parent), gguf_file=gguf_name)  # type: ignore[union-attr]
    return AutoTokenizer.from_pretrained(str(source))


def random_causal_lm(
    shape: str | dict[str, Any] = "llama-1b",
    *,
    device: str = "cpu",
    dtype: torch.dtype | None = None,
    seed: int = 0,
) -> LoadedModel:
    """A Llama-architecture model with seeded random weights, on `device`, plus SmolLM2's tokenizer."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    fields = SHAPES[shape] if isinstance(shape, str) else shape
    dtype = dtype or (torch.float16 if device.startswith("cuda") else torch.float32)
    tokenizer = load_default_tokenizer()
    config = LlamaConfig(
        **fields, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    torch.manual_seed(seed)
    # Built directly on the device in the target dtype: a 1B model never exists in FP32 on the host.
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.eval()
    name = shape if isinstance(shape, str) else "custom"
    return LoadedModel(model=model, tokenizer=tokenizer, source=f"random:{name}:seed{seed}")
