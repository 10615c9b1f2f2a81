"""Every line a real gateway logs matches docs/logging.md: answers, refusals, a Redis outage and SIGTERM.

A private server, an echo worker and an open gateway (debug level, so the probes' lines are in, and a
1 s `LLM_SUBMIT_RETRY_S`, so a send to a dead Redis gives up fast). The gateway answers a completion,
a streamed one with usage, a 400, a 404 and the probes; then the worker and the server go away while
the gateway runs: a completion gets 503 with `Retry-After` and `/ready` 503. SIGTERM then stops the
gateway, exit 0, and each of its lines is checked against the page as `test_logging_schema` checks a
worker's.
"""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path

import httpx
import pytest
import redis
from gateway_process import private_stack
from test_logging_schema import check, documented

from producer.wire.codec import encode_event
from producer.wire.keys import reply_stream
from producer.wire.models import DoneEvent, Timings, Usage

pytestmark = pytest.mark.timeout(120)

ERROR_KEYS = {"message", "type", "param", "code"}
SEEN_AT_LEAST = {
    "gateway_started",
    "gateway_open_namespace",
    "gateway_request_done",
    "gateway_send_failed",
    "gateway_draining",
    "gateway_stopped",
}


def chat(text: str = "hello there", **fields: object) -> dict:
    return {"model": "echo", "messages": [{"role": "user", "content": text}], **fields}


def openai_error(response: httpx.Response, status: int, code: str) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == ERROR_KEYS, body
    assert body["error"]["code"] == code, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    return body["error"]


def sse_chunks(response: httpx.Response) -> list[dict | str]:
    """The `data:` payloads of an event stream: JSON chunks, then the `[DONE]` marker."""
    out: list[dict | str] = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            data = line.removeprefix("data: ")
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


def test_a_gateways_real_lines_match_the_page(tmp_path: Path) -> None:
    prefix = f"gwlog{uuid.uuid4().hex[:8]}"
    stack = private_stack(prefix, tmp_path, LLM_GATEWAY_LOG_LEVEL="debug", LLM_SUBMIT_RETRY_S="1")
    with stack as (server, worker, gateway):
        with httpx.Client(base_url=gateway.url, timeout=30) as http:
            whole = http.post("/v1/chat/completions", json=chat())
            assert whole.status_code == 200, whole.text
            assert whole.json()["choices"][0]["message"]["content"] == "hello there"

            body = chat(stream=True, stream_options={"include_usage": True})
            with http.stream("POST", "/v1/chat/completions", json=body) as streamed:
                assert streamed.status_code == 200
                chunks = sse_chunks(streamed)
            assert chunks[-1] == "[DONE]"
            usage = chunks[-2]  # include_usage: a last chunk with no choices
            assert isinstance(usage, dict) and usage["choices"] == []
            assert usage["usage"]["completion_tokens"] == 2

            # A forged final in the request's reply stream, ahead of the worker's: skipped, and logged
            # by the client library as one more JSON line of the gateway's.
            forged = DoneEvent(
                id="someone-else", text="FORGED", finish_reason="stop",
                usage=Usage(prompt_tokens=1, completion_tokens=1), attempt="evil",
                timings=Timings(queue_ms=0, ttft_ms=0, tpot_ms=0, total_ms=0, worker="evil"),
            )  # fmt: skip
            reply_key = reply_stream("forged-reply", prefix)
            with redis.Redis.from_url(server.url) as r:
                r.xadd(reply_key, encode_event(forged, "msgpack", reply_key, None))  # type: ignore[arg-type]
            real = http.post("/v1/chat/completions", json=chat(), headers={"X-Request-Id": "forged-reply"})
            assert real.status_code == 200, real.text
            assert real.json()["choices"][0]["message"]["content"] == "hello there"

            openai_error(http.post("/v1/chat/completions", json=chat(bogus=1)), 400, "unknown_parameter")
            openai_error(http.get("/v1/no-such-route"), 404, "not_found")
            bad_id = http.post("/v1/chat/completions", json=chat(), headers={"X-Request-Id": "no spaces"})
            openai_error(bad_id, 400, "invalid_value")
            missing = chat()
            missing["model"] = "no-such-model"
            openai_error(http.post("/v1/chat/completions", json=missing), 404, "model_not_found")
            assert http.get("/health").status_code == 200
            assert http.get("/ready").status_code == 200

            assert worker.stop() == 0
            server.stop()
            started = time.monotonic()
            refused = http.post("/v1/chat/completions", json=chat("anyone there"))
            took_s = time.monotonic() - started
            error = openai_error(refused, 503, "service_unavailable")
            assert error["type"] == "api_error" and error["param"] is None
            assert refused.headers["retry-after"] == "1"
            assert took_s < 15, f"the 503 took {took_s:.1f} s"
            not_ready = http.get("/ready")
            openai_error(not_ready, 503, "not_ready")
            assert not_ready.headers["retry-after"] == "1"
        assert gateway.stop() == 0, gateway.output()[-3000:]

    raw = [line for line in gateway.log_path.read_text().splitlines() if line.strip()]
    assert raw and all(line.startswith("{") for line in raw), "stdout holds a line that is not JSON"
    lines = gateway.events()
    assert "Traceback" not in gateway.output()
    common, events = documented()
    problems = [p for line in lines for p in check(line, common, events)]
    assert not problems, "\n".join(sorted(set(problems)))
    seen = {line["event"] for line in lines}
    assert seen >= SEEN_AT_LEAST, SEEN_AT_LEAST - seen
    assert lines[-1]["event"] == "gateway_stopped"
    probes = [e for e in lines if e["event"] == "gateway_request_done" and e["path"] in ("/health", "/ready")]
    assert probes and {e["level"] for e in probes} == {"debug"}
    done = {e["status"]: e for e in lines if e["event"] == "gateway_request_done" and e["method"] == "POST"}
    assert {200, 400, 404, 503} <= set(done)
    assert done[404]["error"] == "model_not_found" and done[503]["error"] == "service_unavailable"
    errors = {(e["path"], e["status"], e.get("error")) for e in lines if e["event"] == "gateway_request_done"}
    assert ("/v1/no-such-route", 404, "not_found") in errors
    assert ("/v1/chat/completions", 400, "invalid_value") in errors  # the malformed X-Request-Id
    rejected = [e for e in lines if e["event"] == "reply_event_rejected"]
    assert [(e["id"], e["reason"], e["level"]) for e in rejected] == [("forged-reply", "wrong_id", "warning")]
    streamed_done = [e for e in lines if e["event"] == "gateway_request_done" and e.get("stream")]
    assert streamed_done and streamed_done[0]["completion_chars"] > 0
