"""ACL users for a deployment with tenants: one per tenant backend, one for the workers.

    python -m worker.acl producer --tenant alice --password PW   # a tenant's chatbot backend
    python -m worker.acl worker --password PW                    # the worker pool

Each prints one `ACL SETUSER` command per line, for `redis-cli` (or any client's raw command).
They need Redis 7 (or Valkey): selectors `(...)` and read/write key permissions `%R~`/`%W~`.
The key prefix is `--prefix`, else `LLM_PREFIX`, else `llm`. `--hashed` writes the password's
SHA-256 (`#<hex>`) instead of the password, so the line can be kept in configuration.

What a tenant's user may do, and nothing else (docs/security.md):
- XADD to its request stream and its cancel stream, write-only: it cannot read its own
  request stream, let alone another tenant's;
- XREAD (blocking or not) and XRANGE of its own reply streams `<prefix>:t:{<tenant>}:reply:*`;
- the same in each of its shard namespaces `<prefix>:t:{<tenant>.<n>}` (`LLM_STREAM_SHARDS`), whatever
  their number: the patterns name the shard as 1 to 4 digits (`{<tenant>.[0-9]}`, ...), so the line
  needs no N and matches no other tenant's keys (producer/wire/keys.py says why);
- PING, and CLIENT SETINFO (the library's name on its own connection).
No other key, no SET, no scripts, no KEYS/SCAN, no CONFIG/FLUSH, no pub/sub channels.

The workers' user may touch every key under the prefix (all tenants' namespaces, heartbeats,
stats) with exactly the commands the worker sends, including those its Lua scripts call (which
Redis checks against the same ACL). It loads the service's scripts and runs them by hash:
SCRIPT LOAD + EVALSHA can run any script, so the worker is a trusted identity whose scripts
are still held to its key pattern and command list.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import sys

from producer.wire.keys import DEFAULT_PREFIX, tenant_root_patterns

# What a tenant's client sends (producer/client.py with a tenant): XADD, XREAD, and what redis-py
# sends on its own (PING for health checks, CLIENT SETINFO on connect; AUTH/HELLO are always allowed).
CONNECTION_COMMANDS = ("ping", "client|setinfo")

# Every command the worker sends, directly or from its scripts (final_guard.py, backlog.py,
# heartbeat.py, reclaim.py), and redis-py's script loading (SCRIPT EXISTS/LOAD, then EVALSHA).
WORKER_COMMANDS = (
    "xreadgroup", "xread", "xrange", "xrevrange", "xadd", "xack", "xclaim", "xautoclaim", "xpending",
    "xtrim", "xlen", "xinfo|groups", "xinfo|consumers", "xgroup|create", "xgroup|delconsumer",
    "exists", "get", "set", "del", "expire", "evalsha", "script|load", "script|exists",
)  # fmt: skip

# What redis-py's cluster client sends besides (LLM_REDIS_CLUSTER): the slot map, the command table
# (which keys a command names), and the scripts sent whole (EVAL, producer/wire/redis_factory.py).
CLUSTER_COMMANDS = ("cluster|slots", "command", "eval")

# A prefix is written into key patterns: no glob character, no space.
_PREFIX = re.compile(r"[A-Za-z0-9_.:-]{1,64}")


def check_prefix(prefix: str) -> str:
    if not _PREFIX.fullmatch(prefix):
        raise ValueError(f"prefix {prefix!r} must be 1-64 characters of A-Za-z0-9_.:-")
    return prefix


def password_rule(password: str, hashed: bool = False) -> str:
    """`>password`, or `#<sha256 hex>` when `hashed`."""
    if not password or any(c.isspace() for c in password):
        raise ValueError("the password must be non-empty and contain no whitespace")
    return "#" + hashlib.sha256(password.encode()).hexdigest() if hashed else ">" + password


def _base(password: str, hashed: bool) -> list[str]:
    # `reset` first, so running the line again replaces the user instead of adding to it.
    return ["reset", "on", password_rule(password, hashed), "resetchannels", "-@all"] + [
        f"+{c}" for c in CONNECTION_COMMANDS
    ]


def producer_rules(
    tenant: str, password: str, prefix: str = DEFAULT_PREFIX, hashed: bool = False, cluster: bool = False
) -> list[str]:
    """The ACL rules of tenant `tenant`'s backend user (`cluster`: with what the cluster client needs;
    a tenant's client runs no script, so without EVAL).

    The keys are those of every namespace of the tenant, `<prefix>:t:{<tenant>}` and, for any number of
    shards, `<prefix>:t:{<tenant>.<n>}` (`tenant_root_patterns`): the same line serves N = 1 and N > 1.
    """
    roots = tenant_root_patterns(check_prefix(prefix), tenant)
    extra = [f"+{c}" for c in CLUSTER_COMMANDS if c != "eval"] if cluster else []
    writes = " ".join(f"%W~{root}:requests %W~{root}:cancel" for root in roots)
    reads = " ".join(f"%R~{root}:reply:*" for root in roots)
    return _base(password, hashed) + extra + [f"(+xadd {writes})", f"(+xread +xrange {reads})"]


def worker_rules(
    password: str, prefix: str = DEFAULT_PREFIX, hashed: bool = False, cluster: bool = False
) -> list[str]:
    """The ACL rules of the workers' user (`cluster`: with what the cluster client needs)."""
    commands = WORKER_COMMANDS + (CLUSTER_COMMANDS if cluster else ())
    return _base(password, hashed) + [f"~{check_prefix(prefix)}:*"] + [f"+{c}" for c in commands]


def setuser(user: str, rules: list[str]) -> str:
    """One `ACL SETUSER` command line."""
    if not user or any(c.isspace() for c in user):
        raise ValueError("the user name must be non-empty and contain no whitespace")
    return " ".join(["ACL", "SETUSER", user, *rules])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m worker.acl", description=__doc__.split("\n\n")[0])
    parser.add_argument("--prefix", default=os.environ.get("LLM_PREFIX") or DEFAULT_PREFIX)
    sub = parser.add_subparsers(dest="role", required=True)
    producer = sub.add_parser("producer", help="a tenant's chatbot backend")
    producer.add_argument("--tenant", required=True)
    worker = sub.add_parser("worker", help="the worker pool")
    for p in (producer, worker):
        p.add_argument("--password", required=True)
        p.add_argument("--user", default=None, help="ACL user name (default: the tenant; llm-worker)")
        p.add_argument("--hashed", action="store_true", help="write the password's SHA-256, not the password")
        p.add_argument("--cluster", action="store_true", help="for Redis Cluster (LLM_REDIS_CLUSTER)")
    args = parser.parse_args(argv)
    try:
        if args.role == "producer":
            line = setuser(
                args.user or args.tenant,
                producer_rules(args.tenant, args.password, args.prefix, args.hashed, args.cluster),
            )
        else:
            rules = worker_rules(args.password, args.prefix, args.hashed, args.cluster)
            line = setuser(args.user or "llm-worker", rules)
    except ValueError as exc:
        parser.error(str(exc))
    print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
