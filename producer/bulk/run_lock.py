"""RunLock: at most one BulkRun of a job at a time, a lease in RQ's Redis that the run's loop renews.

RQ hands a job to one worker, yet one job can still have two live runs: `resume --force` while its
run is alive, or RQ's maintenance retrying a job whose heartbeat lapsed while its worker lived (a
stall, a partition from RQ's Redis). Both runs would send the documents nobody has sent yet, and
race on the stored state.

The lock is the key `JobState.lock_key`, set with SET NX PX to a token that names its holder (host,
pid). The run renews it from its loop every third of its TTL (`keep`), so it stands for "this run's
loop goes on", not only "its process lives"; renewing and releasing act only while the token is the
run's own (scripts). A run that finds the lock held waits (`acquire`), without reading or sending
anything: while the holder renews it, until the holder ends, after which the waiting run resumes
from the stored state (finding every document answered, it sends nothing and returns the job's
result); once a dead holder's lock expires, it takes over. A holder that died on this machine (the
same kernel and pid namespace, its process gone: `resume --force` after a crash) is taken over at
once. It waits rather than fails because RQ keeps one status per job, not per run: a second run that
raised would mark the job failed (and spend one of its retries) while the first still runs it, and
one that returned at once would mark it finished with part of its results.

A run that finds its lock gone (it stalled past the TTL and another run took over) raises
RunLockLost and stops without cancelling its requests: they are in the stored state, and the run
that holds the lock waits for their replies.

Its messages go to RQ's job logger (`rq.job`), beside the RQ worker's own lines about the job.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import redis

log = logging.getLogger("rq.job")

WAIT_POLL_S = 0.5  # how often a waiting run tries the lock

# Both act only while the lock holds the caller's token (ARGV[1]).
_RENEW = """
if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('pexpire', KEYS[1], ARGV[2]) end
return 0
"""
_RELEASE = """
if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end
return 0
"""
# Replaces a dead holder's token (ARGV[1]) with ours (ARGV[2]) unless it changed meanwhile.
_TAKE_OVER = """
if redis.call('get', KEYS[1]) == ARGV[1] then
  redis.call('set', KEYS[1], ARGV[2], 'px', ARGV[3])
  return 1
end
return 0
"""


class RunLockLost(Exception):
    """The run's lock expired and another run of the job holds it now: this run must stop."""


def _machine() -> str | None:
    """This kernel's boot id and this process's pid namespace: where a pid names the same process."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        return f"{boot}/{os.readlink('/proc/self/ns/pid')}"
    except OSError:
        return None


def _gone(pid: int) -> bool:
    """Whether no process here has this pid, or only a zombie (a killed process not reaped yet)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except (OSError, IndexError):
        return False


def _died_here(token: bytes) -> bool:
    """Whether a lock token names a process of this machine (kernel and pid namespace) that is gone."""
    try:
        holder = json.loads(token)
        return holder["machine"] is not None and holder["machine"] == _machine() and _gone(int(holder["pid"]))
    except (ValueError, TypeError, KeyError):
        return False


def describe(token: bytes) -> str:
    """A lock token as `host pid N` for messages (the raw token if it is not one of ours)."""
    try:
        holder = json.loads(token)
        return f"{holder['host']} pid {holder['pid']}"
    except (ValueError, TypeError, KeyError):
        return repr(token)[:80]


class RunLock:
    """One job's run lock (see the module docstring); `ttl_s` is how long it outlives a dead holder."""

    def __init__(self, connection: redis.Redis, key: str, job_id: str, ttl_s: float):
        self.redis = connection
        self.key = key
        self.job_id = job_id
        self.ttl_ms = max(1000, int(ttl_s * 1000))
        self.renew_every_s = self.ttl_ms / 3000
        self.token = json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "machine": _machine(),
                                 "nonce": uuid.uuid4().hex})  # fmt: skip
        self._renewed_at = 0.0
        self._renew = connection.register_script(_RENEW)
        self._release = connection.register_script(_RELEASE)
        self._take_over = connection.register_script(_TAKE_OVER)

    def acquire(self, stop: Callable[[], bool]) -> bool:
        """Take the lock, waiting while another run holds it; False (not taken) once `stop()` is true."""
        began, waiting_for = time.monotonic(), None
        while True:
            taken = bool(self.redis.set(self.key, self.token, nx=True, px=self.ttl_ms))
            holder = None if taken else self._holder()
            dead = False  # taken over from a holder that died here
            if holder is not None and _died_here(holder):
                dead = taken = bool(self._take_over(keys=[self.key], args=[holder, self.token, self.ttl_ms]))
            if taken:
                self._renewed_at = time.monotonic()
                previous = holder or waiting_for
                if previous is not None:
                    why = "its process is gone" if dead else "it ended or its lease expired"
                    log.warning("job %s: run lock taken from %s after %.1f s (%s)", self.job_id,
                                describe(previous), self._renewed_at - began, why)  # fmt: skip
                return True
            if stop():
                return False
            if holder is not None and holder != waiting_for:
                waiting_for = holder
                log.warning("job %s: another run of this job holds its run lock (%s); this run waits for "
                            "it to end, sending nothing", self.job_id, describe(holder))  # fmt: skip
            time.sleep(WAIT_POLL_S)

    def _holder(self) -> bytes | None:
        holder = self.redis.get(self.key)
        return holder if isinstance(holder, bytes) else None

    def keep(self) -> None:
        """Renew the lock once a third of its TTL has passed since the last renewal; RunLockLost if it is
        no longer this run's."""
        now = time.monotonic()
        if now - self._renewed_at < self.renew_every_s:
            return
        if not self._renew(keys=[self.key], args=[self.token, self.ttl_ms]):
            holder = self._holder()
            raise RunLockLost(
                f"job {self.job_id}: run lock lost after {now - self._renewed_at:.1f} s without renewal; "
                f"held by {describe(holder) if holder else 'nobody'} now"
            )
        self._renewed_at = now

    def release(self) -> None:
        """Drop the lock if it is still this run's (a waiting run takes it at its next try)."""
        self._release(keys=[self.key], args=[self.token])
