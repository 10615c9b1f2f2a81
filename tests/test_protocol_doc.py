"""The redis-cli examples in docs/protocol.md work as written (against an echo worker)."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
from pathlib import Path
from urllib.parse import urlparse

import pytest

from worker.local_redis.server import server_binary

DOC = Path(__file__).resolve().parents[1] / "docs" / "protocol.md"


def _cli() -> str:
    packaged = server_binary().with_name("valkey-cli")
    found = str(packaged) if packaged.is_file() else shutil.which("redis-cli")
    if not found:
        pytest.skip("no redis-cli or valkey-cli binary")
    return found


@pytest.fixture()
def prefix() -> str:
    """The examples' keys are under the default prefix (`start_worker` starts its workers on this one)."""
    return "llm"


def test_redis_cli_example_works_as_written(start_worker, redis_url: str, redis_client) -> None:
    # The examples' fixed ids may exist from an earlier run.
    redis_client.delete("llm:reply:t1", "llm:final:t1", "llm:reply:t2", "llm:final:t2")
    start_worker("echo")
    commands = re.findall(r"^redis-cli (.+)$", DOC.read_text(), flags=re.M)
    assert len(commands) >= 4
    url = urlparse(redis_url)
    host, port, db = url.hostname or "127.0.0.1", str(url.port or 6379), url.path.strip("/") or "0"
    base = [_cli(), "-h", host, "-p", port, "-n", db]
    outputs = [
        subprocess.run(base + shlex.split(c), capture_output=True, text=True, timeout=90, check=True).stdout
        for c in commands[:4]
    ]
    assert re.match(r"\d+-\d+", outputs[0].strip())
    assert '"type":"done"' in outputs[1] and '"id":"t1"' in outputs[1]
    # The sampling extra: the echo engine does not honour it, and says so as the document shows.
    assert re.match(r"\d+-\d+", outputs[2].strip())
    refusal = '"code":"invalid_request","message":"logprobs: not supported by this worker\'s engine (echo)"'
    assert refusal in outputs[3] and '"param":"logprobs"' in outputs[3]
