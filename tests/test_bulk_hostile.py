"""Hostile bulk input: every bad line costs only itself, at `submit` (a coded report, no traceback, nothing
enqueued unless --skip-invalid) and at run time (one document's error entry, the others answered)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from producer.bulk import bulk_queue, enqueue_bulk, job_status, main, parse_documents
from producer.bulk.documents import BOM, LineCode
from producer.bulk.validate import check_document, request_params
from producer.wire.models import ErrorCode

ROOT = Path(__file__).resolve().parents[1]
CODES = {c.value for c in LineCode} | {ErrorCode.INVALID_REQUEST.value, ErrorCode.TOO_LONG.value}
PARAMS = request_params(max_tokens=8, temperature=0.0, seed=None, tenant="bulk", request_timeout_s=60)

# One hostile line each (bytes, as a file holds them), and the code `submit` must report for it.
HOSTILE: list[tuple[str, bytes, str]] = [
    ("deep_array", b"[" * 100_000, "invalid_json"),
    ("deep_text", b'{"text": ' + b"[" * 50_000 + b"]" * 50_000 + b"}", "invalid_json"),
    ("deep_object", b'{"a":' * 20_000 + b"1" + b"}" * 20_000, "invalid_json"),
    ("huge_int_id", b'{"id": 1' + b"0" * 5000 + b', "text": "t"}', "invalid_json"),
    ("big_int_id", b'{"id": ' + b"9" * 100 + b', "text": "t"}', "invalid_id"),
    ("float_id", b'{"id": 1.5, "text": "t"}', "invalid_id"),
    ("bool_id", b'{"id": true, "text": "t"}', "invalid_id"),
    ("long_id", json.dumps({"id": "i" * 300, "text": "t"}).encode(), "invalid_id"),
    ("surrogate_id", b'{"id": "\\udc00", "text": "t"}', "invalid_id"),
    ("ten_mb_text", json.dumps("x" * 10_000_000).encode(), "too_long"),
    ("body_over_limit", json.dumps("\u00e9" * 200_000).encode(), "too_long"),
    ("lone_surrogate", b'"a \\ud800 b"', "invalid_text"),
    ("invalid_utf8", b'"caf\xe9 \xff"', "invalid_utf8"),
    ("text_number", b'{"text": 5}', "invalid_document"),
    ("text_list", b'{"text": ["a"]}', "invalid_document"),
    ("no_text", b'{"body": "b"}', "invalid_document"),
    ("number_line", b"42", "invalid_document"),
    ("null_line", b"null", "invalid_document"),
    ("array_line", b'["a", "b"]', "invalid_document"),
    ("blank_text", b'"  \\t "', "empty_document"),
    ("bom_mid_file", b'\xef\xbb\xbf"x"', "invalid_json"),
    ("broken_json", b'{"text": "unterminated', "invalid_json"),
    ("duplicate_id", b'{"id": "good", "text": "again"}', "duplicate_id"),
]



def write_lines(path: Path, *lines: bytes) -> Path:
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def reported(err: str, path: Path) -> list[tuple[int, str]]:
    """(line, code) of each `FILE:LINE: code: message` line of stderr."""
    out = []
    for line in err.splitlines():
        if line.startswith(f"{path}:") and not line.startswith(f"{path}: "):
            number, code = line[len(str(path)) + 1:].split(": ", 2)[:2]
            out.append((int(number), code))
    return out


@pytest.mark.parametrize(("shape", "line", "code"), HOSTILE, ids=[h[0] for h in HOSTILE])
def test_submit_reports_each_hostile_line_and_refuses_the_file(shape, line, code, rq_conn, redis_url, prefix,
                                                               tmp_path: Path, capsys) -> None:
    docs = write_lines(tmp_path / "docs.jsonl", b'{"id": "good", "text": "a good document"}', line, b'"last"')
    queue = f"{prefix}-bulk"
    args = ["--redis-url", redis_url, "--queue", queue]
    assert main([*args, "submit", str(docs)]) == 2
    err = capsys.readouterr().err
    assert reported(err, docs) == [(2, code)], err
    assert len(err) < 2000  # the report never echoes the line
    assert bulk_queue(rq_conn, queue).count == 0

    # --skip-invalid submits the other two documents, and keeps the refused line in the job's meta.
    assert main([*args, "submit", str(docs), "--skip-invalid"]) == 0
    out, err = capsys.readouterr()
    assert "1 bad lines skipped; submitting the other 2 documents" in err
    job = bulk_queue(rq_conn, queue).jobs[0]
    assert job.args[0] == ["a good document", "last"]
    assert job.kwargs["ids"] == ["good", 3]
    assert [(e["line"], e["code"]) for e in job.meta["input_errors"]] == [(2, code)]
    assert out.strip() == job.id


def test_a_file_of_hostile_lines_through_the_cli_process(redis_url, prefix, tmp_path: Path) -> None:
    # The real command line: every bad line listed in order with its code (capped by --max-errors),
    # no traceback, exit 2; a BOM at the start of the file and blank lines are fine.
    lines = [b'\xef\xbb\xbf{"id": "good", "text": "first"}', b"", b"   "] + [h[1] for h in HOSTILE]
    docs = write_lines(tmp_path / "docs.jsonl", *lines)
    env = {**os.environ, "REDIS_URL": redis_url, "LLM_PREFIX": prefix, "PYTHONPATH": str(ROOT)}

    def submit(*extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "producer.bulk", "--queue", f"{prefix}-bulk", "submit",
                               str(docs), *extra], cwd=ROOT, env=env, text=True, capture_output=True,
                              timeout=120, check=False)  # fmt: skip

    done = submit()
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    expected = [(4 + i, h[2]) for i, h in enumerate(HOSTILE)]
    assert reported(done.stderr, docs) == expected
    assert f"{len(HOSTILE)} bad lines; nothing submitted (--skip-invalid submits the other 1)" in done.stderr

    capped = submit("--max-errors", "3")
    assert reported(capped.stderr, docs) == expected[:3]
    assert f"{docs}: ... and {len(HOSTILE) - 3} more bad lines" in capped.stderr

    skipped = submit("--skip-invalid")
    assert skipped.returncode == 0, skipped.stderr
    assert "Traceback" not in skipped.stderr
    assert len(skipped.stdout.strip()) > 0  # the job id


def test_instruction_or_options_that_break_every_request_are_refused(redis_url, prefix, tmp_path: Path,
                                                                     capsys) -> None:
    docs = write_lines(tmp_path / "docs.jsonl", b'"fine"')
    args = ["--redis-url", redis_url, "--queue", f"{prefix}-bulk", "submit", str(docs)]
    assert main([*args, "--max-tokens", "100000"]) == 2
    assert "invalid_request: max_tokens" in capsys.readouterr().err
    assert main([*args, "--instruction", "bad \udcff instruction"]) == 2
    assert "invalid_request" in capsys.readouterr().err
    assert main([*args, "--instruction", "i" * 300_000]) == 2
    assert "too_long" in capsys.readouterr().err


# Any line at all (bytes, JSON values, surrogates): parsing never raises, and each non-blank line is
# either a document or one error with a known code.
_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from(["text", "id", "x"]), inner),
    max_leaves=8,
)
_line = st.one_of(
    st.binary(max_size=40).map(lambda b: b.replace(b"\n", b" ")),
    _json_values.map(lambda v: json.dumps(v).encode()),
    st.sampled_from([h[1][:2000] for h in HOSTILE]),
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_line, min_size=1, max_size=8))
def test_any_line_is_a_document_or_one_coded_error(lines: list[bytes]) -> None:
    parsed = parse_documents(b"\n".join(lines))
    nonblank = [n for n, line in enumerate(lines, 1) if line.strip(b" \t\r\x0b\x0c")]
    error_lines = [e["line"] for e in parsed.errors]
    assert {e["code"] for e in parsed.errors} <= CODES
    assert len(set(error_lines)) == len(error_lines)
    assert not set(error_lines) & set(parsed.lines)
    raw = b"\n".join(lines).removeprefix(BOM)
    if not raw.lstrip().startswith(b"["):  # a file that is one JSON array numbers its items instead
        assert set(parsed.lines) | set(error_lines) <= set(nonblank)
    for text in parsed.documents:
        text.encode("utf-8")


_hostile_text = st.text(st.one_of(st.characters(), st.integers(0xD800, 0xDFFF).map(chr)), max_size=50)


@settings(max_examples=200, deadline=None)
@given(document=_hostile_text, instruction=_hostile_text, repeat=st.sampled_from([1, 70_000]))
def test_any_document_is_accepted_or_refused_with_a_code(document: str, instruction: str, repeat: int
                                                         ) -> None:
    problem = check_document(document * repeat, instruction or "x", PARAMS)
    if problem is not None:
        code, message = problem
        assert code in (ErrorCode.INVALID_REQUEST.value, ErrorCode.TOO_LONG.value)
        assert len(message) <= 300


def test_enqueue_refuses_ids_that_cannot_name_a_document(rq_conn) -> None:
    for ids in ([1, True], [1, 2**64], ["a", ""], ["a", "\udc00"], [1, 1.5]):
        with pytest.raises(ValueError):
            enqueue_bulk(["a", "b"], connection=rq_conn, queue="never-run", ids=ids)  # type: ignore[arg-type]


def test_one_bad_document_fails_alone_at_run_time(rq_conn, redis_url, prefix, start_worker, tmp_path: Path
                                                  ) -> None:
    # Documents past submit's checks (enqueue_bulk takes any strings): each one the client cannot send, or
    # the worker refuses, gets its own error entry; the job finishes and answers all the others.
    worker = start_worker("echo", max_prompt_tokens=60)
    documents = [
        "first good",
        "x" * 300_000,                 # over the contract's body limit: refused by the client, too_long
        "lone \ud800 surrogate",      # cannot be encoded: invalid_request
        "second good",
        "y " * 100,                    # over the worker's prompt-token limit: the worker's too_long
        "third good",
    ]  # fmt: skip
    queue = f"{prefix}-bulk"
    job = enqueue_bulk(documents, "Summarize.", connection=rq_conn, queue=queue, prefix=prefix, max_tokens=4,
                       request_timeout_s=60)
    env = {**os.environ, "REDIS_URL": redis_url, "LLM_PREFIX": prefix, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-m", "producer.bulk", "--queue", queue, "worker", "--burst"],
                          cwd=ROOT, env=env, text=True, capture_output=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr

    state = job_status(job.id, rq_conn)
    assert state["status"] == "finished", state
    result = state["result"]
    assert (result["total"], result["succeeded"], result["failed"], result["unanswered"]) == (6, 3, 3, 0)
    by_index = {r["index"]: r for r in result["results"]}
    assert [by_index[i]["text"] for i in (0, 3, 5)] == ["first good", "second good", "third good"]
    assert [(by_index[i]["ok"], by_index[i]["error"]["code"]) for i in (1, 2, 4)] == [
        (False, "too_long"), (False, "invalid_request"), (False, "too_long")]
    assert [e["code"] for e in worker.events("request_rejected")] == ["too_long"]
    assert state["counts"] == {"total": 6, "succeeded": 3, "failed": 3, "in_flight": 0, "unanswered": 0}
