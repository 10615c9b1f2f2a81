"""`llm-chat` (`python -m producer chat`) with no worker up: it gives up when told, and cancels its request.

Whether it gives up because its timeout ran out (`--timeout-s`, else `LLM_TIMEOUT_S`) or because of
Ctrl-C, it exits with one clear line and its own status, and the request stays cancelled: a worker
started afterwards, once the client's short-lived guard has expired, still does not serve it.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis

from producer.client import ChatClient
from producer.wire.codec import decode_event
from producer.wire.keys import StreamNames
from producer.wire.models import ErrorCode

pytestmark = pytest.mark.timeout(120)

ROOT = Path(__file__).resolve().parents[1]
GUARD_TTL_S = 1  # the client's `cancelled` reply and guard expire at once: the worker must remember


def start_cli(redis_url: str, prefix: str, flags: list[str], env: dict[str, str]) -> subprocess.Popen[str]:
    full = {k: v for k, v in os.environ.items() if k != "LLM_TIMEOUT_S"}
    full.update(REDIS_URL=redis_url, LLM_PREFIX=prefix, LLM_REPLY_TTL_S=str(GUARD_TTL_S), **env)
    return subprocess.Popen(
        [sys.executable, "-m", "producer", "chat", "never answered", *flags],
        cwd=ROOT, env=full, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


# (how it is stopped, flags, env, expected status, seconds it waits at least, at most)
CASES = [
    ("env timeout", [], {"LLM_TIMEOUT_S": "2"}, 124, 2.0, 15.0),
    ("flag beats env", ["--timeout-s", "1.5"], {"LLM_TIMEOUT_S": "300"}, 124, 1.5, 15.0),
    ("ctrl-c", [], {"LLM_TIMEOUT_S": "300"}, 130, 0.0, 15.0),
]


@pytest.mark.parametrize(
    ("stop", "flags", "env", "status", "least_s", "most_s"), CASES, ids=[c[0] for c in CASES]
)
def test_chat_gives_up_and_cancels_its_request(
    start_worker, redis_url: str, redis_client: redis.Redis, prefix: str,
    stop: str, flags: list[str], env: dict[str, str], status: int, least_s: float, most_s: float,
) -> None:  # fmt: skip
    names = StreamNames.for_prefix(prefix)
    started = time.monotonic()
    cli = start_cli(redis_url, prefix, flags, env)
    if stop == "ctrl-c":
        while redis_client.xlen(names.requests) == 0:  # sent, waiting for a reply
            assert cli.poll() is None, cli.communicate()
            time.sleep(0.05)
        cli.send_signal(signal.SIGINT)
    out, err = cli.communicate(timeout=most_s + 30)
    took = time.monotonic() - started
    assert cli.returncode == status, (out, err)
    assert least_s <= took < most_s
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    found = re.search(r"request (\S+) cancelled$", lines[0])
    assert found, lines[0]
    request_id = found.group(1)
    if status == 124:
        waited = float(flags[-1] if flags else env["LLM_TIMEOUT_S"])
        assert lines[0].startswith(f"error: no reply within {waited:g} s")
    else:
        assert lines[0].startswith("interrupted:")
    [(entry_id, fields)] = redis_client.xrange(names.requests)
    assert request_id.encode() in fields[b"body"]

    time.sleep(
        GUARD_TTL_S + 0.5
    )  # the client's guard is gone: only the workers' memory of the cancel is left
    assert not redis_client.exists(names.final_guard(request_id))
    worker = start_worker("echo")
    with ChatClient(redis_url, prefix=prefix) as client:
        assert client.chat([{"role": "user", "content": "after"}], max_tokens=2, timeout_s=60).text == "after"
    assert not [e for e in worker.events("request_done") if e["id"] == request_id]
    assert [e["code"] for e in worker.events("request_rejected") if e["id"] == request_id] == ["cancelled"]
    events = [decode_event(f) for _, f in redis_client.xrange(names.reply(request_id))]
    assert [(e.type, getattr(e, "code", None)) for e in events] == [("error", ErrorCode.CANCELLED)]
    assert redis_client.xpending(names.requests, "workers")["pending"] == 0
