"""The gateway's `/metrics` (docs/metrics.md, "Gateway") against real gateway processes.

A gateway of this module's own, on the shared echo deployment's prefix, so its counters hold only
this module's requests: completions through the official `openai` client are counted exactly (requests,
durations, time to first token of the streamed ones only) and agree with the `gateway_request_done`
lines; refusals are counted by their error code; hostile paths, methods, headers and bodies land in
bounded labels; `llm_gateway_ready` follows `/ready` through a Redis outage; and a real Prometheus
server scrapes it and answers PromQL over it. The route labels and the closed set of error codes are
checked in process.
"""

from __future__ import annotations

import random
import re
import string
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from conftest import MAX_PROMPT_TOKENS, Deployment
from gateway_process import GatewayProcess, private_stack
from prometheus_client.parser import text_string_to_metric_families
from prometheus_server import PrometheusServer, binary

from producer.gateway.app import create_app
from producer.gateway.errors import _CODES, CODES, WIRE_ERRORS
from producer.gateway.metrics import OTHER, GatewayMetrics

pytestmark = pytest.mark.timeout(180)

ROOT = Path(__file__).resolve().parents[2]
CHAT = "/v1/chat/completions"
ROUTES = {CHAT, "/v1/completions", "/v1/models", "/v1/models/{model}", "/health", "/ready", "/metrics"}
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def ask(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def scrape(gw: GatewayProcess, accept: str | None = None) -> Samples:
    """Every sample of the gateway's /metrics, by name and labels."""
    headers = {"Accept": accept} if accept else {}
    response = httpx.get(f"{gw.url}/metrics", headers=headers, timeout=10)
    assert response.status_code == 200, response.text
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(response.text)
        for s in family.samples
    }


def settled(gw: GatewayProcess) -> Samples:
    """A scrape once no request is in flight (the scrape itself never is)."""
    deadline = time.monotonic() + 10
    while True:
        samples = scrape(gw)
        if value(samples, "llm_gateway_requests_in_flight") == 0 or time.monotonic() > deadline:
            return samples
        time.sleep(0.05)


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def delta(before: Samples, after: Samples, name: str, **labels: str) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


def gateway_series(samples: Samples) -> set[tuple[str, frozenset[tuple[str, str]]]]:
    return {key for key in samples if key[0].startswith("llm_gateway_")}


def label_values(samples: Samples, label: str) -> set[str]:
    return {v for name, labels in gateway_series(samples) for k, v in labels if k == label}


def done_lines(gw: GatewayProcess, ids: set[str]) -> dict[str, dict]:
    """The `gateway_request_done` lines of these request ids (waiting for them to be written)."""
    deadline = time.monotonic() + 10
    while True:
        lines = {e["request_id"]: e for e in gw.events("gateway_request_done") if e["request_id"] in ids}
        if len(lines) == len(ids) or time.monotonic() > deadline:
            return lines
        time.sleep(0.05)


@pytest.fixture(scope="module")
def gw(echo_deployment: Deployment, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    logs = tmp_path_factory.mktemp("metrics-gateway")
    with GatewayProcess(echo_deployment.redis_url, echo_deployment.prefix, logs) as gateway:
        gateway.wait_model("echo")
        yield gateway


@pytest.fixture(scope="module")
def client(gw: GatewayProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.v1, api_key="unused", max_retries=0)


def test_completions_are_counted_exactly_and_agree_with_the_log(
    gw: GatewayProcess, client: openai.OpenAI
) -> None:
    before = settled(gw)
    tag = uuid.uuid4().hex[:8]
    whole, streamed, text_streamed = set(), set(), set()
    for i in range(5):
        rid = f"m-{tag}-whole-{i}"
        r = client.chat.completions.create(
            model="echo", messages=ask(f"plain answer {i}"), extra_headers={"X-Request-Id": rid}
        )
        assert r.choices[0].message.content == f"plain answer {i}"
        whole.add(rid)
    for i in range(3):
        rid = f"m-{tag}-stream-{i}"
        chunks = list(
            client.chat.completions.create(
                model="echo", messages=ask(f"streamed answer {i}"), stream=True,
                stream_options={"include_usage": True} if i == 0 else None,
                extra_headers={"X-Request-Id": rid},
            )
        )  # fmt: skip
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == f"streamed answer {i}"
        streamed.add(rid)
    rid = f"m-{tag}-text-stream"
    pieces = list(
        client.completions.create(
            model="echo", prompt="a raw prompt", stream=True, extra_headers={"X-Request-Id": rid}
        )
    )
    assert "".join(p.choices[0].text for p in pieces if p.choices) == "a raw prompt"
    text_streamed.add(rid)
    after = settled(gw)

    n_chat = len(whole) + len(streamed)
    assert delta(before, after, "llm_gateway_requests_total", route=CHAT, status="200") == n_chat
    assert delta(before, after, "llm_gateway_request_duration_seconds_count", route=CHAT) == n_chat
    assert delta(before, after, "llm_gateway_requests_total", route="/v1/completions", status="200") == 1
    assert delta(before, after, "llm_gateway_request_duration_seconds_count", route="/v1/completions") == 1
    # Every request fell in some bucket: the +Inf bucket is the count.
    inf = delta(before, after, "llm_gateway_request_duration_seconds_bucket", route=CHAT, le="+Inf")
    assert inf == n_chat
    n_streamed = len(streamed) + len(text_streamed)
    assert delta(before, after, "llm_gateway_time_to_first_token_seconds_count") == n_streamed
    assert value(after, "llm_gateway_requests_in_flight") == 0
    errors = [k for k in gateway_series(after) if k[0] == "llm_gateway_errors_total"]
    assert all(after[k] == before.get(k) for k in errors)

    # The metrics are the log lines' values: `ms` for the durations, `first_token_ms` for the TTFT.
    lines = done_lines(gw, whole | streamed | text_streamed)
    assert set(lines) == whole | streamed | text_streamed
    assert {rid for rid, e in lines.items() if "first_token_ms" in e} == streamed | text_streamed
    for rid in streamed | text_streamed:
        line = lines[rid]
        assert line["stream"] is True and 0 < line["first_event_ms"] <= line["first_token_ms"] <= line["ms"]
    chat_s = sum(lines[rid]["ms"] for rid in whole | streamed) / 1000
    measured = delta(before, after, "llm_gateway_request_duration_seconds_sum", route=CHAT)
    assert measured == pytest.approx(chat_s, abs=0.001 * n_chat)
    ttft_s = sum(lines[rid]["first_token_ms"] for rid in streamed | text_streamed) / 1000
    measured = delta(before, after, "llm_gateway_time_to_first_token_seconds_sum")
    assert measured == pytest.approx(ttft_s, abs=0.001 * n_streamed)


def test_refusals_are_counted_by_error_code(gw: GatewayProcess, client: openai.OpenAI) -> None:
    before = settled(gw)
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model="echo", messages=ask("hi"), extra_body={"bogus": 1})
    assert bad.value.code == "unknown_parameter"
    with pytest.raises(openai.NotFoundError) as missing:
        client.chat.completions.create(model="no-such-model", messages=ask("hi"))
    assert missing.value.code == "model_not_found"
    # Refused by the worker before any output: its own status even when streamed, and no TTFT.
    too_long = ask("x" * (MAX_PROMPT_TOKENS + 10))
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model="echo", messages=too_long)
    assert refused.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model="echo", messages=too_long, stream=True)
    assert refused.value.code == "context_length_exceeded"
    with httpx.Client(base_url=gw.url, timeout=30) as http:
        assert http.post(CHAT, content=b"{not json").json()["error"]["code"] == "invalid_json"
        assert http.get("/v1/no-such-route").json()["error"]["code"] == "not_found"
        assert http.get(CHAT).json()["error"]["code"] == "method_not_allowed"
        bad_id = http.post(CHAT, json={"model": "echo"}, headers={"X-Request-Id": "no spaces allowed"})
        assert bad_id.json()["error"]["code"] == "invalid_value"
    after = settled(gw)

    errors = {
        code: delta(before, after, "llm_gateway_errors_total", code=code)
        for code in label_values(after, "code")
    }
    assert {c: n for c, n in errors.items() if n} == {
        "unknown_parameter": 1,
        "model_not_found": 1,
        "context_length_exceeded": 2,
        "invalid_json": 1,
        "not_found": 1,
        "method_not_allowed": 1,
        "invalid_value": 1,
    }
    answered = {
        (dict(labels)["route"], dict(labels)["status"]): after[(name, labels)] - before.get((name, labels), 0)
        for name, labels in gateway_series(after)
        if name == "llm_gateway_requests_total" and "/metrics" not in dict(labels).values()
    }
    assert {k: n for k, n in answered.items() if n} == {
        (CHAT, "400"): 5,
        (CHAT, "404"): 1,
        (CHAT, "405"): 1,
        (OTHER, "404"): 1,
    }
    assert delta(before, after, "llm_gateway_time_to_first_token_seconds_count") == 0
    assert value(after, "llm_gateway_requests_in_flight") == 0


def test_the_exposition_formats_and_the_process_collectors(gw: GatewayProcess) -> None:
    plain = httpx.get(f"{gw.url}/metrics", timeout=10)
    assert plain.status_code == 200
    assert plain.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    assert plain.headers["x-request-id"]
    assert "# TYPE llm_gateway_request_duration_seconds histogram" in plain.text
    assert "# TYPE llm_gateway_requests_in_flight gauge" in plain.text

    accept = "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5,*/*;q=0.1"
    om = httpx.get(f"{gw.url}/metrics", headers={"Accept": accept}, timeout=10)
    assert om.status_code == 200
    assert om.headers["content-type"].startswith("application/openmetrics-text; version=1.0.0")
    assert om.text.endswith("# EOF\n")
    # A version that is no version (prometheus-client itself would raise on it): the default format.
    for junk in (
        "text/plain;version=abc",
        "application/openmetrics-text;version=x.y",
        ";;==;,text/plain;version=",
    ):
        odd = httpx.get(f"{gw.url}/metrics", headers={"Accept": junk}, timeout=10)
        assert odd.status_code == 200 and odd.headers["content-type"].startswith("text/plain; version=0.0.4")

    samples = scrape(gw)
    names = {name for name, _ in samples}
    assert {"process_cpu_seconds_total", "process_resident_memory_bytes", "python_info"} <= names
    assert any(name.startswith("python_gc_") for name in names)
    assert value(samples, "llm_gateway_ready") == 1
    # The scrapes are counted under their route, and are not in flight while they run.
    assert value(samples, "llm_gateway_requests_total", route="/metrics", status="200") >= 5
    assert value(samples, "llm_gateway_requests_in_flight") == 0
    again = scrape(gw)
    assert delta(samples, again, "llm_gateway_requests_total", route="/metrics", status="200") == 1


def junk_requests(seed: int, n: int) -> Iterator[tuple[str, str, dict[str, bytes], bytes | None]]:
    """`n` hostile requests: random paths (huge ones, encoded ones, under /v1/models/), methods, request
    id headers and bodies."""
    rng = random.Random(seed)
    chars = string.ascii_letters + string.digits + "-._~!$&'()*+,;=:@/"
    methods = ["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD", "PROPFIND", "PURGE", "BREW"]
    for i in range(n):
        word = "".join(rng.choice(chars) for _ in range(rng.randint(1, 60)))
        path = [
            f"/{word}",
            f"/v1/{word}",
            f"/v1/models/{word}",
            f"/{'a' * rng.randint(2000, 12000)}/{word}",
            f"/%ff%fe/..%2f..%2f{word}/\u00e9\u6f22/%00",
            f"{CHAT}/{word}",
        ][i % 6]
        headers: dict[str, bytes] = {}
        if rng.random() < 0.3:
            junk_id = [rng.choice(range(0x21, 0xFF)) for _ in range(rng.randint(1, 300))]
            headers["X-Request-Id"] = bytes(b for b in junk_id if b != 0x7F) or b"?"
        body = None
        if rng.random() < 0.3:
            body = bytes(rng.randrange(256) for _ in range(rng.randint(0, 500)))
        yield rng.choice(methods), path, headers, body


def test_hostile_requests_land_in_bounded_labels(gw: GatewayProcess) -> None:
    before = settled(gw)
    series: list[set] = []
    answered_by_app = 0
    with httpx.Client(base_url=gw.url, timeout=30) as http:
        for seed in (1, 2):
            for method, path, headers, body in junk_requests(seed, 200):
                try:
                    response = http.request(method, gw.url + path, headers=headers, content=body)
                except httpx.HTTPError:
                    continue  # refused by the HTTP server before the app: not the app's to count
                assert response.status_code < 500, (method, path, response.text)
                answered_by_app += "x-request-id" in response.headers
            # Junk bodies on the completion routes too: malformed, truncated, wrong types.
            for body in (b"\xff\xfe", b'{"model": "echo", "messages": [', b"[]", b'{"model": 1}', b"null"):
                response = http.post(CHAT, content=body)
                assert response.status_code == 400
                answered_by_app += 1
            series.append(gateway_series(settled(gw)))
    after = scrape(gw)

    assert label_values(after, "route") <= ROUTES | {OTHER}
    assert label_values(after, "code") <= CODES | {OTHER}
    assert all(re.fullmatch(r"[1-5]\d\d", s) for s in label_values(after, "status"))
    # The second 205 requests, as hostile as the first, added no series at all.
    assert series[1] == series[0], series[1] - series[0]
    counted = sum(
        after[key] - before.get(key, 0)
        for key in gateway_series(after)
        if key[0] == "llm_gateway_requests_total" and ("route", "/metrics") not in key[1]
    )
    assert counted == answered_by_app
    assert value(after, "llm_gateway_requests_in_flight") == 0
    assert value(after, "llm_gateway_ready") == 1
    assert "Traceback" not in gw.output()


def test_ready_follows_a_redis_outage(tmp_path: Path) -> None:
    prefix = f"gwmet{uuid.uuid4().hex[:8]}"
    with private_stack(prefix, tmp_path, LLM_SUBMIT_RETRY_S="1") as (server, worker, gateway):
        # Scraped before any probe: the gauge is what /ready would answer now.
        assert value(scrape(gateway), "llm_gateway_ready") == 1
        assert httpx.get(f"{gateway.url}/ready", timeout=10).status_code == 200

        assert worker.stop() == 0
        server.stop()
        assert value(scrape(gateway), "llm_gateway_ready") == 0
        not_ready = httpx.get(f"{gateway.url}/ready", timeout=10)
        assert not_ready.status_code == 503 and not_ready.json()["error"]["code"] == "not_ready"
        refused = httpx.post(
            f"{gateway.v1}/chat/completions", json={"model": "echo", "messages": ask("anyone")}, timeout=30
        )
        assert refused.status_code == 503
        samples = scrape(gateway)
        assert value(samples, "llm_gateway_ready") == 0
        assert value(samples, "llm_gateway_errors_total", code="not_ready") == 1
        assert value(samples, "llm_gateway_errors_total", code="service_unavailable") == 1
        assert value(samples, "llm_gateway_requests_total", route="/ready", status="503") == 1
        assert value(samples, "llm_gateway_requests_total", route=CHAT, status="503") == 1
        assert value(samples, "llm_gateway_requests_in_flight") == 0
        assert gateway.stop() == 0


@pytest.mark.skipif(binary("prometheus") is None, reason="prometheus is not installed (make install)")
def test_a_prometheus_server_scrapes_the_gateway(echo_deployment: Deployment, tmp_path: Path) -> None:
    n, streamed = 6, 2
    with (
        GatewayProcess(echo_deployment.redis_url, echo_deployment.prefix, tmp_path) as gateway,
        PrometheusServer([f"127.0.0.1:{gateway.port}"], job="llm-gateway") as prom,
    ):
        client = openai.OpenAI(base_url=gateway.v1, api_key="unused", max_retries=0)
        gateway.wait_model("echo")
        prom.wait_for('up{job="llm-gateway"}', lambda v: v == 1)
        chat_requests = f'sum(llm_gateway_requests_total{{route="{CHAT}"}})'

        def complete(i: int) -> None:
            text = f"scraped answer {i}"
            if i < streamed:
                chunks = client.chat.completions.create(model="echo", messages=ask(text), stream=True)
                assert "".join(c.choices[0].delta.content or "" for c in chunks) == text
            else:
                reply = client.chat.completions.create(model="echo", messages=ask(text))
                assert reply.choices[0].message.content == text

        # One first, seen by a scrape, so the rates below have an increase to work with.
        complete(0)
        prom.wait_for(chat_requests, lambda v: v == 1)
        for i in range(1, n):
            complete(i)
        prom.wait_for(chat_requests, lambda v: v == n)
        prom.wait_for("sum(llm_gateway_time_to_first_token_seconds_count)", lambda v: v == streamed)
        assert prom.value(f'llm_gateway_requests_total{{route="{CHAT}", status="200"}}') == n
        assert prom.value('llm_gateway_ready{job="llm-gateway"}') == 1
        assert prom.value("llm_gateway_requests_in_flight") == 0

        p50 = prom.wait_for(
            "histogram_quantile(0.5, sum by (le) (rate("
            f'llm_gateway_request_duration_seconds_bucket{{route="{CHAT}"}}[1m])))',
            lambda v: v is not None and v == v,  # a number, not NaN
        )
        assert p50 is not None and 0 < p50 < 10
        ttft = prom.value(
            "histogram_quantile(0.99, sum by (le) (llm_gateway_time_to_first_token_seconds_bucket))"
        )
        assert ttft is not None and 0 < ttft < 10


def test_route_labels_are_the_route_templates() -> None:
    app = create_app()
    metrics: GatewayMetrics = app.state.metrics
    assert metrics.route(CHAT) == CHAT
    assert metrics.route("/v1/completions") == "/v1/completions"
    assert metrics.route("/v1/models") == "/v1/models"
    assert metrics.route("/v1/models/echo") == "/v1/models/{model}"
    assert metrics.route("/v1/models/org/name-7b") == "/v1/models/{model}"
    assert {metrics.route(p) for p in ("/health", "/ready", "/metrics")} == {"/health", "/ready", "/metrics"}
    for unknown in ("/", "", "/v1", "/v1/chat/completions/", "/V1/models", "/metrics/x", "/" + "x" * 100000):
        assert metrics.route(unknown) == OTHER
    # Another app in the same process has a registry of its own: no clash, nothing shared.
    other = create_app().state.metrics
    assert other.registry is not metrics.registry
    metrics.done(CHAT, 200, 0.01, None, metrics.begin(CHAT))
    ok = {"route": CHAT, "status": "200"}
    assert other.registry.get_sample_value("llm_gateway_requests_total", ok) is None
    assert metrics.registry.get_sample_value("llm_gateway_requests_total", ok) == 1
    metrics.done(CHAT, 400, 0.01, "a code nobody wrote", False)
    assert metrics.registry.get_sample_value("llm_gateway_errors_total", {"code": OTHER}) == 1


def test_every_error_code_the_gateway_answers_is_a_known_label() -> None:
    """`errors.CODES` bounds `llm_gateway_errors_total{code}`: every code in the package must be in it."""
    source = "\n".join(p.read_text() for p in (ROOT / "producer" / "gateway").glob("*.py"))
    literal = set(re.findall(r'code="(\w+)"', source))
    assert literal and literal <= CODES, literal - CODES
    assert {name for _, _, name in WIRE_ERRORS.values()} <= CODES
    assert set(_CODES.values()) | {"invalid_value", "invalid_type"} <= CODES
    table = (ROOT / "docs" / "openai.md").read_text().split("## Errors", 1)[1].split("\n## ", 1)[0]
    documented = {c for row in table.splitlines() if row.startswith("| 4") or row.startswith("| 5")
                  for c in re.findall(r"`(\w+)`", row.split("|")[3])}  # fmt: skip
    assert documented and documented <= CODES, documented - CODES
    assert OTHER not in CODES
