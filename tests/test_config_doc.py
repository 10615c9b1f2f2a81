"""The README's configuration table matches the settings classes."""

from pathlib import Path

from producer.bulk import BulkSettings
from producer.settings import ProducerSettings
from worker.config_doc import README, current_readme_block, readme_block
from worker.settings import WorkerSettings


def test_readme_config_table_is_current() -> None:
    block = current_readme_block(README.read_text())
    assert block is not None, "README.md lacks the generated configuration table"
    assert block == readme_block(), "run `python -m worker.config_doc --write` and commit README.md"


def test_every_setting_is_documented() -> None:
    for cls in (WorkerSettings, ProducerSettings, BulkSettings):
        for name, field in cls.model_fields.items():
            assert field.description, f"{cls.__name__}.{name} has no description"


def test_settings_read_the_environment(monkeypatch) -> None:
    monkeypatch.setenv("REDIS_URL", "redis://example.invalid:6380/2")
    monkeypatch.setenv("MODEL", "/models/x")
    monkeypatch.setenv("LLM_MAX_BATCH_TOKENS", "1234")
    s = WorkerSettings()
    assert (s.redis_url, s.model, s.max_batch_tokens) == ("redis://example.invalid:6380/2", "/models/x", 1234)
    assert ProducerSettings().redis_url == "redis://example.invalid:6380/2"
    assert Path(README).name == "README.md"
