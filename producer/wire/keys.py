"""Key names: every Redis key of the service, built from the deployment's prefix.

All keys share one prefix (default `llm`, `LLM_PREFIX`), so one ACL pattern (`~llm:*`)
covers the service. Clients and workers take key names from here, so the two sides
cannot disagree on one; `docs/protocol.md` lists them.
"""

from __future__ import annotations

from dataclasses import dataclass

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


def stats_stream(prefix: str = DEFAULT_PREFIX) -> str:
    """Capped stream of the workers' live stats (`worker_stats`), one entry per worker per interval."""
    return f"{prefix}:stats"


def final_guard_key(prefix: str, request_id: str) -> str:
    """Key whose `SET NX` decides which writer publishes the one final reply of a request."""
    return f"{prefix}:final:{request_id}"


def heartbeat_key(prefix: str, consumer: str) -> str:
    """Key that exists while worker `consumer` is alive (its value: `alive` or `draining`)."""
    return f"{prefix}:hb:{consumer}"


def reply_key_allowed(key: str, prefix: str = DEFAULT_PREFIX) -> bool:
    """Whether a `reply_to` stays inside the reply namespace, so no request makes a worker write elsewhere."""
    return key.startswith(f"{prefix}:reply:") and len(key) > len(prefix) + 7


@dataclass(frozen=True)
class StreamNames:
    """The keys of one deployment, built once from its prefix and handed around as one value.

    A component that needs several keys takes a `StreamNames` instead of a row of key
    strings, which could be passed in the wrong order without any type noticing.
    """

    prefix: str
    requests: str
    dead_letter: str
    cancel: str
    stats: str

    @classmethod
    def for_prefix(cls, prefix: str = DEFAULT_PREFIX) -> StreamNames:
        return cls(
            prefix,
            requests_stream(prefix),
            dead_letter_stream(prefix),
            cancel_stream(prefix),
            stats_stream(prefix),
        )

    def reply(self, request_id: str) -> str:
        """The default reply stream of a request."""
        return reply_stream(request_id, self.prefix)

    def final_guard(self, request_id: str) -> str:
        """The final-reply guard of a request."""
        return final_guard_key(self.prefix, request_id)

    def heartbeat(self, consumer: str) -> str:
        """The heartbeat key of a worker."""
        return heartbeat_key(self.prefix, consumer)
