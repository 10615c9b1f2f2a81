"""docs/configuration.md's settings table, and `python -m worker --help`, match the settings classes."""

import subprocess
import sys
from pathlib import Path

import pydantic
import pytest

from producer.bulk import BulkSettings
from producer.config_errors import env_names
from producer.settings import ProducerSettings
from worker.settings import WorkerSettings
from worker.tools.config_doc import BEGIN, CONFIG_DOC, END, current_block, generated_block

ROOT = Path(__file__).resolve().parents[1]


def test_config_doc_table_is_current() -> None:
    assert CONFIG_DOC == ROOT / "docs" / "configuration.md"
    text = CONFIG_DOC.read_text(encoding="utf-8")
    assert text.count(BEGIN) == 1 and text.count(END) == 1, "one generated table, between its markers"
    block = current_block(text)
    assert block is not None, "docs/configuration.md lacks the generated configuration table"
    assert block == generated_block(), (
        "run `python -m worker.tools.config_doc --write` and commit docs/configuration.md"
    )


def test_a_stale_table_is_caught() -> None:
    """The block is cut out exactly, markers included, so one changed default makes it differ."""
    current = generated_block()
    stale = current.replace("| `LLM_MAX_BATCH_TOKENS` | `4096` |", "| `LLM_MAX_BATCH_TOKENS` | `2048` |")
    assert stale != current
    assert current_block(f"intro\n\n{stale}\n\nprose below\n") == stale
    assert current_block("no markers here") is None
    assert current_block(f"{END}\n{BEGIN}") is None


def test_the_table_lives_in_docs_only() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert BEGIN not in readme and END not in readme
    assert "docs/configuration.md" in readme


def test_every_setting_is_documented() -> None:
    table = generated_block()
    for cls in (WorkerSettings, ProducerSettings, BulkSettings):
        for name, field in cls.model_fields.items():
            assert field.description, f"{cls.__name__}.{name} has no description"
            cell = field.description.replace("|", "\\|")
            assert cell in table, f"{cls.__name__}.{name} is not in the table"


def test_settings_read_the_environment(monkeypatch, tmp_path: Path) -> None:
    model = tmp_path / "x"  # MODEL must exist: a directory with config.json
    model.mkdir()
    (model / "config.json").write_text("{}")
    monkeypatch.setenv("REDIS_URL", "redis://example.invalid:6380/2")
    monkeypatch.setenv("MODEL", str(model))
    monkeypatch.setenv("LLM_MAX_BATCH_TOKENS", "1234")
    s = WorkerSettings()
    assert (s.redis_url, s.model, s.max_batch_tokens) == ("redis://example.invalid:6380/2", str(model), 1234)
    assert ProducerSettings().redis_url == "redis://example.invalid:6380/2"


def test_hf_engine_is_a_deprecated_alias_of_paged(monkeypatch) -> None:
    monkeypatch.setenv("LLM_ENGINE", "hf")
    s = WorkerSettings()
    assert s.engine == "paged"
    assert s.deprecations() == [("LLM_ENGINE", "hf", "paged")]
    monkeypatch.setenv("LLM_ENGINE", "paged")
    assert WorkerSettings().deprecations() == []


def test_heartbeat_must_outlast_an_idle_read() -> None:
    """An idle worker beats between reads that block up to read_block_ms: a shorter TTL would expire."""
    fast = dict(heartbeat_interval_s=0.3, heartbeat_ttl_s=1.0, reclaim_min_idle_ms=1000)
    with pytest.raises(pydantic.ValidationError, match="LLM_READ_BLOCK_MS"):
        WorkerSettings(**fast, read_block_ms=2000)  # type: ignore[arg-type]
    WorkerSettings(**fast, read_block_ms=200)  # type: ignore[arg-type]


def test_worker_help_lists_every_setting() -> None:
    """`python -m worker --help` ends with one line per setting: `ENV_VAR (default): meaning`."""
    proc = subprocess.run(
        [sys.executable, "-m", "worker", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert "worker/settings.py" not in proc.stdout, "the settings are listed, not pointed at"
    listed = proc.stdout.split("settings (environment variables):\n", 1)[1].splitlines()
    assert len(listed) == len(WorkerSettings.model_fields), listed
    for (name, field), line in zip(WorkerSettings.model_fields.items(), listed, strict=True):
        if field.default_factory is not None:
            default = "computed"
        elif field.default is None:
            default = "unset"
        else:
            default = str(field.default) or '""'
        assert line == f"  {' / '.join(env_names(WorkerSettings, name))} ({default}): {field.description}"
    for option, env in (("--engine", "LLM_ENGINE"), ("--model", "MODEL"), ("--redis-url", "REDIS_URL")):
        assert option in proc.stdout and f"override {env}" in proc.stdout
    assert "\n  LLM_MAX_BATCH_TOKENS (4096): Token budget per engine step" in proc.stdout
    assert "\n  REDIS_URL / LLM_REDIS_URL (unset): " in proc.stdout
