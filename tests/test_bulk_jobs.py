"""Bulk document jobs through RQ (JSON serializer) against a real Redis and an echo worker."""

from __future__ import annotations

import collections
import json
import os
import signal
import subprocess
import sys
import time
import zlib
from pathlib import Path

import pytest
import redis
from rq import SimpleWorker
from rq.job import Job
from rq.registry import StartedJobRegistry
from rq.serializers import JSONSerializer

from producer.bulk import JobState, bulk_queue, enqueue_bulk, job_status, main, read_documents
from producer.bulk.worker import BulkWorker
from producer.wire.codec import decode_request
from producer.wire.keys import requests_stream

ROOT = Path(__file__).resolve().parents[1]
RQ = str(Path(sys.executable).parent / "rq")
# The stock RQ worker, as README and docs/operations.md give it (plus --burst: exit when idle).
RQ_WORKER = [RQ, "worker", "--url", "{REDIS_URL}", "--serializer", "rq.serializers.JSONSerializer",
             "llm-bulk"]


def echo_reply(document: str, max_tokens: int) -> str:
    """What the echo engine answers: the first max_tokens words of the last user message."""
    return " ".join(document.split()[:max_tokens])



class InProcessBulkWorker(SimpleWorker, BulkWorker):
    """`llm-bulk worker`'s BulkWorker, running jobs in this process (RQ's SimpleWorker)."""


def run_queue(conn: redis.Redis, queue_name: str) -> None:
    worker = InProcessBulkWorker([bulk_queue(conn, queue_name)], connection=conn, serializer=JSONSerializer)
    worker.work(burst=True)


def test_bulk_job_returns_echo_replies_in_document_order(rq_conn, prefix, start_worker) -> None:
    start_worker("echo", max_num_seqs=4)
    # Lengths vary so replies finish out of submission order; a window of 3 forces refills.
    documents = [" ".join(f"d{i}w{j}" for j in range(1 + (7 * i) % 11)) for i in range(12)]
    documents[5] = "ünïcödé text — with 🙂 emoji"
    queue = f"{prefix}-bulk"
    job = enqueue_bulk(documents, "Summarize.", connection=rq_conn, queue=queue, prefix=prefix,
                       max_in_flight=3, max_tokens=6, request_timeout_s=60)

    # Stored with the JSON serializer: the job's payload (zlib-compressed by RQ) is JSON, never a pickle.
    payload = rq_conn.hget(f"rq:job:{job.id}", "data")
    assert payload is not None
    assert json.loads(zlib.decompress(payload))[2] == [documents, "Summarize."]

    run_queue(rq_conn, queue)
    state = job_status(job.id, rq_conn)
    assert state["status"] == "finished", state
    result = state["result"]
    assert (result["total"], result["succeeded"], result["failed"]) == (12, 12, 0)
    assert [r["index"] for r in result["results"]] == list(range(12))
    assert [r["text"] for r in result["results"]] == [echo_reply(d, 6) for d in documents]
    for r, doc in zip(result["results"], documents, strict=True):
        assert r["finish_reason"] == ("length" if len(doc.split()) > 6 else "stop")
        assert r["usage"]["completion_tokens"] == min(len(doc.split()), 6)
    assert state["progress"] == {"total": 12, "finished": 12, "failed": 0, "in_flight": 0}
    assert state["counts"] == {"total": 12, "succeeded": 12, "failed": 0, "in_flight": 0, "unanswered": 0}
    assert result["unanswered"] == 0


def test_batch_priority_requests_and_per_document_errors(rq_conn, redis_client, prefix, start_worker) -> None:
    # The worker refuses prompts over 40 tokens (the echo engine counts UTF-8 bytes): that
    # document fails alone with the service's error code, the others succeed. No trimming,
    # so the request entries can be inspected afterwards.
    worker = start_worker("echo", max_prompt_tokens=40, trim_interval_s=3600)
    documents = ["short one", "x" * 200, "another short document"]
    queue = f"{prefix}-bulk"
    job = enqueue_bulk(documents, "Summarize.", connection=rq_conn, queue=queue, prefix=prefix, max_tokens=8,
                       request_timeout_s=60)
    run_queue(rq_conn, queue)

    result = job_status(job.id, rq_conn)["result"]
    assert (result["succeeded"], result["failed"]) == (2, 1)
    ok, too_long, ok2 = result["results"]
    assert (ok["text"], ok2["text"]) == ("short one", "another short document")
    assert (too_long["index"], too_long["ok"], too_long["error"]["code"]) == (1, False, "too_long")
    rejected = worker.events("request_rejected")
    assert [e["code"] for e in rejected] == ["too_long"]
    assert {e["tenant"] for e in worker.events("request_done")} == {"bulk"}
    sent = [decode_request(fields, prefix)[0] for _, fields in redis_client.xrange(requests_stream(prefix))]
    messages = [[(m.role, m.content) for m in r.messages or []] for r in sent]
    assert messages == [[("system", "Summarize."), ("user", doc)] for doc in documents]
    assert {(r.priority, r.stream) for r in sent} == {("batch", False)}
    assert [r.metadata for r in sent] == [{"bulk_job": job.id, "index": i} for i in range(3)]


def test_cli_submit_and_status(rq_conn, redis_url, prefix, start_worker, tmp_path: Path, capsys,
                               monkeypatch: pytest.MonkeyPatch) -> None:
    # The CLI takes the service's prefix from LLM_PREFIX, as a deployment sets it.
    monkeypatch.setenv("LLM_PREFIX", prefix)
    start_worker("echo")
    docs_file = tmp_path / "docs.jsonl"
    docs_file.write_text('"first document here"\n{"text": "second one"}\n', encoding="utf-8")
    parsed = read_documents(str(docs_file))
    assert (parsed.documents, parsed.ids) == (["first document here", "second one"], [1, 2])
    assert parsed.errors == []
    queue = f"{prefix}-bulk"

    args = ["--redis-url", redis_url, "--queue", queue]
    assert main([*args, "submit", str(docs_file), "--max-tokens", "2"]) == 0
    job_id = capsys.readouterr().out.strip()
    assert main([*args, "status", job_id, "--no-results"]) == 0
    assert json.loads(capsys.readouterr().out)["status"] == "queued"

    run_queue(rq_conn, queue)
    assert main([*args, "status", job_id]) == 0
    state = json.loads(capsys.readouterr().out)
    assert state["status"] == "finished"
    assert [r["text"] for r in state["result"]["results"]] == ["first document", "second one"]
    assert [r["id"] for r in state["result"]["results"]] == [1, 2]


def service_env(redis_url: str, prefix: str) -> dict[str, str]:
    """The environment of a bulk RQ worker or CLI in a deployment: the service's Redis and prefix."""
    return {**os.environ, "REDIS_URL": redis_url, "LLM_PREFIX": prefix, "PYTHONPATH": str(ROOT),
            "PYTHONUNBUFFERED": "1"}


def start_rq_worker(redis_url: str, prefix: str, queue: str, log_path: Path, *, burst: bool = True
                    ) -> subprocess.Popen[bytes]:
    """The documented `rq worker` command (queue name swapped for the test's) as a subprocess."""
    cmd = [a.replace("{REDIS_URL}", redis_url) for a in RQ_WORKER[:-1]] + [queue]
    cmd += ["--burst"] if burst else []
    with open(log_path, "ab") as log:
        return subprocess.Popen(cmd, cwd=ROOT, env=service_env(redis_url, prefix), stdout=log,
                                stderr=subprocess.STDOUT)


def stop_rq_worker(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM an idle stock RQ worker; SIGKILL it if it has not exited within 5 s. (Its warm shutdown joins
    redis-py's pubsub thread, which may sit in a 60 s wait first: RQ's `subscribe` uses sleep_time=60.)"""
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def kill_rq_worker(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL an RQ worker and its work horses (which RQ puts in process groups of their own)."""
    horses = [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit() and _ppid(p) == proc.pid]
    assert horses, "the RQ worker has no work horse"
    for pid in [*horses, proc.pid]:
        os.kill(pid, signal.SIGKILL)
    proc.wait()


def _ppid(proc_dir: Path) -> int | None:
    try:
        return int((proc_dir / "stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def bulk_cli(redis_url: str, prefix: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "producer.bulk", *args], cwd=ROOT, text=True,
                          env=service_env(redis_url, prefix), capture_output=True, timeout=120, check=False)


def sent_indices(redis_client: redis.Redis, prefix: str) -> collections.Counter[int]:
    """How often each document index was sent to the service (the requests stream, untrimmed)."""
    return collections.Counter(
        decode_request(fields, prefix)[0].metadata["index"]
        for _, fields in redis_client.xrange(requests_stream(prefix))
    )


def wait_for(predicate, timeout_s: float = 60.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.05)


def test_cli_job_runs_on_the_documented_stock_rq_worker(redis_url, redis_client, prefix, start_worker,
                                                        tmp_path: Path) -> None:
    # Submitted from `python -m producer.bulk` (so the module is __main__ there), run by the stock
    # `rq worker` with the JSON serializer, on the documented queue `llm-bulk`.
    for doc in ("README.md", "docs/operations.md"):
        assert " ".join(RQ_WORKER[1:]).replace("{REDIS_URL}", '"$REDIS_URL"') in (ROOT / doc).read_text()
    worker = start_worker("echo", trim_interval_s=3600)
    docs = tmp_path / "docs.jsonl"
    docs.write_text('{"id": "a", "text": "alpha beta gamma"}\n"delta epsilon"\n', encoding="utf-8")
    submitted = bulk_cli(redis_url, prefix, "submit", str(docs), "--max-tokens", "2")
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.strip()
    # Stored by import path, not as `__main__.run_bulk_job`.
    payload = redis_client.hget(f"rq:job:{job_id}", "data")
    assert payload is not None
    assert json.loads(zlib.decompress(payload))[0] == "producer.bulk.run_bulk_job"

    rq_log = tmp_path / "rq.log"
    rq = start_rq_worker(redis_url, prefix, "llm-bulk", rq_log)
    assert rq.wait(timeout=120) == 0, rq_log.read_text()
    assert "Invalid attribute name" not in rq_log.read_text()

    results = bulk_cli(redis_url, prefix, "results", job_id)
    assert results.returncode == 0, results.stderr
    lines = [json.loads(line) for line in results.stdout.splitlines()]
    assert [(r["id"], r["text"]) for r in lines] == [("a", "alpha beta"), (2, "delta epsilon")]
    assert len(worker.events("request_done")) == 2


@pytest.mark.parametrize("rerun", ["rq_retry", "resume"])
def test_killed_rq_worker_job_resumes_without_resending(rerun, redis_url, rq_conn, redis_client, prefix,
                                                        start_worker, tmp_path: Path) -> None:
    # Slow replies (4 tokens at 40 ms each, two requests in flight), so the job is mid-way when killed.
    worker = start_worker("echo", echo_token_delay_ms=40, trim_interval_s=3600)
    documents = [f"doc{i} one two three four five" for i in range(30)]
    queue = f"{prefix}-bulk"
    job = enqueue_bulk(documents, "Summarize.", connection=rq_conn, queue=queue, prefix=prefix,
                       max_in_flight=2, max_tokens=4, request_timeout_s=120)
    state = JobState(rq_conn, job.id, 3600)
    rq_log = tmp_path / "rq.log"
    rq = start_rq_worker(redis_url, prefix, queue, rq_log)
    wait_for(lambda: state.answered() >= 8, what="8 documents answered")
    kill_rq_worker(rq)  # the worker and its work horse, no cleanup
    answered_before = set(state.results())
    in_flight_before = {i: s["request_id"] for i, s in state.in_flight().items()}
    assert 8 <= len(answered_before) < 30
    assert job.get_status(refresh=True).value == "started"

    if rerun == "rq_retry":
        # What RQ does once the dead worker's heartbeat expires: retry the abandoned job (Retry(max=3)).
        StartedJobRegistry(queue, connection=rq_conn, serializer=JSONSerializer).cleanup(time.time() + 3600)
    else:
        refused = bulk_cli(redis_url, prefix, "--queue", queue, "resume", job.id)
        assert refused.returncode == 1 and "--force" in refused.stderr
        resumed = bulk_cli(redis_url, prefix, "--queue", queue, "resume", job.id, "--force")
        assert resumed.returncode == 0, resumed.stderr
    assert job.get_status(refresh=True).value == "queued"

    rq = start_rq_worker(redis_url, prefix, queue, rq_log)
    assert rq.wait(timeout=120) == 0, rq_log.read_text()
    state_after = job_status(job.id, rq_conn)
    assert state_after["status"] == "finished", state_after
    result = state_after["result"]
    assert (result["total"], result["succeeded"], result["failed"]) == (30, 30, 0)
    assert [r["text"] for r in result["results"]] == [" ".join(d.split()[:4]) for d in documents]
    assert [r["id"] for r in result["results"]] == list(range(1, 31))

    sent = sent_indices(redis_client, prefix)
    assert set(sent) == set(range(30))
    # Answered before the kill: never sent again. In flight at the kill: the rerun waited for
    # their replies instead of sending them again.
    assert all(sent[i] == 1 for i in answered_before | set(in_flight_before)), sent
    # Only a kill between a request's XADD and its bookkeeping could send one document twice.
    assert sum(sent.values()) <= 31, sent
    assert len(worker.events("request_done")) == sum(sent.values())


def test_bad_lines_are_reported_and_good_lines_run(redis_url, rq_conn, prefix, start_worker, tmp_path: Path,
                                                   capsys, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLM_PREFIX", prefix)
    start_worker("echo")
    docs = tmp_path / "docs.jsonl"
    docs.write_text(
        '{"id": "x1", "text": "first good"}\n'
        "\n"
        '{"text": "broken\n'                      # line 3: invalid JSON
        '{"id": "x1", "text": "dup id"}\n'        # line 4: repeated id
        '{"body": "no text"}\n'                   # line 5
        '"second good"\n'                         # line 6 (id 6)
        '{"id": [1], "text": "bad id"}\n'         # line 7
        '"   "\n',                                # line 8: empty
        encoding="utf-8",
    )
    queue = f"{prefix}-bulk"
    args = ["--redis-url", redis_url, "--queue", queue]

    # By default (and with --strict) the whole file is refused, with every bad line named and coded.
    for extra in ([], ["--strict"]):
        assert main([*args, "submit", str(docs), *extra]) == 2
        err = capsys.readouterr().err
        reported = [line.split(":")[1:3] for line in err.splitlines() if line.startswith(str(docs))]
        assert reported == [["3", " invalid_json"], ["4", " duplicate_id"], ["5", " invalid_document"],
                            ["7", " invalid_id"], ["8", " empty_document"]]
        assert "duplicate id 'x1' (first on line 1)" in err
        assert "5 bad lines; nothing submitted (--skip-invalid submits the other 2)" in err
    assert bulk_queue(rq_conn, queue).count == 0

    # --skip-invalid runs the good lines; --wait shows progress on stderr, stdout has only the result lines.
    rq_log = tmp_path / "rq.log"
    rq = start_rq_worker(redis_url, prefix, queue, rq_log, burst=False)
    try:
        assert main([*args, "submit", str(docs), "--skip-invalid", "--wait", "--max-tokens", "1"]) == 0
    finally:
        stop_rq_worker(rq)
    out, err = capsys.readouterr()
    assert "5 bad lines skipped; submitting the other 2 documents" in err
    assert "2 succeeded, 0 failed" in err
    rows = [json.loads(line) for line in out.splitlines()]
    assert [(r["index"], r["id"], r["text"]) for r in rows] == [(0, "x1", "first"), (1, 6, "second")]
    job_id = err.split("job ", 1)[1].split(":")[0]
    meta = Job.fetch(job_id, connection=rq_conn, serializer=JSONSerializer).meta
    assert [e["line"] for e in meta["input_errors"]] == [3, 4, 5, 7, 8]

    # --output: the same lines in the file, nothing on stdout.
    rq = start_rq_worker(redis_url, prefix, queue, rq_log, burst=False)
    out_file = tmp_path / "out.jsonl"
    try:
        assert main([*args, "submit", str(docs), "--skip-invalid", "--wait", "--max-tokens", "1",
                     "--output", str(out_file)]) == 0
    finally:
        stop_rq_worker(rq)
    out, err = capsys.readouterr()
    assert out == ""
    assert [json.loads(line)["id"] for line in out_file.read_text().splitlines()] == ["x1", 6]


def test_cancel_stops_the_job_and_its_requests(redis_url, rq_conn, redis_client, prefix, start_worker,
                                               tmp_path: Path, capsys) -> None:
    # 100 ms per token and 200 tokens: no document finishes before the cancel.
    worker = start_worker("echo", echo_token_delay_ms=100, trim_interval_s=3600)
    documents = [" ".join(f"w{j}" for j in range(300)) for _ in range(10)]
    queue = f"{prefix}-bulk"
    job = enqueue_bulk(documents, "Summarize.", connection=rq_conn, queue=queue, prefix=prefix,
                       max_in_flight=3, max_tokens=200, request_timeout_s=120)
    state = JobState(rq_conn, job.id, 3600)
    rq = start_rq_worker(redis_url, prefix, queue, tmp_path / "rq.log")
    wait_for(lambda: len(state.in_flight()) == 3, what="3 requests in flight")

    assert main(["--redis-url", redis_url, "--queue", queue, "cancel", job.id]) == 0
    cancelled = json.loads(capsys.readouterr().out)
    assert cancelled["status_before"] == "started"
    # The command waits for the running job to stop: RQ's own status says `canceled`, and the counts add up.
    assert cancelled["status"] == "canceled"
    assert cancelled["counts"] == {"total": 10, "succeeded": 0, "failed": 0, "in_flight": 0, "unanswered": 10}
    # This command or the job itself (it polls the flag) cancels each of the 3, whichever comes first;
    # that none had finished normally is checked in the chat worker's log below.
    assert cancelled["requests_cancelled"] + cancelled["requests_already_ended"] == 3
    assert rq.wait(timeout=150) == 0  # RQ's command channel may hold its exit up to 60 s at a time
    status = job_status(job.id, rq_conn)
    assert status["status"] == "canceled"
    assert job.get_status(refresh=True).value == "canceled"
    result = status["result"]
    assert result["cancelled"] is True
    assert (result["total"], result["succeeded"], result["failed"], result["unanswered"]) == (10, 0, 0, 10)
    # A cancelled job is not resumed.
    refused = bulk_cli(redis_url, prefix, "--queue", queue, "resume", job.id, "--force")
    assert refused.returncode == 1 and "cancelled" in refused.stderr
    assert sum(sent_indices(redis_client, prefix).values()) == 3  # nothing sent after the cancel
    # The chat worker stopped all three early (or skipped one it had not started yet).
    sent_ids = {decode_request(f, prefix)[0].id for _, f in redis_client.xrange(requests_stream(prefix))}

    def ended() -> set[str]:
        names = ("request_done", "request_cancelled", "request_already_answered")
        return {e["id"] for e in worker.events() if e.get("event") in names}

    wait_for(lambda: sent_ids <= ended(), what="the 3 requests ended in the worker")
    assert {e["finish_reason"] for e in worker.events("request_done")} <= {"cancelled"}


def test_rq_redis_url_defaults_to_the_service_and_bad_values_are_config_errors(
    monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    from producer.bulk.settings import rq_redis_url

    monkeypatch.setenv("REDIS_URL", "redis://service:6379/0")
    monkeypatch.delenv("LLM_REDIS_CLUSTER", raising=False)
    monkeypatch.delenv("LLM_BULK_RQ_REDIS_URL", raising=False)
    assert rq_redis_url() == "redis://service:6379/0"
    monkeypatch.setenv("LLM_BULK_RQ_REDIS_URL", "redis://rq:6379/1")
    assert rq_redis_url() == "redis://rq:6379/1"
    assert rq_redis_url("redis://given:6379/2") == "redis://given:6379/2"

    monkeypatch.setenv("LLM_BULK_RQ_REDIS_URL", "http://not-redis")
    assert main(["status", "some-job"]) == 2
    line = json.loads(capsys.readouterr().out)
    assert (line["event"], line["env"], line["value"]) == ("config_invalid", "LLM_BULK_RQ_REDIS_URL",
                                                           "http://not-redis")
    monkeypatch.delenv("LLM_BULK_RQ_REDIS_URL")
    assert main(["--rq-redis-url", "redis://u:secret@:x", "status", "some-job"]) == 2
    line = json.loads(capsys.readouterr().out)
    assert (line["env"], line["value"]) == ("--rq-redis-url", "redis://u:***@:x")
