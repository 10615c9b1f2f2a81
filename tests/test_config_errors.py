"""Configuration errors and the default Redis address, through real processes and a real server.

A bad setting makes `python -m worker` / `python -m producer` exit non-zero with one JSON line
(`config_invalid`) naming the variable; without `REDIS_URL` worker and client meet at one local
address, where the worker starts the packaged server only if nothing listens; `worker_started`
says what runs.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from producer.client import ChatClient
from producer.settings import ProducerSettings
from worker.local_redis.server import EmbeddedRedis, free_port, listening
from worker.settings import WorkerSettings

ROOT = Path(__file__).resolve().parents[1]


def _env(**extra: str) -> dict[str, str]:
    """This process's environment without any Redis address or LLM_ setting, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLM_") and k != "REDIS_URL"}
    env.update({"HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1", "PYTHONUNBUFFERED": "1"})
    env.update(extra)
    return env


def _run(module: str, args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)  # fmt: skip


def _one_config_error(proc: subprocess.CompletedProcess[str]) -> dict:
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    lines = proc.stdout.splitlines()
    assert len(lines) == 1, proc.stdout
    assert "Traceback" not in proc.stdout + proc.stderr, proc.stderr
    event = json.loads(lines[0])
    assert (event["event"], event["level"]) == ("config_invalid", "error")
    return event


BAD_WORKER_VALUES = [
    ("LLM_MAX_BATCH_TOKENS", "abc", "integer"),
    ("LLM_LOG_LEVEL", "verbose", "'debug', 'info', 'warning', 'error' or 'critical'"),
    ("REDIS_URL", "nonsense", "redis://"),
    ("LLM_ENGINE", "gpu", "'paged', 'static', 'echo' or 'hf'"),
    ("LLM_DEVICE", "gpu9", "'auto', 'cpu', 'cuda' or 'cuda:N'"),
    ("LLM_DEVICE", "cuda:x", "'auto', 'cpu', 'cuda' or 'cuda:N'"),
]


@pytest.mark.parametrize(("name", "value", "expected"), BAD_WORKER_VALUES)
def test_worker_refuses_a_bad_setting_with_one_line(
    name: str, value: str, expected: str, redis_url: str
) -> None:
    env = _env(**{"LLM_ENGINE": "echo", name: value})
    env.setdefault("REDIS_URL", redis_url)  # a good address, so only the bad value can stop it
    event = _one_config_error(_run("worker", [], env))
    assert (event["env"], event["value"]) == (name, value)
    assert expected in event["expected"]


CUDA_DEVICES = torch.cuda.device_count() if torch.cuda.is_available() else 0
# An engine that loads a model (the echo engine loads none): a model it cannot find, or a CUDA device the
# machine lacks, is refused before anything loads. (environment, options, variable, value, in `expected`)
BAD_MODEL_WORKER_VALUES = [
    ({"MODEL": "/nonexistent"}, [], "MODEL", "/nonexistent", "/nonexistent does not exist"),
    ({"MODEL": "no-such-org/no-such-model", "LLM_ENGINE": "static"}, [], "MODEL", "no-such-org/no-such-model",
     "downloads nothing"),
    ({"LLM_MODEL": "/nonexistent.gguf"}, [], "LLM_MODEL", "/nonexistent.gguf", "does not exist"),
    ({"MODEL": "tiny-random"}, ["--model", "/nonexistent"], "--model", "/nonexistent", "does not exist"),
    ({"MODEL": "/"}, [], "MODEL", "/", "the directory / has no config.json"),
    ({"MODEL": "tiny-random", "LLM_DEVICE": f"cuda:{CUDA_DEVICES}"}, [], "LLM_DEVICE", f"cuda:{CUDA_DEVICES}",
     "CUDA device"),
    pytest.param({"MODEL": "tiny-random", "LLM_DEVICE": "cuda"}, [], "LLM_DEVICE", "cuda", "no CUDA device",
                 marks=pytest.mark.skipif(CUDA_DEVICES > 0, reason="this machine has a CUDA device")),
]  # fmt: skip


@pytest.mark.parametrize(("env", "args", "name", "value", "expected"), BAD_MODEL_WORKER_VALUES)
def test_worker_refuses_a_model_or_device_it_cannot_use_with_one_line(
    env: dict[str, str], args: list[str], name: str, value: str, expected: str, redis_url: str
) -> None:
    proc = _run("worker", args, _env(**{"REDIS_URL": redis_url, "LLM_ENGINE": "paged", **env}))
    event = _one_config_error(proc)
    assert (event["env"], event["value"], event["settings"]) == (name, value, "WorkerSettings")
    assert expected in event["expected"]
    assert proc.stderr == "", "nothing loads, nothing else is written"


def test_worker_names_the_option_and_masks_a_password() -> None:
    event = _one_config_error(_run("worker", ["--redis-url", "redis://u:s3cret@host:port/0"], _env()))
    assert (event["env"], event["value"]) == ("--redis-url", "redis://u:***@host:port/0")
    assert "s3cret" not in json.dumps(event)


@pytest.mark.parametrize(
    ("name", "value"), [("REDIS_URL", "nonsense"), ("LLM_TIMEOUT_S", "abc"), ("LLM_CONTENT_TYPE", "xml")]
)
def test_producer_refuses_a_bad_setting_with_one_line(name: str, value: str) -> None:
    event = _one_config_error(_run("producer", ["chat", "hi"], _env(**{name: value})))
    assert (event["env"], event["value"], event["settings"]) == (name, value, "ProducerSettings")


def test_log_level_is_case_insensitive() -> None:
    assert WorkerSettings(log_level="WARNING").log_level == "warning"  # type: ignore[arg-type]


def _start_worker(env: dict[str, str], log_path: Path) -> subprocess.Popen[bytes]:
    with open(log_path, "wb") as log_file:
        return subprocess.Popen([sys.executable, "-m", "worker"], cwd=ROOT, env=env, stdout=log_file,
                                stderr=subprocess.STDOUT)  # fmt: skip


def _events(log_path: Path, name: str) -> list[dict]:
    lines = log_path.read_text(errors="replace").splitlines()
    return [e for e in (json.loads(line) for line in lines if line.startswith("{")) if e["event"] == name]


def _wait_event(proc: subprocess.Popen[bytes], log_path: Path, name: str, timeout_s: float = 60) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = _events(log_path, name)
        if found:
            return found[0]
        assert proc.poll() is None, log_path.read_text()
        time.sleep(0.1)
    raise TimeoutError(f"no {name}:\n{log_path.read_text()}")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def test_worker_and_producer_without_redis_url_meet(tmp_path: Path, prefix: str) -> None:
    """Nothing listens at the default address: the worker starts the packaged server there."""
    port = free_port()
    env = _env(LLM_LOCAL_REDIS_PORT=str(port), LLM_PREFIX=prefix, LLM_ENGINE="echo")
    log_path = tmp_path / "worker.log"
    worker = _start_worker(env, log_path)
    try:
        started = _wait_event(worker, log_path, "embedded_redis_started")
        assert started["address"] == f"redis://127.0.0.1:{port}/0"
        _wait_event(worker, log_path, "worker_started")
        chat = _run("producer", ["chat", "hello from the default address", "--timeout-s", "30"], env)
        assert chat.returncode == 0, chat.stderr
        assert "hello from the default address" in chat.stdout
        assert len(_events(log_path, "embedded_redis_started")) == 1
    finally:
        _stop(worker)
    assert not listening(port), "the worker stops the server it started"


def test_worker_uses_a_server_already_listening_at_the_default_address(tmp_path: Path, prefix: str) -> None:
    with EmbeddedRedis() as server:
        env = _env(LLM_LOCAL_REDIS_PORT=str(server.port), LLM_PREFIX=prefix, LLM_ENGINE="echo")
        log_path = tmp_path / "worker.log"
        worker = _start_worker(env, log_path)
        try:
            _wait_event(worker, log_path, "worker_started")
            assert not _events(log_path, "embedded_redis_started")
            settings = ProducerSettings(local_redis_port=server.port, prefix=prefix)
            assert settings.redis_url == server.url
            with ChatClient(settings=settings) as client:
                assert client.chat([{"role": "user", "content": "shared"}], max_tokens=4).text == "shared"
        finally:
            _stop(worker)
        assert listening(server.port), "a server the worker did not start outlives it"


def test_worker_given_redis_url_never_starts_a_server(tmp_path: Path) -> None:
    port = free_port()
    env = _env(REDIS_URL=f"redis://127.0.0.1:{port}/0", LLM_LOCAL_REDIS_PORT=str(port), LLM_ENGINE="echo")
    log_path = tmp_path / "worker.log"
    worker = _start_worker(env, log_path)
    try:
        _wait_event(worker, log_path, "redis_unavailable")
        assert not _events(log_path, "embedded_redis_started")
        assert not listening(port)
    finally:
        _stop(worker)


def test_worker_started_says_what_runs(start_worker) -> None:
    worker = start_worker("echo", git_commit="0123abcd")
    (started,) = worker.events("worker_started")
    assert (started["model"], started["device"], started["dtype"]) == ("none", "cpu", "none")
    assert started["version"] == importlib.metadata.version("llm-stream-serve")
    assert started["git_commit"] == "0123abcd"


def test_worker_started_names_the_checkout_commit(start_worker) -> None:
    worker = start_worker("echo")
    (started,) = worker.events("worker_started")
    if (ROOT / ".git").exists() and "LLM_GIT_COMMIT" not in os.environ:
        head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True)
        assert started["git_commit"] == head.stdout.strip()


def test_engine_hf_is_an_alias_of_paged_that_logs_its_deprecation(start_worker) -> None:
    assert WorkerSettings(engine="hf").engine == "paged"  # type: ignore[arg-type]
    assert WorkerSettings(engine="hf").deprecations() == [("LLM_ENGINE", "hf", "paged")]  # type: ignore[arg-type]
    assert WorkerSettings(engine="paged").deprecations() == []
    worker = start_worker("hf", model="tiny-random", device="cpu")
    (deprecated,) = worker.events("setting_deprecated")
    assert (deprecated["setting"], deprecated["value"], deprecated["means"]) == ("LLM_ENGINE", "hf", "paged")
    assert deprecated["level"] == "warning"
    (started,) = worker.events("worker_started")
    assert (started["engine"], started["model"]) == ("paged", "tiny-random")
