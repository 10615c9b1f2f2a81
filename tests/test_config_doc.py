"""The README's configuration table matches the settings classes."""

from pathlib import Path

import pydantic
import pytest

from producer.bulk import BulkSettings
from producer.settings import ProducerSettings
from worker.tools.config_doc import README, current_readme_block, readme_block
from worker.settings import WorkerSettings


def test_readme_config_table_is_current() -> None:
    block = current_readme_block(README.read_text())
    assert block is not None, "README.md lacks the generated configuration table"
    assert block == readme_block(), "run `python -m worker.tools.config_doc --write` and commit README.md"


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


def test_heartbeat_must_outlast_an_idle_read() -> None:
    """An idle worker beats between reads that block up to read_block_ms: a shorter TTL would expire."""
    fast = dict(heartbeat_interval_s=0.3, heartbeat_ttl_s=1.0, reclaim_min_idle_ms=1000)
    with pytest.raises(pydantic.ValidationError, match="LLM_READ_BLOCK_MS"):
        WorkerSettings(**fast, read_block_ms=2000)  # type: ignore[arg-type]
    WorkerSettings(**fast, read_block_ms=200)  # type: ignore[arg-type]
