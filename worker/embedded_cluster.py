"""A local Redis Cluster for tests and benchmarks: packaged valkey-server nodes on loopback ports.

`LocalCluster(masters=3, replicas=0)` starts `masters * (1 + replicas)` nodes with
`--cluster-enabled yes`, joins them with `valkey-cli --cluster create ... --cluster-yes`
(`--cluster-replicas` when asked), and waits until every node reports `cluster_state:ok`.
`url` names the first node; the cluster client discovers the others. `kill(port)` stops one
node at once (SIGKILL), the way a crashed primary goes, and `wait_promoted` waits until its
replica serves its slots.
"""

from __future__ import annotations

import random
import shutil
import socket
import subprocess
import time
from pathlib import Path

import redis

from worker.embedded_redis import EmbeddedRedis, EmbeddedRedisError, listening, server_binary


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

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()
        self.nodes = []

    def __enter__(self) -> LocalCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
