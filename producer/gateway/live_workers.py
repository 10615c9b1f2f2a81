"""Which workers are alive and which models they serve, from the workers' stats stream `<prefix>:stats`.

Every worker appends one record to `<prefix>:stats` each `LLM_STATS_INTERVAL_S` (docs/logging.md,
`worker_stats`): flat string fields, among them `worker` (its consumer name) and, from workers that
report it, `engine` and `model`. The gateway reads the stream's recent end (`XREVRANGE`, entries
younger than `worker_liveness_s`, by the entry ids' millisecond clock) every `stats_refresh_s` and
keeps each worker's newest record. Entry ids carry the Redis server's clock and the window is taken on
the gateway's: the two must agree to well within the window. A worker is live while that record is
younger than the window.

The model a worker serves is its record's `model`; an echo worker (`model` `none`) serves `echo`
(its engine's name); a record without `model` (workers older than that field) counts as serving
`LLM_GATEWAY_DEFAULT_MODEL`. While no live worker is known (none started yet, or stats off), the
gateway accepts requests for the default model only: they wait in the request stream for a worker,
bounded by their timeout.

The gateway reads the stream with its own connection (`REDIS_URL`): with tenants that user needs
`+xrevrange %R~<prefix>:stats` and `+ping` (docs/openai.md); tenants' users cannot read it.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import redis
import redis.asyncio as aioredis
import structlog

from producer.wire.redis_types import range_entries

log = structlog.get_logger("producer.gateway")

MAX_STATS_ENTRIES_READ = 5000
# Entries dated at most this far past the clock count (the workers' own allowance, `worker/observability/
# live_stats.FUTURE_ALLOWANCE_MS`): hosts' clocks differ by a little, never by more.
FUTURE_SKEW_MS = 5_000


@dataclass(frozen=True)
class WorkerInfo:
    worker: str
    model: str
    engine: str | None
    seen_ms: int  # the entry id's time of its newest record


def model_of(fields: dict[bytes, bytes], default_model: str) -> str:
    model = fields.get(b"model", b"").decode("utf-8", "replace")
    if model == "none":
        return fields.get(b"engine", b"echo").decode("utf-8", "replace") or "echo"
    return model or default_model


class WorkerDirectory:
    """The live workers and their models, refreshed in the background from `<prefix>:stats`."""

    def __init__(
        self,
        client: aioredis.Redis,
        stats_key: str,
        *,
        liveness_s: float,
        refresh_s: float,
        default_model: str,
    ):
        self.redis = client
        self.stats_key = stats_key
        self.liveness_ms = int(liveness_s * 1000)
        self.refresh_s = refresh_s
        self.default_model = default_model
        self._workers: dict[str, WorkerInfo] = {}
        self._first_seen: dict[str, int] = {}  # model -> first time (s) it was seen live
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self.readable: bool | None = None  # whether the last read succeeded (None: not tried yet)
        self.last_error: str | None = None

    async def refresh(self) -> None:
        """Read the records of the liveness window; keep the newest of each worker."""
        now_ms = int(time.time() * 1000)
        since = now_ms - self.liveness_ms
        try:
            # Up to now (plus the workers' clock-skew allowance), not "+": an entry dated in the future
            # would count as a live worker until it ages out, and hide the real records behind it.
            entries = range_entries(
                await self.redis.xrevrange(
                    self.stats_key, f"{now_ms + FUTURE_SKEW_MS}-0", f"{max(since, 0)}-0",
                    count=MAX_STATS_ENTRIES_READ,
                )
            )  # fmt: skip
        except redis.RedisError as exc:
            error = f"{type(exc).__name__}: {exc}"[:200]
            if self.readable is not False or error != self.last_error:
                log.warning("gateway_stats_unreadable", key=self.stats_key, error=error)
            self.readable, self.last_error = False, error
            return
        if self.readable is False:
            log.info("gateway_stats_readable", key=self.stats_key)
        self.readable, self.last_error = True, None
        workers: dict[str, WorkerInfo] = {}
        for entry_id, fields in entries:  # newest first
            name = fields.get(b"worker", b"").decode("utf-8", "replace")
            if not name or name in workers:
                continue
            seen_ms = int(entry_id.split(b"-", 1)[0])
            engine = fields.get(b"engine")
            workers[name] = WorkerInfo(
                name,
                model_of(fields, self.default_model),
                None if engine is None else engine.decode("utf-8", "replace"),
                seen_ms,
            )
        self._workers = workers
        now_s = int(time.time())
        for info in workers.values():
            self._first_seen.setdefault(info.model, now_s)

    def live(self) -> list[WorkerInfo]:
        cutoff = int(time.time() * 1000) - self.liveness_ms
        return [w for w in self._workers.values() if w.seen_ms >= cutoff]

    def models(self) -> dict[str, list[WorkerInfo]]:
        """Each model some live worker serves, with those workers."""
        out: dict[str, list[WorkerInfo]] = {}
        for info in self.live():
            out.setdefault(info.model, []).append(info)
        return out

    def first_seen(self, model: str) -> int:
        return self._first_seen.get(model, int(time.time()))

    def accepts(self, model: str) -> bool:
        """Whether a request for `model` is taken: a live worker serves it, or none is live and it is
        the default model."""
        models = self.models()
        return model in models if models else model == self.default_model

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop())

    async def _loop(self) -> None:
        while not self._stopping:
            await asyncio.sleep(self.refresh_s)
            if not self._stopping:
                await self.refresh()

    async def aclose(self) -> None:
        """Stop refreshing. The flag, not only the cancel: a cancel that lands inside a Redis call may be
        taken by the client library as a failed call, and the loop would go on."""
        self._stopping = True
        if self._task is not None:
            self._task.cancel()
            await asyncio.wait([self._task], timeout=2.0)
