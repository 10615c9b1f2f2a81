"""A worker's output is JSON lines only, on stdout and stderr alike, whatever its caller's environment.

`make` exports TQDM_DISABLE=1, and so do the tests' workers; a plain `python -m worker` has no such
variable, and transformers' "Loading weights" progress bar went to stderr as text. The worker switches
progress bars off itself, before tqdm is imported, for its engine process too.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from producer.client import ChatClient
from worker.engine.host_cpus import default_torch_threads

ROOT = Path(__file__).resolve().parents[1]
# Variables that would hide a progress bar or a warning: a plain run has none of them.
QUIETING = ("TQDM_", "HF_HUB_DISABLE_", "TRANSFORMERS_VERBOSITY", "TRANSFORMERS_NO_ADVISORY_WARNINGS")


def plain_env(**extra: str) -> dict[str, str]:
    """This process's environment without any LLM_ setting, Redis address or progress-bar switch."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("LLM_", *QUIETING)) and k not in ("REDIS_URL", "MODEL")
    }
    env.update({"HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}, **extra)
    return env


def not_json(text: str) -> list[str]:
    """The lines of `text` that are not one JSON object with an `event` (a bar redraws with \\r: a line)."""
    bad = []
    for line in text.replace("\r", "\n").splitlines():
        if not line.strip():
            continue
        try:
            event = json.loads(line)
        except json.JSONDecodeError:
            bad.append(line)
            continue
        if not isinstance(event, dict) or "event" not in event:
            bad.append(line)
    return bad


# Every way a progress bar is made under a worker: tqdm itself (GGUF conversion), transformers' wrapper
# ("Loading weights") and huggingface_hub's (downloads, cache scans).
BARS = {
    "tqdm.auto": "from tqdm.auto import tqdm",
    "transformers": "from transformers.utils.logging import tqdm",
    "huggingface_hub": "from huggingface_hub.utils import tqdm",
}


@pytest.mark.parametrize("factory", sorted(BARS))
def test_no_progress_bar_in_a_worker_process(factory: str) -> None:
    code = f"import worker.__main__\n{BARS[factory]}\nfor _ in tqdm(range(3), desc='Loading weights'): pass\n"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=plain_env(), capture_output=True,
                          text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert (proc.stdout, proc.stderr) == ("", "")


def test_a_bar_shows_without_the_worker(tmp_path: Path) -> None:
    """The check above can fail: in a plain process, the same bar is drawn."""
    code = f"{BARS['transformers']}\nfor _ in tqdm(range(3), desc='Loading weights'): pass\n"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=plain_env(), capture_output=True,
                          text=True, timeout=120)  # fmt: skip
    assert "Loading weights" in proc.stderr


@pytest.mark.model
@pytest.mark.parametrize("engine_process", ["inline", "separate"])
def test_a_model_workers_output_is_json_lines_only(
    engine_process: str, redis_url: str, prefix: str, tmp_path: Path
) -> None:
    env = plain_env(REDIS_URL=redis_url, LLM_PREFIX=prefix, LLM_DEVICE="cpu", LLM_METRICS_PORT="0",
                    LLM_ENGINE_PROCESS=engine_process)  # fmt: skip
    out_path, err_path = tmp_path / "stdout", tmp_path / "stderr"
    with open(out_path, "wb") as out, open(err_path, "wb") as err:
        worker = subprocess.Popen([sys.executable, "-m", "worker"], cwd=ROOT, env=env, stdout=out, stderr=err)
    try:
        deadline = time.monotonic() + 240
        while b'"worker_started"' not in out_path.read_bytes():
            assert worker.poll() is None, out_path.read_text() + err_path.read_text()
            assert time.monotonic() < deadline, out_path.read_text() + err_path.read_text()
            time.sleep(0.2)
        with ChatClient(redis_url, prefix=prefix, timeout_s=120) as client:
            assert client.chat([{"role": "user", "content": "Say hi"}], max_tokens=4).usage
    finally:
        worker.send_signal(signal.SIGTERM)
        try:
            worker.wait(timeout=60)
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait()
    assert worker.returncode == 0
    stdout, stderr = out_path.read_text(errors="replace"), err_path.read_text(errors="replace")
    assert '"engine_ready"' in stdout and '"worker_stopped"' in stdout
    assert not_json(stdout) == [], stdout
    # A CPU engine sizes torch's pool by the CPUs it may use, less one for the loop (`host_cpus`).
    (ready,) = [e for e in map(json.loads, stdout.splitlines()) if e["event"] == "engine_ready"]
    assert ready["torch_threads"] == default_torch_threads()
    assert not_json(stderr) == [], stderr
