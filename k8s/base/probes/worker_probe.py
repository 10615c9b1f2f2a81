"""Exec probe of a worker pod: reads the worker's heartbeat key (`worker/loop/heartbeat.py`) in Redis.

    python worker_probe.py startup|readiness|liveness

The worker has no HTTP port; its sign of life is `<prefix>:hb:<consumer>`, refreshed every
`LLM_HEARTBEAT_INTERVAL_S` with a TTL of `LLM_HEARTBEAT_TTL_S`, valued `alive`, or `draining`
after SIGTERM. The probe resolves Redis and the prefix exactly as the worker does
(`WorkerSettings` from the same environment) and needs `LLM_CONSUMER_NAME` set explicitly:
the worker's default name contains its pid, which a probe process cannot know.

- startup, readiness: exit 0 iff the key says `alive` (the worker joined the group and beats).
- liveness: exit 1 iff Redis answers and the key is gone: the loop stopped beating. When Redis is
  unreachable the worker is waiting for it, and restarting it would only add a model load.
"""

from __future__ import annotations

import os
import sys

import redis

from producer.wire.keys import heartbeat_key
from worker.loop.heartbeat import ALIVE
from worker.settings import WorkerSettings

MODES = ("startup", "readiness", "liveness")
SOCKET_TIMEOUT_S = 3.0


def check(mode: str, client: redis.Redis, key: str) -> tuple[bool, str]:
    """(healthy, reason) of the worker whose heartbeat key is `key`."""
    try:
        raw = client.get(key)
    except redis.RedisError as exc:
        return mode == "liveness", f"redis unreachable: {exc}"
    if raw is None:
        return False, f"no heartbeat at {key}"
    state = raw.decode() if isinstance(raw, bytes) else str(raw)
    if mode == "liveness":
        return True, f"heartbeat {state}"
    return state == ALIVE, f"heartbeat {state}"


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[1] not in MODES:
        print(f"usage: {argv[0]} {'|'.join(MODES)}", file=sys.stderr)
        return 2
    mode = argv[1]
    if not os.environ.get("LLM_CONSUMER_NAME"):
        print("LLM_CONSUMER_NAME is not set: no heartbeat key to check", file=sys.stderr)
        return 1
    settings = WorkerSettings()
    if settings.redis_url is None:
        print("REDIS_URL is not set: a pod's worker must use a shared Redis", file=sys.stderr)
        return 1
    client = redis.Redis.from_url(
        settings.redis_url, socket_timeout=SOCKET_TIMEOUT_S, socket_connect_timeout=SOCKET_TIMEOUT_S
    )
    try:
        healthy, reason = check(mode, client, heartbeat_key(settings.prefix, settings.consumer_name))
    finally:
        client.close()
    print(f"{mode}: {reason}", file=sys.stdout if healthy else sys.stderr)
    return 0 if healthy else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
