"""Model sources: the packaged default, its cached conversion, and any local directory."""

from __future__ import annotations

from pathlib import Path

import pytest

from worker.engine.model_files import DEFAULT_MODEL, packaged_gguf_path, resolve_model_dir
from worker.engine.model_loader import load_model

pytestmark = pytest.mark.model


def test_default_model_resolves_to_the_packaged_gguf_or_its_conversion(tmp_path: Path) -> None:
    source, gguf_name = resolve_model_dir(DEFAULT_MODEL, cache_dir=tmp_path)
    assert (Path(source), gguf_name) == (packaged_gguf_path(), packaged_gguf_path().name)
    converted = tmp_path / "models" / DEFAULT_MODEL
    converted.mkdir(parents=True)
    (converted / "config.json").write_text("{}")
    assert resolve_model_dir(DEFAULT_MODEL, cache_dir=tmp_path) == (converted, None)


def test_a_local_model_directory_loads_as_given() -> None:
    default = load_model(DEFAULT_MODEL)  # converts once into the cache, then loads from it
    local_dir = Path(default.source)
    assert (local_dir / "config.json").is_file() and (local_dir / "model.safetensors").is_file()
    assert resolve_model_dir(str(local_dir)) == (str(local_dir), None)
    again = load_model(str(local_dir))
    assert again.source == str(local_dir)
    assert again.tokenizer.chat_template is not None
    assert again.model.config.model_type == "llama"
    assert not hasattr(again.model.config, "quantization_config")


def test_hub_ids_pass_through_unchanged() -> None:
    assert resolve_model_dir("Qwen/Qwen2.5-0.5B-Instruct") == ("Qwen/Qwen2.5-0.5B-Instruct", None)
