"""Key names: every Redis key of the service, built from the deployment's prefix.

All keys share one prefix (default `llm`, `LLM_PREFIX`), so one ACL pattern (`~llm:*`)
covers the service. Clients and workers take key names from here, so the two sides
cannot disagree on one; `docs/protocol.md` lists them.

Tenants (docs/security.md): a deployment that names tenants gives each its own namespace,
`<prefix>:t:{<tenant>}`, holding that tenant's request stream, reply streams, final-reply
guards, request id claims, cancel stream and dead letters. The braces are a cluster hash tag, so one tenant's
keys share one slot; the namespace is what the tenant's ACL user may touch. Without a tenant
the namespace is the bare prefix and every key is the one of the single-stream deployment.
Heartbeats and live stats are the workers' own and stay under the bare prefix.

Shards (`LLM_STREAM_SHARDS=N`, docs/scaling.md): N request streams instead of one, each in its
own namespace `<prefix>:s:{<n>}` for n in 0..N-1, holding the same keys as a tenant's. The hash
tag `{<n>}` puts every key of one shard in one slot, so on Redis Cluster each shard's scripts
(final guard + XACK, tokens, heartbeat touch) run on one node, and the shards spread over the
nodes. A client picks a request's shard from its affinity key (its `shard_key`, else its `session`,
else the content of its first user message: `ChatRequest.affinity_key`) or, without one, its
request id: `shard_for(key, N)`, CRC-32 of the UTF-8 key modulo N. Workers prefer the shards they
own (`worker/loop/shard_ownership.py`), so one key's requests meet one worker's prefix cache. In cluster mode
(`LLM_REDIS_CLUSTER`) a deployment without tenants always uses the shard namespaces (N = 1: the
one shard `<prefix>:s:{0}`), and heartbeats live in each namespace (`<root>:hb:<consumer>`) so that
the scripts which touch them with the request stream stay in one slot.

Shards within tenants: with tenants and N > 1, each tenant gets N namespaces
`<prefix>:t:{<tenant>.<n>}`, n in 0..N-1 (with N = 1 the tenant keeps `<prefix>:t:{<tenant>}`,
the keys of a deployment without shards, unchanged on the wire). Why this form:
- the shard number is inside the braces, so it is part of the hash tag: each (tenant, shard)
  namespace is one slot, and one large tenant spreads over the cluster's primaries;
- `.` is outside the tenant alphabet (`A-Za-z0-9_-`), so `{alice.3}` cannot be the
  namespace of any tenant, and no tenant name followed by `.` or `}` is a prefix of another
  tenant's namespace: `<prefix>:t:{alice.` and `<prefix>:t:{alice}` start only alice's keys,
  never those of `alice-2` (whose keys start `<prefix>:t:{alice-2`);
- `.` is no glob character of Redis ACL patterns (`*`, `?`, `[...]`, backslash), nor a brace, nor
  the `:` that separates a key's parts, nor the `/` of the worker's `seq_id_of` (`<tenant>/<id>`);
- the sharded form never equals the unsharded one: after the tenant name comes `.` in one and
  `}` in the other, so an ACL pattern of one form matches no key of the other.
`tenant_root_patterns` turns this into ACL glob patterns: the unsharded root and the sharded
roots with 1 to 4 decimal digits (`[0-9]`, `[0-9][0-9]`, ...: every shard below
`MAX_STREAM_SHARDS`), so a tenant's ACL user covers every N without knowing it and matches no
key outside its own namespaces.
"""

from __future__ import annotations

import re
import zlib
from dataclasses import dataclass

DEFAULT_PREFIX = "llm"
CONSUMER_GROUP = "workers"

# A tenant name: no glob or hash-tag character, so it cannot widen an ACL pattern or split a namespace.
TENANT_PATTERN = re.compile(r"[A-Za-z0-9_-]{1,64}")
# Shards per deployment (LLM_STREAM_SHARDS) are at most this: a shard number (below it) has 1-4 digits.
MAX_STREAM_SHARDS = 1024
# Between a tenant and its shard number in a sharded tenant's hash tag: in no tenant name.
SHARD_SEPARATOR = "."


def check_tenant(name: str) -> str:
    """`name` if it is a valid tenant name (1-64 of `A-Za-z0-9_-`), else ValueError."""
    if not TENANT_PATTERN.fullmatch(name):  # fullmatch: a `$` would let a trailing newline through
        raise ValueError(f"tenant {name!r} must be 1-64 characters of A-Za-z0-9_-")
    return name


def check_shard(shard: int) -> int:
    """`shard` if it is a valid shard number (0 to `MAX_STREAM_SHARDS` - 1), else ValueError."""
    if not 0 <= shard < MAX_STREAM_SHARDS:
        raise ValueError(f"shard {shard} must be >= 0 and < {MAX_STREAM_SHARDS}")
    return shard


def namespace(prefix: str = DEFAULT_PREFIX, tenant: str | None = None, shard: int | None = None) -> str:
    """Root of a tenant's keys `<prefix>:t:{<tenant>}`, of a tenant's shard `<prefix>:t:{<tenant>.<n>}`,
    of a shard's `<prefix>:s:{<n>}`; else the prefix."""
    if tenant is not None:
        if shard is not None:
            return f"{prefix}:t:{{{check_tenant(tenant)}{SHARD_SEPARATOR}{check_shard(shard)}}}"
        return f"{prefix}:t:{{{check_tenant(tenant)}}}"
    if shard is not None:
        return f"{prefix}:s:{{{check_shard(shard)}}}"
    return prefix


def tenant_root_patterns(prefix: str, tenant: str) -> list[str]:
    """ACL glob patterns matching exactly the namespace roots of `tenant`, sharded or not, for any N:
    `<prefix>:t:{<tenant>}` and `<prefix>:t:{<tenant>.<digits>}` with 1 to 4 digits.

    Append the rest of a key (`:requests`, `:reply:*`) to get a key pattern. The prefix must hold no
    glob character (`worker.tools.acl.check_prefix`); the tenant holds none (`check_tenant`).
    """
    name = check_tenant(tenant)
    widths = range(1, len(str(MAX_STREAM_SHARDS - 1)) + 1)
    return [f"{prefix}:t:{{{name}}}"] + [
        f"{prefix}:t:{{{name}{SHARD_SEPARATOR}{'[0-9]' * width}}}" for width in widths
    ]


def shard_for(key: str, shards: int) -> int:
    """The shard of a request whose shard key (its affinity key, else its request id) is `key`:
    CRC-32 (IEEE, as zlib) of its UTF-8 bytes modulo `shards`."""
    return zlib.crc32(key.encode()) % shards if shards > 1 else 0


def sharded(shards: int, cluster: bool) -> bool:
    """Whether an untenanted deployment uses the shard namespaces (several shards, or a cluster)."""
    return shards > 1 or cluster


def requests_stream(prefix: str = DEFAULT_PREFIX) -> str:
    """Key of the request stream of namespace `prefix` (a shard's: `namespace(prefix, shard=n)`)."""
    return f"{prefix}:requests"


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


def claim_key(prefix: str, request_id: str) -> str:
    """Key naming the one request entry (by its body's digest) that owns request id `request_id`: the
    first a worker read; a later entry with the same id and another body is refused (docs/security.md)."""
    return f"{prefix}:claim:{request_id}"


def heartbeat_key(prefix: str, consumer: str) -> str:
    """Key that exists while worker `consumer` is alive (its value: `alive` or `draining`)."""
    return f"{prefix}:hb:{consumer}"


def reply_key_allowed(key: str, prefix: str = DEFAULT_PREFIX) -> bool:
    """Whether a `reply_to` stays inside the reply namespace, so no request makes a worker write elsewhere.

    `prefix` is the namespace root: `namespace(prefix, tenant)` for a tenant's requests.
    """
    return key.startswith(f"{prefix}:reply:") and len(key) > len(prefix) + 7


@dataclass(frozen=True)
class StreamNames:
    """The keys of one deployment, built once from its prefix and handed around as one value.

    A component that needs several keys takes a `StreamNames` instead of a row of key
    strings, which could be passed in the wrong order without any type noticing. With a
    `tenant`, the request, reply, guard, cancel and dead-letter keys are that tenant's.
    """

    prefix: str
    requests: str
    dead_letter: str
    cancel: str
    stats: str
    tenant: str | None = None
    shard: int | None = None
    cluster: bool = False  # heartbeats in the namespace, so that each script touches one slot

    @classmethod
    def for_prefix(
        cls,
        prefix: str = DEFAULT_PREFIX,
        tenant: str | None = None,
        shard: int | None = None,
        cluster: bool = False,
    ) -> StreamNames:
        root = namespace(prefix, tenant, shard)
        return cls(
            prefix,
            requests_stream(root),
            dead_letter_stream(root),
            cancel_stream(root),
            stats_stream(prefix),
            tenant,
            shard,
            cluster,
        )

    @classmethod
    def layout(
        cls, prefix: str, tenants: list[str | None], shards: int = 1, cluster: bool = False
    ) -> list[StreamNames]:
        """Every namespace of a deployment: one per tenant (N per tenant when `shards` N > 1, tenant by
        tenant, shard 0 first), else per shard (`sharded`), else the bare one."""
        if any(t is not None for t in tenants):
            if shards > 1:
                return [cls.for_prefix(prefix, t, n, cluster) for t in tenants for n in range(shards)]
            return [cls.for_prefix(prefix, t, cluster=cluster) for t in tenants]
        if sharded(shards, cluster):
            return [cls.for_prefix(prefix, shard=n, cluster=cluster) for n in range(shards)]
        return [cls.for_prefix(prefix)]

    @property
    def root(self) -> str:
        """The namespace of the request, reply, guard, cancel and dead-letter keys."""
        return namespace(self.prefix, self.tenant, self.shard)

    @property
    def lane(self) -> tuple[str | None, int | None]:
        """What tells this namespace's request stream from the others a worker reads: (tenant, shard)."""
        return (self.tenant, self.shard)

    def reply(self, request_id: str) -> str:
        """The default reply stream of a request."""
        return reply_stream(request_id, self.root)

    def final_guard(self, request_id: str) -> str:
        """The final-reply guard of a request."""
        return final_guard_key(self.root, request_id)

    def claim(self, request_id: str) -> str:
        """The id claim of a request (`claim_key`), in the namespace: the slot of its guard and reply."""
        return claim_key(self.root, request_id)

    def reply_allowed(self, key: str) -> bool:
        """Whether `key` is a reply stream of this namespace (what a `reply_to` must be)."""
        return reply_key_allowed(key, self.root)

    def heartbeat(self, consumer: str) -> str:
        """The heartbeat key of a worker (in the namespace in cluster mode, in the prefix otherwise)."""
        return heartbeat_key(self.root if self.cluster else self.prefix, consumer)
