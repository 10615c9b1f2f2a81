"""Causal LMs with random weights in the shape of real ones, for throughput benchmarks.

Throughput does not depend on the weights, so a GPU benchmark of a Llama-3.2-1B-shaped model
needs no download: the model is built from its config with seed 0, and SmolLM2's tokenizer is
reused (its ids are a subset of the bigger vocabulary; ids above it decode to nothing).

Two ways to draw the weights, both seeded:
- transformers' own initialisation (`from_config` on the device after `torch.manual_seed(seed)`): float
  loads, the values the engine tests and benchmark figures were measured on;
- streamed (`streamed=True`, and always in INT8): the model is built on the meta device and filled one
  tensor at a time on its device (`streaming_load.StreamingLoad`), each tensor drawn from a generator
  seeded by the seed and the tensor's name (`random_tensors`: normal with the config's
  `initializer_range` for matrices, as transformers initialises them, ones for norms, zeros for
  biases). A tensor's values depend only on (seed, name, device, dtype), so an INT8 load (each linear
  quantised as it is drawn: the 70B shape never exists in FP16) holds exactly the streamed float load
  of the same seed, quantised; that float load is what INT8 is compared against.

The 8B and 70B shapes hold 16 GB and 140 GB of FP16 weights (8 GB and 70 GB in INT8): tests check their
configs, and build two layers of the 70B width on the meta device (shapes, no storage). No shape sets
`rope_scaling` (Llama-3.1 and 3.2 do): it changes the rotary frequencies, not the work of a step.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator, Mapping
from typing import Any

import torch

from worker.engine.model_files import DEFAULT_MODEL, LoadedModel, resolve_model_dir
from worker.engine.quant.int8_linear import ActivationMode
from worker.engine.streaming_load import StreamingLoad, empty_causal_lm

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


def random_tensor(
    name: str, shape: tuple[int, ...], *, seed: int, device: torch.device, dtype: torch.dtype, std: float
) -> torch.Tensor:
    """The seeded random value of one named tensor: a bias zeros, another vector (a norm's weight) ones, a
    matrix normal(0, std) from a generator seeded by (seed, name), drawn on `device` in `dtype`."""
    if name.endswith(".bias"):
        return torch.zeros(shape, dtype=dtype, device=device)
    if len(shape) == 1:
        return torch.ones(shape, dtype=dtype, device=device)
    # One 32-bit seed of both (the CPU's Mersenne Twister keeps only the low 32 bits of a seed).
    generator = torch.Generator(device=device).manual_seed(zlib.crc32(f"{seed}:{name}".encode()))
    return torch.empty(shape, dtype=dtype, device=device).normal_(0.0, std, generator=generator)


def random_tensors(
    shapes: Mapping[str, tuple[int, ...]], *, seed: int, device: torch.device, dtype: torch.dtype, std: float
) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, value) of every tensor of `shapes`, one at a time (`random_tensor`)."""
    for name, shape in shapes.items():
        yield name, random_tensor(name, shape, seed=seed, device=device, dtype=dtype, std=std)


def random_causal_lm(
    shape: str | dict[str, Any] = "llama-1b",
    *,
    device: str = "cpu",
    dtype: torch.dtype | None = None,
    seed: int = 0,
    activations: ActivationMode | None = None,
    streamed: bool = False,
) -> LoadedModel:
    """A Llama-architecture model with seeded random weights, on `device`, plus SmolLM2's tokenizer.

    `activations` ("float" for `LLM_WEIGHTS=int8`, "int8" for w8a8) quantises each linear, the embedding
    and lm_head as it is drawn, streamed (`quant_report` says what); None keeps `dtype`, drawn by
    transformers' initialisation unless `streamed` (the module doc). On `device="meta"` the model has
    shapes and no storage: how a shape too big for the host is inspected.
    """
    from transformers import AutoModelForCausalLM

    dtype = dtype or (torch.float16 if device.startswith("cuda") else torch.float32)
    tokenizer = load_default_tokenizer()
    config = llama_config(shape, tokenizer)
    name = shape if isinstance(shape, str) else "custom"
    if device != "meta" and (streamed or activations is not None):
        load = StreamingLoad(empty_causal_lm(config, dtype), torch.device(device), activations)
        for tensor_name, value in random_tensors(
            load.shapes, seed=seed, device=load.device, dtype=dtype, std=config.initializer_range
        ):
            load.put(tensor_name, value)
        source = f"random:{name}:streamed-seed{seed}"
        return LoadedModel(model=load.finish(), tokenizer=tokenizer, source=source, quant_report=load.report)
    torch.manual_seed(seed)
    # Built directly on the device in the target dtype: a 1B model never exists in FP32 on the host.
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return LoadedModel(model=model.eval(), tokenizer=tokenizer, source=f"random:{name}:seed{seed}")
