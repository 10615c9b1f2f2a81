"""One place that opens Redis connections: a plain client, or redis-py's cluster client.

`LLM_REDIS_CLUSTER=true` (worker and client settings) makes `REDIS_URL` name any node of a
Redis Cluster (or Valkey in cluster mode); redis-py's `RedisCluster` then learns the slot map,
follows MOVED/ASK redirections and a failover's new primary. Everything else in the service
talks to the returned object as to a plain `redis.Redis`: the commands it sends are single-key,
or multi-key within one hash slot (see `producer/wire/keys.py`), or non-transactional pipelines,
which the cluster client splits by node.

Scripts: a cluster pipeline cannot recover from NOSCRIPT (a node that never saw the script, or
a replica just promoted), so in cluster mode `register_script` returns a script that is sent
whole with EVAL; the server caches its compiled form, so the cost is the script's bytes on the
wire. Outside cluster mode it is redis-py's own EVALSHA script.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Sequence
from typing import Any, TypeVar, cast

import redis
import redis.asyncio as aioredis
from redis.cluster import RedisCluster
from redis.crc import key_slot


def connect(url: str, cluster: bool = False, **kwargs: Any) -> redis.Redis:
    """A client of the server (or cluster, `cluster`) at `url`; typed as `redis.Redis`, whose commands
    the cluster client shares."""
    if cluster:
        client = RedisCluster.from_url(url, **kwargs)
        original = client.commands_parser.get_keys

        def get_keys(redis_conn: Any, *args: Any) -> Any:
            keys = local_keys(args)
            return original(redis_conn, *args) if keys is None else keys

        client.commands_parser.get_keys = get_keys  # type: ignore[method-assign]
        return cast(redis.Redis, client)
    return redis.Redis.from_url(url, **kwargs)


def connect_async(url: str, cluster: bool = False, **kwargs: Any) -> aioredis.Redis:
    """The asyncio counterpart of `connect`."""
    if cluster:
        from redis.asyncio.cluster import RedisCluster as AsyncRedisCluster

        client = AsyncRedisCluster.from_url(url, **kwargs)
        original = client.commands_parser.get_keys

        async def get_keys(*args: Any) -> Any:
            keys = local_keys(args)
            return await original(*args) if keys is None else tuple(keys)

        client.commands_parser.get_keys = get_keys  # type: ignore[method-assign]
        return cast(aioredis.Redis, client)
    return aioredis.Redis.from_url(url, **kwargs)


def local_keys(args: Sequence[Any]) -> list[Any] | None:
    """The keys of the commands whose keys redis-py's cluster client would otherwise ask a server for
    (COMMAND GETKEYS, one more round trip per command: "movable keys"), read from the arguments: the
    scripts (EVAL/EVALSHA) and the stream reads (XREAD/XREADGROUP). None for any other command."""
    if not args:
        return None
    name = str(args[0].decode() if isinstance(args[0], bytes) else args[0]).upper()
    if name in ("EVAL", "EVALSHA") and len(args) >= 3:
        return list(args[3 : 3 + int(args[2])])
    if name in ("XREAD", "XREADGROUP"):
        start = 4 if name == "XREADGROUP" else 1  # after GROUP <group> <consumer>
        for i in range(start, len(args)):
            arg = args[i]
            if str(arg.decode() if isinstance(arg, bytes) else arg).upper() == "STREAMS":
                rest = args[i + 1 :]
                return list(rest[: len(rest) // 2])
    return None


def is_cluster(client: object) -> bool:
    """Whether `client` (or a pipeline of it) talks to a cluster."""
    from redis.asyncio.cluster import ClusterPipeline as AsyncClusterPipeline
    from redis.asyncio.cluster import RedisCluster as AsyncRedisCluster
    from redis.cluster import ClusterPipeline

    return isinstance(client, (RedisCluster, ClusterPipeline, AsyncRedisCluster, AsyncClusterPipeline))


def recover(client: object) -> None:
    """After a connection error on a cluster: move the client's default node to another primary.

    redis-py asks its default node which keys a script names (COMMAND GETKEYS) when it routes a
    pipeline, and keeps that node after it died, so every pipeline would fail until the process
    restarted. A no-op for a plain client.
    """
    replace = getattr(client, "replace_default_node", None)
    if replace is not None and is_cluster(client):
        replace()


class EvalScript:
    """A script sent whole (EVAL) on every call: what a cluster pipeline can always run."""

    def __init__(self, client: Any, script: str):
        self.registered_client = client
        self.script = script

    def __call__(
        self, keys: Sequence[Any] | None = None, args: Iterable[Any] | None = None, client: Any = None
    ) -> Any:
        keys = list(keys or [])
        target = self.registered_client if client is None else client
        # execute_command: a cluster pipeline's own `eval` is not the command (EVALSHA it refuses).
        return target.execute_command("EVAL", self.script, len(keys), *keys, *(args or []))


class AsyncEvalScript(EvalScript):
    """`EvalScript` for the asyncio clients (awaitable like redis-py's `AsyncScript`)."""

    async def __call__(  # type: ignore[override]
        self, keys: Sequence[Any] | None = None, args: Iterable[Any] | None = None, client: Any = None
    ) -> Any:
        result = super().__call__(keys, args, client)
        # A pipeline queues the command and returns itself, which is awaitable too (and awaiting it
        # would empty its queue): only the client's own call is a coroutine to await.
        return await result if inspect.iscoroutine(result) else result


def register_script(client: Any, script: str) -> Any:
    """`client.register_script(script)`, or an `EvalScript` on a cluster."""
    if not is_cluster(client):
        return client.register_script(script)
    from redis.asyncio.cluster import RedisCluster as AsyncRedisCluster

    return (
        AsyncEvalScript(client, script)
        if isinstance(client, AsyncRedisCluster)
        else EvalScript(client, script)
    )


KeyT_ = TypeVar("KeyT_", str, bytes)


def by_slot(keys: Iterable[KeyT_]) -> list[list[KeyT_]]:
    """`keys` grouped by hash slot, in first-seen order (a multi-key read may name one slot's keys only)."""
    groups: dict[int, list[KeyT_]] = {}
    for key in keys:
        groups.setdefault(key_slot(key if isinstance(key, bytes) else key.encode()), []).append(key)
    return list(groups.values())
