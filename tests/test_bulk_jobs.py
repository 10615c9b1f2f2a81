"""Bulk document jobs through RQ (JSON serializer) against a real Redis and an echo worker."""

from __future__ import annotations

import json
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from rq import SimpleWorker
from rq.serializers import JSONSerializer

from producer.bulk import bulk_queue, enqueue_bulk, job_status, main, read_documents
from producer.wire.codec import decode_request
from producer.wire.keys import requests_stream


def echo_reply(document: str, max_tokens: int) -> str:
    """What the echo engine answers: the first max_tokens words of the last user message."""
    return " ".join(document.split()[:max_tokens])


@pytest.fixture()
def rq_conn(redis_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[redis.Redis]:
    # The job reads the service's Redis from the RQ worker's environment, as in production.
    monkeypatch.setenv("REDIS_URL", redis_url)
    conn = redis.Redis.from_url(redis_url)
    yield conn
    conn.close()


def run_queue(conn: redis.Redis, queue_name: str) -> None:
    worker = SimpleWorker([bulk_queue(conn, queue_name)], connection=conn, serializer=JSONSerializer)
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
    assert read_documents(str(docs_file)) == ["first document here", "second one"]
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
