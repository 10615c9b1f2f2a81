"""Every line a worker logs matches docs/logging.md: each event and field is documented, with its type."""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest
import redis

from producer.client import ChatClient, ChatError

ROOT = Path(__file__).resolve().parents[1]
TYPES = {
    "int": (int,),
    "float": (int, float),
    "str": (str,),
    "bool": (bool,),
    "object": (dict,),
    "list": (list,),
}


def documented() -> tuple[dict[str, str], dict[str, dict[str, str]]]:
    """(common fields, {event: {field: type}}) from the tables of docs/logging.md.

    The table before the first heading lists the fields of every line; each `### ` heading names the
    events (one or more, in backticks) whose fields the table under it lists.
    """
    common: dict[str, str] = {}
    events: dict[str, dict[str, str]] = {}
    target: list[dict[str, str]] = [common]
    for line in (ROOT / "docs" / "logging.md").read_text().splitlines():
        if line.startswith("### "):
            target = [events.setdefault(name, {}) for name in re.findall(r"`([a-z_]+)`", line)]
        elif line.startswith("## "):
            target = []  # a section's prose: its events follow under `###` headings
        elif row := re.match(r"\| `([a-z_0-9]+)` \| ([a-z]+\??) \|", line):
            for fields in target:
                fields[row.group(1)] = row.group(2)
    return common, events


def test_the_page_parses() -> None:
    common, events = documented()
    assert {"event", "level", "timestamp"} <= set(common)
    assert {"worker_started", "request_done", "batch_done", "worker_stopped", "redis_error"} <= set(events)
    assert events["request_done"]["ttft_ms"] == "float?"


def check(line: dict, common: dict[str, str], events: dict[str, dict[str, str]]) -> list[str]:
    name = line.get("event")
    if name not in events:
        return [f"event {name!r} is not in docs/logging.md"]
    fields = dict(common)
    fields.update(events[name])
    if name == "worker_started":  # carries every field of engine_ready
        fields.update(events["engine_ready"])
    problems = []
    for key, value in line.items():
        key = re.sub(r"^gpu\d+_", "gpu0_", key)  # per-GPU fields: documented once, as GPU 0's
        if key not in fields:
            problems.append(f"{name}.{key} is not documented")
            continue
        kind = fields[key]
        if value is None and kind.endswith("?"):
            continue
        allowed = TYPES[kind.rstrip("?")]
        if isinstance(value, bool) and bool not in allowed or not isinstance(value, allowed):
            problems.append(f"{name}.{key} = {value!r} is not {kind}")
    return problems


@pytest.mark.slow
def test_a_workers_real_lines_match_the_page(
    start_worker, chat_client: ChatClient, redis_client: redis.Redis, prefix: str
) -> None:
    worker = start_worker("echo", echo_token_delay_ms=20, max_wait_ms=5, trim_interval_s=1)
    ids = [
        chat_client.submit([{"role": "user", "content": f"hello number {i}"}], max_tokens=8) for i in range(6)
    ]
    for rid in ids:
        chat_client.result(rid, timeout_s=60)
    slow = chat_client.submit([{"role": "user", "content": " ".join(["word"] * 40)}], max_tokens=40)
    time.sleep(0.2)
    chat_client.cancel(slow)
    with pytest.raises(ChatError):
        chat_client.result(slow, timeout_s=30)
    # Invalid entries: one with an id (answered), one without (dead-lettered).
    redis_client.xadd(f"{prefix}:requests", {"v": "1", "ct": "json", "body": '{"id": "bad-1", "prompt": 5}'})
    redis_client.xadd(f"{prefix}:requests", {"v": "1", "ct": "json", "body": "not json"})
    with pytest.raises(ChatError):
        chat_client.result("bad-1", timeout_s=30)
    time.sleep(1.5)  # a trim round
    assert worker.stop() == 0
    common, events = documented()
    lines = worker.events()
    seen = {line["event"] for line in lines}
    assert {"worker_started", "request_done", "batch_done", "request_invalid", "request_cancelled",
            "entry_dead_lettered", "shutdown_started", "worker_stopped"} <= seen, seen  # fmt: skip
    problems = [p for line in lines for p in check(line, common, events)]
    assert not problems, "\n".join(sorted(set(problems)))


def test_dashboard_fields_are_documented() -> None:
    """Every event and field the Grafana dashboard queries is on the page, under that event."""
    from test_k8s_manifests import queried_fields

    common, events = documented()
    queried = queried_fields()
    assert queried, "the dashboard queries no events: the check would prove nothing"
    for event, fields in queried.items():
        assert event in events, f"the dashboard queries {event!r}, which docs/logging.md does not list"
        missing = sorted(f for f in fields if f not in events[event] and f not in common)
        assert not missing, f"the dashboard queries undocumented fields of {event}: {missing}"
