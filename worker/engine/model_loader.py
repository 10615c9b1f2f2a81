"""Load a causal LM and its tokenizer, offline-first (where the files are: `model_files.py`).

Loading GGUF through transformers dequantizes every tensor (~25 s on 2 cores), so the first
load writes a safetensors copy under the cache directory and later loads read that.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import structlog

from worker.engine.model_files import (
    DEFAULT_ALIASES,
    DEFAULT_MODEL,
    LoadedModel,
    default_cache_dir,
    resolve_model_dir,
)
from worker.engine.quant import plan_weights, quantize_model
from worker.engine.random_model import RANDOM_MODELS, random_causal_lm

log = structlog.get_logger(__name__)


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
