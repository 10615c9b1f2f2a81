"""A bulk job trusts only the workers' answer to the entry it sent, as the client's own reads do.

A document's reply stream is a plain Redis key: whoever may write it could append a `done` with made-up
text. The job checks each entry with the client's `check_event` (signature where the deployment signs,
well-formed, the document's request id, `rd` naming the entry the job sent): anything else is skipped
with a `reply_event_rejected` line, and the document keeps waiting for the worker's answer. A final
that names another entry sent under the same id (`rd`) ends that document with `invalid_request`,
never with that final's text.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
import redis
from test_bulk_jobs import echo_reply, run_queue, sent_indices, wait_for
from test_reply_trust import KEY, forge, forged_done

from producer.bulk import JobState, enqueue_bulk, job_status
from producer.logs import CLIENT_LOGGER
from producer.wire.codec import decode_request
from producer.wire.keys import StreamNames, requests_stream
from producer.wire.models import ErrorCode
from producer.wire.request_digest import entry_digest

pytestmark = pytest.mark.timeout(120)

DOCUMENTS = ["alpha beta gamma delta", "epsilon zeta eta", "theta iota kappa lambda"]


class Rejected(logging.Handler):
    """Collects the (id, reason) of the client library's `reply_event_rejected` records."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.seen: list[tuple[str, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage() == "reply_event_rejected":
            self.seen.append((record.id, record.reason))  # type: ignore[attr-defined]


@pytest.fixture()
def rejected() -> Iterator[Rejected]:
    logger = logging.getLogger(CLIENT_LOGGER)
    handler = Rejected()
    logger.addHandler(handler)
    yield handler
    logger.removeHandler(handler)


def digest_of(redis_client: redis.Redis, prefix: str, request_id: str) -> str:
    """The `rd` of the request entry sent under this id, as any reader of the requests stream can compute."""
    for _, fields in redis_client.xrange(requests_stream(prefix)):
        if decode_request(fields, prefix)[0].id == request_id:
            return entry_digest(fields)
    raise AssertionError(f"no request entry {request_id}")


@pytest.mark.parametrize("signed", [True, False], ids=["signed", "unsigned"])
def test_forged_replies_are_skipped_and_the_workers_answer_kept(
    signed, rq_conn, redis_client, prefix, start_worker, rejected, monkeypatch: pytest.MonkeyPatch
) -> None:
    if signed:
        monkeypatch.setenv("LLM_REPLY_SIGNING_KEY", KEY)
    else:
        monkeypatch.delenv("LLM_REPLY_SIGNING_KEY", raising=False)
    queue = f"{prefix}-bulk"
    # Enqueued while no chat worker runs: the forgeries are in the reply streams before any answer.
    job = enqueue_bulk(DOCUMENTS, "Summarize.", connection=rq_conn, queue=queue, prefix=prefix,
                       max_in_flight=3, max_tokens=8, request_timeout_s=30)  # fmt: skip
    state = JobState(rq_conn, job.id, 3600)
    names = StreamNames.for_prefix(prefix)
    forged: dict[int, str] = {}

    def forge_then_serve() -> None:
        try:
            wait_for(lambda: len(state.in_flight()) == len(DOCUMENTS), 15, "every document sent")
            ids = {i: sent["request_id"] for i, sent in state.in_flight().items()}
            forged.update(ids)
            key = names.reply(ids[0])
            done = forged_done(ids[0]).model_copy(update={"rd": digest_of(redis_client, prefix, ids[0])})
            if signed:
                forge(redis_client, key, done, None)  # the right id and `rd`, no signature
                forge(redis_client, key, done, b"w" * 32)  # signed with another key
            else:
                forge(redis_client, key, forged_done("someone-else"), None)  # another request's id
                redis_client.xadd(key, {"ct": "msgpack", "body": b"\xc1garbage"})  # malformed
                # Document 1: a final of another entry under its id: the id is answered for good.
                other = forged_done(ids[1]).model_copy(update={"rd": "0" * 32})
                forge(redis_client, names.reply(ids[1]), other, None)
        finally:
            start_worker("echo", **({"reply_signing_key": KEY} if signed else {}))

    with ThreadPoolExecutor(1) as pool:
        forger = pool.submit(forge_then_serve)
        run_queue(rq_conn, queue)  # the job, in this process: its client's log records are caplog's
        forger.result()

    status = job_status(job.id, rq_conn)
    assert status["status"] == "finished", status
    results = status["result"]["results"]
    assert all("FORGED" not in str(r) for r in results), results
    assert results[0]["ok"] and results[0]["text"] == echo_reply(DOCUMENTS[0], 8)
    assert results[2]["ok"] and results[2]["text"] == echo_reply(DOCUMENTS[2], 8)
    if signed:
        assert results[1]["ok"] and results[1]["text"] == echo_reply(DOCUMENTS[1], 8)
        expected = [(forged[0], "bad_signature"), (forged[0], "bad_signature")]
    else:
        assert (results[1]["ok"], results[1]["error"]["code"]) == (False, ErrorCode.INVALID_REQUEST.value)
        assert "another request sent with the same id" in results[1]["error"]["message"]
        expected = [(forged[0], "wrong_id"), (forged[0], "malformed"), (forged[1], "other_request")]
    assert sorted(rejected.seen) == sorted(expected)
    assert sent_indices(redis_client, prefix) == {0: 1, 1: 1, 2: 1}  # nothing sent twice
