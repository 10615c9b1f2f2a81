"""A local Redis Cluster for tests and benchmarks: packaged valkey-server nodes on loopback ports.

`LocalCluster(masters=3, replicas=0)` starts `masters * (1 + replicas)` nodes with
`--cluster-enabled yes`, joins them with `valkey-cli --cluster create ... --cluster-yes`
(`--cluster-replicas` when asked), and waits until every node reports `cluster_state:ok`.
`url` names the first node; the cluster client discovers the others. `kill(port)` stops one
node at once (SIGKILL), the way a crashed primary goes, and `wait_promoted` waits until its
replica serves its slots. `migrate_slot` moves one slot to another primary the way
`valkey-cli --cluster reshard` does (IMPORTING/MIGRATING, MIGRATE in batches, SETSLOT NODE).
"""

from __future__ import annotations

import random
import shutil
import socket
import subprocess
import time
from pathlib import Path

import redis

from worker.local_redis.server import EmbeddedRedis, EmbeddedRedisError, listening, server_binary


def cli_binary() -> Path:
    """The valkey-cli packaged next to the server binary (or one on PATH)."""
    path = server_binary().with_name("valkey-cli")
    if path.exists():
        return path
    found = shutil.which("valkey-cli") or shutil.which("redis-cli")
    if found:
        return Path(found)
    raise EmbeddedRedisError("no valkey-cli next to the server binary nor on PATH")


def cluster_port() -> int:
    """A free loopback port whose cluster bus port (+10000) is free and valid too."""
    for _ in range(200):
        port = random.randint(20000, 40000)
        if (
            not listening(port)
            and not listening(port + 10000)
            and _bindable(port)
            and _bindable(port + 10000)
        ):
            return port
    raise EmbeddedRedisError("no free port pair for a cluster node")


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


class LocalCluster:
    """Start on enter, stop (and delete the nodes' files) on exit."""

    def __init__(self, masters: int = 3, replicas: int = 0, node_timeout_ms: int = 2000):
        self.masters = masters
        self.replicas = replicas
        self.node_timeout_ms = node_timeout_ms
        self.nodes: list[EmbeddedRedis] = []

    @property
    def url(self) -> str:
        return self.nodes[0].url

    @property
    def ports(self) -> list[int]:
        return [n.port for n in self.nodes]

    def start(self, timeout_s: float = 60.0) -> LocalCluster:
        for _ in range(self.masters * (1 + self.replicas)):
            port = cluster_port()
            node = EmbeddedRedis(
                port,
                extra_args=(
                    "--cluster-enabled", "yes",
                    "--cluster-config-file", "nodes.conf",
                    "--cluster-node-timeout", str(self.node_timeout_ms),
                    "--cluster-require-full-coverage", "no",
                ),
            )  # fmt: skip
            self.nodes.append(node.start())
        args = [str(cli_binary()), "--cluster", "create", *[f"127.0.0.1:{p}" for p in self.ports]]
        if self.replicas:
            args += ["--cluster-replicas", str(self.replicas)]
        done = subprocess.run([*args, "--cluster-yes"], capture_output=True, timeout=timeout_s)
        if done.returncode != 0:
            self.stop()
            raise EmbeddedRedisError(f"cluster create failed: {done.stdout.decode()[-1000:]}")
        self.wait_ok(timeout_s)
        return self

    def wait_ok(self, timeout_s: float = 60.0, skip: tuple[int, ...] = ()) -> None:
        """Until every node (but `skip`) says `cluster_state:ok` and every replica is in sync."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if all(self._ok(n.port) for n in self.nodes if n.port not in skip):
                return
            time.sleep(0.2)
        raise EmbeddedRedisError(f"cluster not ok within {timeout_s} s")

    def _ok(self, port: int) -> bool:
        client = redis.Redis(port=port, socket_timeout=1)
        try:
            info = client.execute_command("CLUSTER", "INFO")
            text = info.decode() if isinstance(info, bytes) else str(info)
            replication = client.info("replication")
            # A replica that never synced cannot take over: wait for its link too.
            synced = replication.get("role") != "slave" or replication.get("master_link_status") == "up"
            return "cluster_state:ok" in text and synced
        except redis.RedisError:
            return False
        finally:
            client.close()

    def primaries(self) -> list[int]:
        """Ports of the nodes that serve slots now."""
        out = []
        for n in self.nodes:
            client = redis.Redis(port=n.port, socket_timeout=1)
            try:
                if client.info("replication").get("role") == "master" and self._has_slots(client):
                    out.append(n.port)
            except redis.RedisError:
                pass
            finally:
                client.close()
        return out

    @staticmethod
    def _has_slots(client: redis.Redis) -> bool:
        myself = [
            line
            for line in client.execute_command("CLUSTER", "NODES").decode().splitlines()
            if "myself" in line
        ]
        return bool(myself) and len(myself[0].split()) > 8

    def kill(self, port: int) -> str:
        """Stop one node at once (SIGKILL), a crashed primary; returns its node id."""
        client = redis.Redis(port=port, socket_timeout=1)
        try:
            node_id = client.execute_command("CLUSTER", "MYID")
        finally:
            client.close()
        node = next(n for n in self.nodes if n.port == port)
        proc = node._proc
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
        return node_id.decode() if isinstance(node_id, bytes) else str(node_id)

    def wait_promoted(self, dead: int, dead_id: str, timeout_s: float = 60.0) -> None:
        """Until the cluster marks the dead primary failed, a replica serves its slots, and all is ok."""
        deadline = time.monotonic() + timeout_s
        live = next(n.port for n in self.nodes if n.port != dead)
        while time.monotonic() < deadline:
            client = redis.Redis(port=live, socket_timeout=1)
            try:
                nodes = client.execute_command("CLUSTER", "NODES").decode().splitlines()
            except redis.RedisError:
                nodes = []
            finally:
                client.close()
            line = next((x.split() for x in nodes if x.startswith(dead_id)), None)
            if line is not None and "fail" in line[2].split(",") and len(line) <= 8:
                self.wait_ok(max(1.0, deadline - time.monotonic()), skip=(dead,))
                return
            time.sleep(0.2)
        raise EmbeddedRedisError(f"no replica took over from {dead} within {timeout_s} s")

    def node_id(self, port: int) -> str:
        client = redis.Redis(port=port, socket_timeout=2)
        try:
            node_id = client.execute_command("CLUSTER", "MYID")
        finally:
            client.close()
        return node_id.decode() if isinstance(node_id, bytes) else str(node_id)

    def owner(self, slot: int, port: int | None = None) -> int:
        """The port of the primary that serves `slot`, as the node at `port` (default: the first) sees it."""
        client = redis.Redis(port=port or self.ports[0], socket_timeout=2)
        try:
            for start, end, primary, *_ in client.execute_command("CLUSTER", "SLOTS"):
                if start <= slot <= end:
                    return int(primary[1])
        finally:
            client.close()
        raise EmbeddedRedisError(f"slot {slot} is not served")

    def migrate_slot(self, slot: int, target: int, batch: int = 10, pause_s: float = 0.0) -> int:
        """Move `slot` to the primary at port `target` while it serves; returns how many keys moved.

        The standard steps: the target IMPORTING, the source MIGRATING (from then on a command for a
        key the source no longer has is answered ASK, and one naming keys on both sides TRYAGAIN),
        MIGRATE of the keys in batches of `batch` (with `pause_s` between batches, as a large slot
        takes time) until the source has none, then SETSLOT NODE on every primary (MOVED afterwards).
        """
        source = self.owner(slot)
        if source == target:
            return 0
        source_id, target_id = self.node_id(source), self.node_id(target)
        src = redis.Redis(port=source, socket_timeout=10)
        dst = redis.Redis(port=target, socket_timeout=10)
        moved = 0
        try:
            dst.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", source_id)
            src.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", target_id)
            while keys := src.execute_command("CLUSTER", "GETKEYSINSLOT", slot, batch):
                src.execute_command("MIGRATE", "127.0.0.1", target, "", 0, 5000, "KEYS", *keys)
                moved += len(keys)
                if pause_s:
                    time.sleep(pause_s)
            # The target first, then the source, then the others (the order valkey-cli uses).
            for port in [target, source, *[p for p in self.primaries() if p not in (source, target)]]:
                admin = redis.Redis(port=port, socket_timeout=10)
                try:
                    admin.execute_command("CLUSTER", "SETSLOT", slot, "NODE", target_id)
                finally:
                    admin.close()
        finally:
            src.close()
            dst.close()
        return moved

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()
        self.nodes = []

    def __enter__(self) -> LocalCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
