"""A job's resumable state in Redis: its results and outstanding requests, written as they change."""

from __future__ import annotations

import json
import time
from typing import Any

import redis
from rq.job import Job

from producer.bulk.settings import BulkSettings

STATE_KEY_PREFIX = "llm-bulk:job:"


class JobState:
    """A job's results and outstanding requests in Redis, written as they change (what makes it resumable).

    `<prefix><job>:results`: document index -> its result (JSON); `<prefix><job>:inflight`:
    document index -> {"request_id", "submitted_at"} of the request sent for it and not yet
    answered; `<prefix><job>:cancel`: set by `cancel`. Every key expires `ttl_s` after its last write.
    `<prefix><job>:lock`: the run lock (run_lock.RunLock), which expires on a TTL of its own.
    """

    def __init__(self, connection: redis.Redis, job_id: str, ttl_s: int):
        self.redis = connection
        self.job_id = job_id
        self.ttl_s = ttl_s
        base = f"{STATE_KEY_PREFIX}{job_id}"
        self.results_key = f"{base}:results"
        self.inflight_key = f"{base}:inflight"
        self.cancel_key = f"{base}:cancel"
        self.lock_key = f"{base}:lock"

    def results(self) -> dict[int, dict[str, Any]]:
        raw = self.redis.hgetall(self.results_key)
        return {int(k): json.loads(v) for k, v in raw.items()}

    def answered(self) -> int:
        return int(self.redis.hlen(self.results_key))

    def in_flight(self) -> dict[int, dict[str, Any]]:
        raw = self.redis.hgetall(self.inflight_key)
        return {int(k): json.loads(v) for k, v in raw.items()}

    def sent(self, index: int, request_id: str) -> None:
        pipe = self.redis.pipeline(transaction=True)
        sent = {"request_id": request_id, "submitted_at": time.time()}
        pipe.hset(self.inflight_key, str(index), json.dumps(sent))
        pipe.expire(self.inflight_key, self.ttl_s)
        pipe.execute()

    def done(self, index: int, result: dict[str, Any]) -> None:
        pipe = self.redis.pipeline(transaction=True)
        pipe.hset(self.results_key, str(index), json.dumps(result, ensure_ascii=False))
        pipe.hdel(self.inflight_key, str(index))
        pipe.expire(self.results_key, self.ttl_s)
        pipe.execute()

    def forget_in_flight(self, index: int) -> None:
        self.redis.hdel(self.inflight_key, str(index))

    def cancel(self) -> None:
        self.redis.set(self.cancel_key, b"1", ex=self.ttl_s)

    def cancelled(self) -> bool:
        return bool(self.redis.exists(self.cancel_key))


def job_state(job: Job) -> JobState:
    return JobState(job.connection, job.id, int(job.kwargs.get("state_ttl_s") or BulkSettings().result_ttl_s))
