"""Load a causal LM and its tokenizer, offline-first (where the files are: `model_files.py`).

Loading GGUF through transformers dequantizes every tensor (~25 s on 2 cores), so the first
load writes a safetensors copy under the cache directory and later loads read that.

Float weights load through transformers (`from_pretrained`). INT8 weights (`LLM_WEIGHTS=int8|w8a8`) of a
safetensors checkpoint (a directory, the converted copy, or a hub id's cached snapshot) and of the random
shapes stream instead (`streaming_load.py`): built on the meta device and filled one tensor at a time on
the device, each linear quantised as it arrives, so the model never exists in float (a 70B's 140 GB of
FP16 would fit no single GPU). Other INT8 sources (`pytorch_model.bin`) load in float and are quantised
on the host before they move.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import structlog
import torch

from worker.engine.model_files import (
    DEFAULT_ALIASES,
    DEFAULT_MODEL,
    LoadedModel,
    default_cache_dir,
    resolve_model_dir,
)
from worker.engine.quant import QuantReport, plan_weights, quantize_model
from worker.engine.quant.int8_linear import ActivationMode
from worker.engine.random_model import RANDOM_MODELS, random_causal_lm
from worker.engine.streaming_load import Checkpoint, StreamingLoad, empty_causal_lm

log = structlog.get_logger(__name__)


def _torch_dtype(dtype: str, device: str) -> Any:
    if dtype == "auto":
        return torch.float16 if device.startswith("cuda") else torch.float32
    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[dtype]


def _model_source(model: str, cache_dir: Path) -> Path | str:
    """The directory or hub id to load `model` from; a GGUF source is converted into the cache first."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source, gguf_name = resolve_model_dir(model, cache_dir)
    if gguf_name is None:
        return source
    gguf_path = Path(source)
    target = cache_dir / "models" / (DEFAULT_MODEL if model in DEFAULT_ALIASES else gguf_path.stem)
    log.info("model_convert_start", source=str(gguf_path), target=str(target))
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_name)
    hf_model = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_name)
    # A GGUF-loaded model carries a quantizer that refuses to serialize; the tensors are
    # already dequantized, so drop it and save plain safetensors. (The attribute is not
    # declared on the model class, so mypy checks it against nn.Module.__setattr__.)
    hf_model.hf_quantizer = None  # type: ignore[assignment]
    if hasattr(hf_model.config, "quantization_config"):
        del hf_model.config.quantization_config
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    hf_model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if target.exists():  # another process converted it first; keep theirs
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        tmp.replace(target)
    log.info("model_convert_done", target=str(target))
    return target


def _streamable(source: Path | str) -> Checkpoint | None:
    """The safetensors checkpoint of a source's files (the directory itself, or a hub id's cached
    snapshot), or None where there is none to stream."""
    directory: Path | str | None = source
    if not Path(source).is_dir():
        from huggingface_hub import try_to_load_from_cache

        try:
            config = try_to_load_from_cache(str(source), "config.json")
        except ValueError:  # not a hub id either (from_pretrained will say what it is not)
            return None
        directory = Path(config).parent if isinstance(config, str) else None
    return None if directory is None else Checkpoint.find(Path(directory))


def _load_pretrained(source: Path | str, torch_dtype: Any, trust_remote_code: bool) -> tuple[Any, Any]:
    """(model, tokenizer) through transformers, the whole model in `torch_dtype` on the host."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(source), trust_remote_code=trust_remote_code)
    hf_model = AutoModelForCausalLM.from_pretrained(
        str(source), dtype=torch_dtype, trust_remote_code=trust_remote_code
    )
    return hf_model, tokenizer


def _load_streamed(
    checkpoint: Checkpoint, *, device: str, torch_dtype: Any, activations: ActivationMode,
    trust_remote_code: bool,
) -> tuple[Any, Any, QuantReport | None]:  # fmt: skip
    """(model, tokenizer, report): the checkpoint's tensors quantised one at a time on `device`."""
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    directory = checkpoint.directory
    tokenizer = AutoTokenizer.from_pretrained(str(directory), trust_remote_code=trust_remote_code)
    config = AutoConfig.from_pretrained(str(directory), trust_remote_code=trust_remote_code)
    load = StreamingLoad(
        empty_causal_lm(config, torch_dtype, trust_remote_code), torch.device(device), activations
    )
    hf_model: Any = checkpoint.load_into(load)
    if (directory / "generation_config.json").is_file():  # its EOS ids, as from_pretrained reads them
        hf_model.generation_config = GenerationConfig.from_pretrained(str(directory))
    return hf_model, tokenizer, load.report


def load_model(
    model: str = DEFAULT_MODEL,
    *,
    device: str = "cpu",
    dtype: str = "auto",
    trust_remote_code: bool = False,
    cache_dir: Path | None = None,
    weights: str = "auto",
) -> LoadedModel:
    """Load model and tokenizer; a GGUF source is converted once and cached as safetensors, and the
    names of `random_model.RANDOM_MODELS` build a benchmark shape with seeded random weights.

    `weights` (`LLM_WEIGHTS`, see `quant/weights.py`) may override the float dtype and quantise
    the linears, the embedding and lm_head to INT8: as each tensor arrives on `device` for a
    safetensors checkpoint or a random shape (`streaming_load.py`; a bad checkpoint file raises
    `CheckpointError`), else on the host before the model moves to `device` (`quant.quantize_model`).
    """
    plan = plan_weights(weights, dtype)
    torch_dtype = _torch_dtype(plan.dtype, device)
    activations = plan.int8_activations
    source: Path | str
    report = None
    files = 0  # checkpoint files streamed one at a time
    if model in RANDOM_MODELS:  # benchmark shapes with seeded random weights: nothing to load or convert
        built = random_causal_lm(
            RANDOM_MODELS[model], device=device, dtype=torch_dtype, activations=activations
        )
        hf_model, tokenizer, source, report = built.model, built.tokenizer, built.source, built.quant_report
    else:
        source = _model_source(model, cache_dir or default_cache_dir())
        checkpoint = _streamable(source) if activations is not None else None
        if checkpoint is not None and activations is not None:
            hf_model, tokenizer, report = _load_streamed(
                checkpoint, device=device, torch_dtype=torch_dtype, activations=activations,
                trust_remote_code=trust_remote_code,
            )  # fmt: skip
            files = len(checkpoint.files)
        else:
            hf_model, tokenizer = _load_pretrained(source, torch_dtype, trust_remote_code)
            if activations is not None:
                report = quantize_model(hf_model, activations=activations)
    if report is not None:
        log.info(
            "model_quantized", weights=weights, modules=len(report.quantized), skipped=report.skipped,
            embedding=report.embedding, bytes_before=report.bytes_before, bytes_after=report.bytes_after,
            streamed=model in RANDOM_MODELS or files > 0, files=files,
        )  # fmt: skip
    # transformers wraps `to` with @wraps(nn.Module.to), which mypy reads as an unbound method.
    hf_model.to(device)  # type: ignore[arg-type]
    hf_model.eval()
    return LoadedModel(
        model=hf_model, tokenizer=tokenizer, source=str(source), weights=weights, quant_report=report
    )


def main() -> None:
    """`python -m worker.engine.model_loader [MODEL]`: fetch/convert a model into the cache and report it."""
    import sys

    name = sys.argv[1] if len(sys.argv) > 1 else os.environ.get("MODEL", DEFAULT_MODEL)
    loaded = load_model(name)
    params = sum(p.numel() for p in loaded.model.parameters())
    print(f"model ready: {name} ({params / 1e6:.0f}M parameters) from {loaded.source}")


if __name__ == "__main__":
    main()
