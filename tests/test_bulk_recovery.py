"""Bulk recovery: an RQ worker killed (SIGKILL) mid-job. `resume --force` works at once and after the job's
heartbeat lapsed (RQ's execution hashes expired, its registry entries not yet), and a restarted
`llm-bulk worker` runs the abandoned job again within its heartbeat TTL plus its maintenance interval;
the job resumes from its stored state (answered documents are never sent again)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_bulk_jobs import _ppid, kill_rq_worker, sent_indices, wait_for

from producer.bulk import JobState, bulk_queue, enqueue_bulk, job_status
from producer.bulk.run_lock import RunLock, RunLockLost

ROOT = Path(__file__).resolve().parents[1]
HEARTBEAT_TTL_S = 3
MAINTENANCE_INTERVAL_S = 1



def env_for(redis_url: str, prefix: str) -> dict[str, str]:
    return {**os.environ, "REDIS_URL": redis_url, "LLM_PREFIX": prefix, "PYTHONPATH": str(ROOT),
            "PYTHONUNBUFFERED": "1", "LLM_BULK_HEARTBEAT_TTL_S": str(HEARTBEAT_TTL_S),
            "LLM_BULK_MAINTENANCE_INTERVAL_S": str(MAINTENANCE_INTERVAL_S)}  # fmt: skip


def bulk_worker(redis_url: str, prefix: str, queue: str, log: Path, *, burst: bool
                ) -> subprocess.Popen[bytes]:
    """`llm-bulk worker` (BulkWorker) with the test's small heartbeat TTL and maintenance interval."""
    cmd = [sys.executable, "-m", "producer.bulk", "--queue", queue, "worker", *(["--burst"] if burst else [])]
    with open(log, "ab") as out:
        return subprocess.Popen(cmd, cwd=ROOT, env=env_for(redis_url, prefix), stdout=out,
                                stderr=subprocess.STDOUT)


def bulk_cli(redis_url: str, prefix: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "producer.bulk", *args], cwd=ROOT, text=True,
                          env=env_for(redis_url, prefix), capture_output=True, timeout=120, check=False)


@pytest.mark.parametrize("recovery", ["resume_at_once", "resume_after_heartbeat_lapsed", "restarted_worker"])
def test_killed_worker_job_is_recovered(recovery, redis_url, rq_conn, redis_client, prefix, start_worker,
                                        tmp_path: Path) -> None:
    # 4 tokens at 40 ms each, two requests in flight: the job is mid-way when its RQ worker is killed.
    worker = start_worker("echo", echo_token_delay_ms=40, trim_interval_s=3600)
    documents = [f"doc{i} one two three four five" for i in range(24)]
    queue = f"{prefix}-bulk"
    job = enqueue_bulk(documents, "Summarize.", connection=rq_conn, queue=queue, prefix=prefix,
                       max_in_flight=2, max_tokens=4, request_timeout_s=120)
    state = JobState(rq_conn, job.id, 3600)
    log = tmp_path / "rq.log"
    kill_worker_when = 6
    rq = bulk_worker(redis_url, prefix, queue, log, burst=True)
    wait_for(lambda: state.answered() >= kill_worker_when, 60, "documents answered")
    kill_rq_worker(rq)
    killed_at = time.monotonic()
    answered_before = set(state.results())
    in_flight_before = set(state.in_flight())
    assert kill_worker_when <= len(answered_before) < len(documents)
    assert job.get_status(refresh=True).value == "started"

    if recovery == "restarted_worker":
        # No command: a worker started right away finds the job abandoned once its heartbeat lapses.
        rq = bulk_worker(redis_url, prefix, queue, log, burst=False)
        try:
            wait_for(lambda: job.get_status(refresh=True).value != "started" or len(state.results()) > len(
                answered_before), HEARTBEAT_TTL_S + MAINTENANCE_INTERVAL_S + 10, "the job picked up again")
            picked_up_s = time.monotonic() - killed_at
            wait_for(lambda: job.get_status(refresh=True).value == "finished", 60, "the job finished")
        finally:
            rq.send_signal(signal.SIGTERM)
            assert rq.wait(timeout=20) == 0, log.read_text()
        # Within the TTL and one maintenance pass (and some slack for a loaded machine).
        assert picked_up_s < HEARTBEAT_TTL_S + MAINTENANCE_INTERVAL_S + 5
        assert "Moved to FailedJobRegistry" not in log.read_text()
    else:
        if recovery == "resume_after_heartbeat_lapsed":
            # The execution's hash expires with the heartbeat; its registry entries live on (RQ's own
            # `remove_executions` raised `Execution ... not found` here).
            execution_keys = lambda: rq_conn.keys(f"rq:execution:{job.id}:*")  # noqa: E731
            wait_for(lambda: not execution_keys(), HEARTBEAT_TTL_S + 5, "the execution hash expired")
            assert rq_conn.zcard(f"rq:executions:{job.id}") >= 1
        resumed = bulk_cli(redis_url, prefix, "--queue", queue, "resume", job.id, "--force")
        assert resumed.returncode == 0, resumed.stderr
        assert "Traceback" not in resumed.stderr
        assert f"job {job.id} queued again; it resumes with" in resumed.stderr
        assert job.get_status(refresh=True).value == "queued"
        # Resuming again is harmless: the job is already queued.
        again = bulk_cli(redis_url, prefix, "--queue", queue, "resume", job.id, "--force")
        assert again.returncode == 0 and "already queued" in again.stderr, again.stderr
        rq = bulk_worker(redis_url, prefix, queue, log, burst=True)
        assert rq.wait(timeout=120) == 0, log.read_text()

    status = job_status(job.id, rq_conn)
    assert status["status"] == "finished", status
    result = status["result"]
    assert (result["total"], result["succeeded"], result["failed"], result["unanswered"]) == (24, 24, 0, 0)
    assert [r["text"] for r in result["results"]] == [" ".join(d.split()[:4]) for d in documents]
    sent = sent_indices(redis_client, prefix)
    assert set(sent) == set(range(len(documents)))
    # Answered before the kill: never sent again; in flight at the kill: waited for, not sent again.
    assert all(sent[i] == 1 for i in answered_before | in_flight_before), sent
    assert sum(sent.values()) <= len(documents) + 1, sent
    assert len(worker.events("request_done")) == sum(sent.values())


def test_resume_without_force_waits_for_the_heartbeat(redis_url, rq_conn, prefix, start_worker,
                                                      tmp_path: Path) -> None:
    # While the killed worker's heartbeat is live, plain `resume` refuses (the worker might be alive)
    # and says what to do; once it lapsed, plain `resume` runs the job again too.
    start_worker("echo", echo_token_delay_ms=40)
    queue = f"{prefix}-bulk"
    job = enqueue_bulk([f"d{i} a b c d" for i in range(20)], connection=rq_conn, queue=queue, prefix=prefix,
                       max_in_flight=1, max_tokens=4, request_timeout_s=120)
    state = JobState(rq_conn, job.id, 3600)
    rq = bulk_worker(redis_url, prefix, queue, tmp_path / "rq.log", burst=True)
    wait_for(lambda: state.answered() >= 2, 60, "documents answered")
    kill_rq_worker(rq)
    refused = bulk_cli(redis_url, prefix, "--queue", queue, "resume", job.id)
    assert refused.returncode == 1 and "--force" in refused.stderr and "Traceback" not in refused.stderr
    time.sleep(HEARTBEAT_TTL_S + 0.5)
    resumed = bulk_cli(redis_url, prefix, "--queue", queue, "resume", job.id)
    assert resumed.returncode == 0, resumed.stderr
    assert job.get_status(refresh=True).value == "queued"


# -- one run at a time: the run lock ----------------------------------------------------------------------
def test_run_lock_waits_for_a_live_holder_and_takes_over_a_dead_one(redis_client, prefix) -> None:
    key = f"{prefix}:lock"
    lock = RunLock(redis_client, key, "job", ttl_s=1)
    ours = json.loads(lock.token)
    # Held by a live run (this process): the lock is not taken; the waiter stops when told to.
    redis_client.set(key, json.dumps({**ours, "nonce": "other"}), px=60_000)
    began = time.monotonic()
    assert not lock.acquire(stop=lambda: time.monotonic() - began > 1.2)
    assert json.loads(redis_client.get(key))["nonce"] == "other"
    # Held by a run of another machine: taken once its lease expires.
    redis_client.set(key, json.dumps({**ours, "host": "elsewhere", "machine": "other/boot"}), px=1500)
    began = time.monotonic()
    assert lock.acquire(stop=lambda: False)
    assert 1.0 <= time.monotonic() - began < 4 and redis_client.get(key) == lock.token.encode()
    # Held by a run of this machine whose process is gone: taken at once.
    dead = subprocess.Popen(["true"])
    dead.wait()
    redis_client.set(key, json.dumps({**ours, "pid": dead.pid, "nonce": "dead"}), px=60_000)
    began = time.monotonic()
    assert lock.acquire(stop=lambda: False)
    assert time.monotonic() - began < 0.5 and redis_client.get(key) == lock.token.encode()
    # Renewed while kept: it outlives its TTL; once another run holds it, `keep` says so.
    deadline = time.monotonic() + 2.5
    while time.monotonic() < deadline:
        lock.keep()
        time.sleep(0.1)
    assert redis_client.get(key) == lock.token.encode() and redis_client.pttl(key) > 0
    redis_client.set(key, json.dumps({**ours, "nonce": "thief"}), px=60_000)
    time.sleep(lock.renew_every_s)
    with pytest.raises(RunLockLost):
        lock.keep()
    lock.release()  # not ours: left alone
    assert json.loads(redis_client.get(key))["nonce"] == "thief"


@pytest.mark.parametrize("holder", ["finishes", "killed"])
def test_two_runs_of_one_job_never_send_at_once(holder, redis_url, rq_conn, redis_client, prefix,
                                                start_worker, tmp_path: Path) -> None:
    # Two RQ workers get the same job at once (as after RQ retried a job whose live worker missed its
    # heartbeat): one run sends, the other waits for it, sending nothing, and takes over if it dies.
    worker = start_worker("echo", echo_token_delay_ms=40, trim_interval_s=3600)
    documents = [f"doc{i} one two three four five" for i in range(20)]
    queue = f"{prefix}-bulk"
    logs = [tmp_path / "rq-a.log", tmp_path / "rq-b.log"]
    rqs = [bulk_worker(redis_url, prefix, queue, log, burst=False) for log in logs]
    wait_for(lambda: all("Listening on" in log.read_text() for log in logs), 60, "both RQ workers listening")
    job = enqueue_bulk(documents, "Summarize.", connection=rq_conn, queue=queue, prefix=prefix,
                       max_in_flight=2, max_tokens=4, request_timeout_s=120)
    bulk_queue(rq_conn, queue).enqueue_job(job)  # the same job again, for the other worker
    state = JobState(rq_conn, job.id, 3600)
    waiting = "another run of this job holds its run lock"
    wait_for(lambda: any(waiting in log.read_text() for log in logs), 30, "the second run waiting")
    sent_before: set[int] = set()
    if holder == "killed":
        wait_for(lambda: state.answered() >= 4, 60, "documents answered")
        horse = json.loads(rq_conn.get(state.lock_key))["pid"]
        holding = next(rq for rq in rqs if _ppid(Path(f"/proc/{horse}")) == rq.pid)
        kill_rq_worker(holding)
        sent_before = set(state.results()) | set(state.in_flight())
    wait_for(lambda: job.get_status(refresh=True).value == "finished", 60, "the job finished")
    for rq in rqs:
        if rq.poll() is None:
            rq.send_signal(signal.SIGTERM)  # a warm shutdown: the run in progress ends first
            assert rq.wait(timeout=30) == 0, [log.read_text() for log in logs]

    status = job_status(job.id, rq_conn)
    assert status["status"] == "finished", status
    result = status["result"]
    assert (result["total"], result["succeeded"], result["failed"], result["unanswered"]) == (20, 20, 0, 0)
    assert [r["text"] for r in result["results"]] == [" ".join(d.split()[:4]) for d in documents]
    texts = [log.read_text() for log in logs]
    assert sum(waiting in text for text in texts) == 1, texts
    took = "(its process is gone)" if holder == "killed" else "(it ended or its lease expired)"
    assert any(took in text for text in texts), texts
    sent = sent_indices(redis_client, prefix)
    assert set(sent) == set(range(len(documents)))
    if holder == "finishes":
        assert all(n == 1 for n in sent.values()), sent  # one run sent them all
    else:
        # Answered or in flight at the kill: never sent again (only a kill between a request's XADD and
        # its bookkeeping could send one document twice).
        assert all(sent[i] == 1 for i in sent_before), sent
        assert sum(sent.values()) <= len(documents) + 1, sent
    assert len(worker.events("request_done")) == sum(sent.values())
    assert rq_conn.exists(state.lock_key) == 0  # released by the run that ended the job
