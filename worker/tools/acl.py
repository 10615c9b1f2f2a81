"""ACL users: one per tenant backend (or one for every backend, without tenants), one for the workers.

    python -m worker.acl producer --tenant alice --password PW   # a tenant's chatbot backend
    python -m worker.acl producer --no-tenants --password PW     # the backends, without tenants
    python -m worker.acl worker --password PW                    # the worker pool

Each prints one `ACL SETUSER` command per line, for `redis-cli` (or any client's raw command).
They need Redis 7 (or Valkey): selectors `(...)` and read/write key permissions `%R~`/`%W~`.
The key prefix is `--prefix`, else `LLM_PREFIX`, else `llm`. `--hashed` writes the password's
SHA-256 (`#<hex>`) instead of the password, so the line can be kept in configuration.

A line names only commands every server of `--redis-version` knows (default 7.0, the oldest
supported: the line loads on Redis 7.0, 7.2+ and Valkey alike). A server refuses a whole
`ACL SETUSER` that names a command it does not have: CLIENT SETINFO came with Redis 7.2, so it is
granted only with `--redis-version 7.2` or later (Valkey reports 7.2.4 as its `redis_version`).
redis-py sends CLIENT SETINFO on connect and ignores its refusal, so a user without it connects
all the same; on 7.2+ the refusal is only counted in `ACL LOG`.

What a tenant's user may do, and nothing else (docs/security.md):
- XADD to its request stream and its cancel stream, write-only: it cannot read its own
  request stream, let alone another tenant's;
- XREAD (blocking or not) and XRANGE of its own reply streams `<prefix>:t:{<tenant>}:reply:*`;
- the same in each of its shard namespaces `<prefix>:t:{<tenant>.<n>}` (`LLM_STREAM_SHARDS`), whatever
  their number: the patterns name the shard as 1 to 4 digits (`{<tenant>.[0-9]}`, ...), so the line
  needs no N and matches no other tenant's keys (producer/wire/keys.py says why);
- PING, and CLIENT SETINFO (the library's name on its own connection) where the server has it.
No other key, no SET, no scripts, no KEYS/SCAN, no CONFIG/FLUSH, no pub/sub channels.

Without tenants (`--no-tenants`) every backend is one party and shares the un-tenanted keys: the
user may read every key under the prefix and write every one but `<prefix>:stats`, the workers'
live stats (the gateway's /v1/models and `python -m worker.top` trust them, and an entry there with
a huge id would stop every worker's stats writes): it may read that stream (XREVRANGE), not write it;
and but the request id claims `<prefix>:claim:*` and, in shard namespaces, `<prefix>:s:{<n>}:claim:*`
(a claim names the entry that owns an id: a backend that could set one could own a victim's id before
its entry is read), which it may not touch at all.

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

from producer.wire.keys import DEFAULT_PREFIX, MAX_STREAM_SHARDS, tenant_root_patterns

# What a tenant's client sends (producer/client.py with a tenant): XADD, XREAD, and what redis-py
# sends on its own (PING for health checks, CLIENT SETINFO on connect; AUTH/HELLO are always allowed).
CONNECTION_COMMANDS = ("ping", "client|setinfo")

# The oldest server the lines are for (README: Redis >= 7), and the commands some supported servers
# lack, with the version that added them: a line names one only for a server that has it, since a
# server refuses the whole ACL SETUSER over one unknown command.
OLDEST_SERVER = (7, 0)
NEWER_COMMANDS = {"client|setinfo": (7, 2)}

# What a producer without tenants sends (producer/client.py, its admission and cancel scripts, the
# HTTP gateway's /v1/models and readiness).
SHARED_PRODUCER_COMMANDS = (
    "xadd", "xread", "xrange", "xrevrange", "xinfo|groups", "xlen", "exists", "set", "expire",
    "evalsha", "script|load", "script|exists",
)  # fmt: skip

# The workers' stats stream, under the prefix: written by the workers only (`shared_producer_rules`).
STATS_KEY = "stats"
# Where the request id claims are, under the prefix: the bare namespace's and each shard namespace's
# (`<prefix>:s:{<n>}`, n of 1 to 4 digits: every shard below MAX_STREAM_SHARDS); workers' keys only.
DIGIT = "[0-9]"
CLAIM_PREFIXES: tuple[tuple[str, ...], ...] = (tuple("claim:"),) + tuple(
    (*"s:{", *[DIGIT] * width, *"}:claim:") for width in range(1, len(str(MAX_STREAM_SHARDS - 1)) + 1)
)

# Every command the worker sends, directly or from its scripts (final_guard.py, backlog.py,
# heartbeat.py, reclaim.py), and redis-py's script loading (SCRIPT EXISTS/LOAD, then EVALSHA).
WORKER_COMMANDS = (
    "xreadgroup", "xread", "xrange", "xrevrange", "xadd", "xack", "xclaim", "xautoclaim", "xpending",
    "xtrim", "xlen", "xinfo|groups", "xinfo|consumers", "xgroup|create", "xgroup|delconsumer",
    "exists", "get", "set", "del", "expire", "evalsha", "script|load", "script|exists",
    # The stats writer's repair of a stream whose last id is ahead of the clock (live_stats.py).
    "xinfo|stream", "time",
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


def parse_version(text: str) -> tuple[int, int]:
    """`7.0`, `7.2.4`, `8` -> (major, minor); a server older than `OLDEST_SERVER` is refused."""
    match = re.fullmatch(r"(\d{1,3})(?:\.(\d{1,3}))?(?:\.\d{1,5})?", text.strip())
    if not match:
        raise ValueError(f"server version {text!r} must look like 7.0, 7.2 or 8.1.0")
    version = (int(match[1]), int(match[2] or 0))
    if version < OLDEST_SERVER:
        raise ValueError(f"server version {text!r}: Redis 7.0 or later is needed (ACL selectors, %R~/%W~)")
    return version


def known(commands: tuple[str, ...], server: tuple[int, int]) -> list[str]:
    """`commands` less those `server` does not have (`NEWER_COMMANDS`)."""
    return [c for c in commands if NEWER_COMMANDS.get(c, OLDEST_SERVER) <= server]


def _base(password: str, hashed: bool, server: tuple[int, int]) -> list[str]:
    # `reset` first, so running the line again replaces the user instead of adding to it.
    return ["reset", "on", password_rule(password, hashed), "resetchannels", "-@all"] + [
        f"+{c}" for c in known(CONNECTION_COMMANDS, server)
    ]


def all_keys_but(head: str, tail: str) -> list[str]:
    """Glob patterns that together match every key `head + x` with `x != tail`, and nothing else.

    Redis ACLs have no "except": the patterns are the keys `head` + a proper prefix of `tail`, those that
    agree with `tail` up to a position and differ there (`[^c]`), and those longer than `tail`."""
    if not tail or not tail.isalnum():
        raise ValueError(f"{tail!r} must be letters and digits")
    shorter = [head + tail[:i] for i in range(len(tail))]
    differ = [f"{head}{tail[:i]}[^{tail[i]}]*" for i in range(len(tail))]
    return shorter + differ + [f"{head}{tail}?*"]


# The characters an excluded key of `keys_outside` may name one by one: none is a glob character, nor one
# with a meaning inside `[^...]` (`^`, `-`, `]`, backslash), nor a digit (`DIGIT` stands for those).
_LITERAL = re.compile(r"[A-Za-z:{}._]")


def keys_outside(head: str, keys: list[tuple[str, ...]], prefixes: list[tuple[str, ...]]) -> list[str]:
    """Glob patterns that together match every key `head + x` where `x` is none of `keys` and starts with
    none of `prefixes`, and nothing else. Each of those is a sequence of characters and `DIGIT` (any one
    decimal digit).

    The patterns walk the tree of the excluded keys' beginnings (`all_keys_but` is the case of one key):
    each beginning followed by a character no excluded key has there (`[^...]*`); the keys longer than an
    excluded key that begins no other (`?*`); and each beginning that is not excluded itself, as a whole
    key. In that order: Redis tries a key against the patterns in turn, and the service's keys match one
    of the first few (`<prefix>:[^cs]*` holds the requests, replies and guards of the bare namespace).
    Nothing under an excluded prefix is matched."""
    for word in keys + prefixes:
        if not word or any(c != DIGIT and not _LITERAL.fullmatch(c) for c in word):
            raise ValueError(f"{''.join(word)!r} must be letters, `:{{}}._` and [0-9]")
    whole: list[str] = []
    differ: list[str] = []
    longer: list[str] = []
    starts = sorted({w[:i] for w in keys + prefixes for i in range(len(w) + 1)}, key=lambda w: (len(w), w))
    for start in starts:
        if any(start[: len(p)] == p for p in prefixes):
            continue  # an excluded prefix, or under one
        glob = head + "".join(start)
        if start not in keys:
            whole.append(glob)
        nexts = sorted(
            {w[len(start)] for w in keys + prefixes if len(w) > len(start) and w[: len(start)] == start}
        )
        if DIGIT in nexts and any(c.isdigit() for c in nexts):
            raise ValueError("a digit and [0-9] at the same place")
        if nexts:
            differ.append(f"{glob}[^{''.join('0-9' if c == DIGIT else c for c in nexts)}]*")
        else:
            longer.append(f"{glob}?*")
    return differ + longer + whole


def producer_rules(
    tenant: str,
    password: str,
    prefix: str = DEFAULT_PREFIX,
    hashed: bool = False,
    cluster: bool = False,
    server: tuple[int, int] = OLDEST_SERVER,
) -> list[str]:
    """The ACL rules of tenant `tenant`'s backend user (`cluster`: with what the cluster client needs;
    a tenant's client runs no script, so without EVAL), for servers of version `server` and later.

    The keys are those of every namespace of the tenant, `<prefix>:t:{<tenant>}` and, for any number of
    shards, `<prefix>:t:{<tenant>.<n>}` (`tenant_root_patterns`): the same line serves N = 1 and N > 1.
    """
    roots = tenant_root_patterns(check_prefix(prefix), tenant)
    extra = [f"+{c}" for c in CLUSTER_COMMANDS if c != "eval"] if cluster else []
    writes = " ".join(f"%W~{root}:requests %W~{root}:cancel" for root in roots)
    reads = " ".join(f"%R~{root}:reply:*" for root in roots)
    return _base(password, hashed, server) + extra + [f"(+xadd {writes})", f"(+xread +xrange {reads})"]


def shared_producer_rules(
    password: str,
    prefix: str = DEFAULT_PREFIX,
    hashed: bool = False,
    cluster: bool = False,
    server: tuple[int, int] = OLDEST_SERVER,
) -> list[str]:
    """The ACL rules of the backends' user without tenants: every key under the prefix to read and
    write (`keys_outside`) but the workers' stats stream `<prefix>:stats`, which it may only read, and
    the request id claims (`CLAIM_PREFIXES`), which it may not touch.

    Redis grants a key when one pattern carries every permission the command needs (EVALSHA: read and
    write), so the other keys get read-write patterns (`~`), not a read pattern and a write pattern."""
    head = check_prefix(prefix) + ":"
    commands = SHARED_PRODUCER_COMMANDS + (CLUSTER_COMMANDS if cluster else ())
    outside = keys_outside(head, [tuple(STATS_KEY)], list(CLAIM_PREFIXES))
    keys = [f"%R~{head}{STATS_KEY}"] + [f"~{p}" for p in outside]
    return _base(password, hashed, server) + keys + [f"+{c}" for c in commands]


def worker_rules(
    password: str,
    prefix: str = DEFAULT_PREFIX,
    hashed: bool = False,
    cluster: bool = False,
    server: tuple[int, int] = OLDEST_SERVER,
) -> list[str]:
    """The ACL rules of the workers' user (`cluster`: with what the cluster client needs)."""
    commands = WORKER_COMMANDS + (CLUSTER_COMMANDS if cluster else ())
    return _base(password, hashed, server) + [f"~{check_prefix(prefix)}:*"] + [f"+{c}" for c in commands]


def setuser(user: str, rules: list[str]) -> str:
    """One `ACL SETUSER` command line."""
    if not user or any(c.isspace() for c in user):
        raise ValueError("the user name must be non-empty and contain no whitespace")
    return " ".join(["ACL", "SETUSER", user, *rules])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m worker.acl", description=__doc__.split("\n\n")[0])
    parser.add_argument("--prefix", default=os.environ.get("LLM_PREFIX") or DEFAULT_PREFIX)
    sub = parser.add_subparsers(dest="role", required=True)
    producer = sub.add_parser("producer", help="a tenant's chatbot backend, or every backend without tenants")
    whose = producer.add_mutually_exclusive_group(required=True)
    whose.add_argument("--tenant", help="the tenant whose backend the user is")
    whose.add_argument(
        "--no-tenants",
        action="store_true",
        help="the backends of a deployment without tenants (LLM_TENANTS unset): one shared namespace",
    )
    worker = sub.add_parser("worker", help="the worker pool")
    for p in (producer, worker):
        p.add_argument("--password", required=True)
        p.add_argument(
            "--user", default=None, help="ACL user name (default: the tenant; llm-producer; llm-worker)"
        )
        p.add_argument("--hashed", action="store_true", help="write the password's SHA-256, not the password")
        p.add_argument("--cluster", action="store_true", help="for Redis Cluster (LLM_REDIS_CLUSTER)")
        p.add_argument(
            "--redis-version",
            default="7.0",
            help="the oldest server the line must load on (default: 7.0, every supported server; "
            "7.2 or later adds CLIENT SETINFO)",
        )
    args = parser.parse_args(argv)
    try:
        server = parse_version(args.redis_version)
        if args.role == "worker":
            rules = worker_rules(args.password, args.prefix, args.hashed, args.cluster, server)
            line = setuser(args.user or "llm-worker", rules)
        elif args.no_tenants:
            rules = shared_producer_rules(args.password, args.prefix, args.hashed, args.cluster, server)
            line = setuser(args.user or "llm-producer", rules)
        else:
            rules = producer_rules(args.tenant, args.password, args.prefix, args.hashed, args.cluster, server)
            line = setuser(args.user or args.tenant, rules)
    except ValueError as exc:
        parser.error(str(exc))
    print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
