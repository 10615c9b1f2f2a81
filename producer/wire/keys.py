"""Key names: every Redis key of the service, built from the deployment's prefix.

All keys share one prefix (default `llm`, `LLM_PREFIX`), so one ACL pattern (`~llm:*`)
covers the service. Clients and workers take key names from here, so the two sides
cannot disagree on one; `docs/protocol.md` lists them.
"""

from __future__ import annotations

DEFAULT_PREFIX = "llm"
CONSUMER_GROUP = "workers"


def requests_stream(prefix: str = DEFAULT_PREFIX, shard: int | None = None) -> str:
    """Key of the request stream (`<prefix>:requests`, or `<prefix>:requests:<n>` when sharded)."""
    return f"{prefix}:requests" if shard is None else f"{prefix}:requests:{shard}"


def reply_stream(request_id: str, prefix: str = DEFAULT_PREFIX) -> str:
    """Default per-request reply channel."""
    return f"{prefix}:reply:{request_id}"


def dead_letter_stream(prefix: str = DEFAULT_PREFIX) -> str:
    """Where entries that cannot be processed are parked, with the reason."""
    return f"{prefix}:dead"


def cancel_stream(prefix: str = DEFAULT_PREFIX) -> str:
    """Broadcast stream of cancellations: entries with field `id`; every worker watches it."""
    return f"{prefix}:cancel"


def final_guard_key(prefix: str, request_id: str) -> str:
    """Key whose `SET NX` decides which writer publishes the one final reply of a request."""
    return f"{prefix}:final:{request_id}"


def reply_key_allowed(key: str, prefix: str = DEFAULT_PREFIX) -> bool:
    """Whether a `reply_to` stays inside the reply namespace, so no request makes a worker write elsewhere."""
    return key.startswith(f"{prefix}:reply:") and len(key) > len(prefix) + 7
