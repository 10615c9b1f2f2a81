"""The CLI (`python -m producer.bulk`, `llm-bulk`): submit, status, results, resume, cancel, worker."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import pydantic
import redis
from rq.exceptions import InvalidJobOperation, NoSuchJobError
from rq.job import Job, JobStatus
from rq.serializers import JSONSerializer

from producer.bulk.control import (
    ENDED,
    bulk_queue,
    cancel_job,
    enqueue_bulk,
    job_counts,
    job_status,
    resume_job,
    settle_cancelled,
)
from producer.bulk.documents import InputFile, read_documents
from producer.bulk.settings import (
    DEFAULT_INSTRUCTION,
    BulkConfigError,
    BulkSettings,
    rq_redis_url,
)
from producer.bulk.store import job_state
from producer.bulk.validate import check_document, request_params
from producer.bulk.worker import BulkWorker
from producer.config_errors import CONFIG_ERROR_EXIT, print_config_error, print_config_event, redact
from producer.settings import ProducerSettings

MAX_ERRORS_SHOWN = 50  # bad input lines listed on stderr
MAX_ERRORS_STORED = 1000  # bad input lines kept in a job's meta (`input_errors`)


def _rq_connection(args: argparse.Namespace) -> redis.Redis:
    """RQ's Redis: --rq-redis-url, LLM_BULK_RQ_REDIS_URL, else the service's (--redis-url, REDIS_URL)
    unless that is a cluster (BulkConfigError); pydantic's ValidationError for a bad setting."""
    producer = ProducerSettings(**({"redis_url": args.redis_url} if args.redis_url else {}))
    return redis.Redis.from_url(rq_redis_url(args.rq_redis_url, BulkSettings(), producer))


def _config_error(exc: Exception, args: argparse.Namespace) -> int:
    """A configuration error as the `config_invalid` line of `python -m producer` (exit 2)."""
    if isinstance(exc, pydantic.ValidationError):
        cls = BulkSettings if exc.title == BulkSettings.__name__ else ProducerSettings
        options = {"redis_url": "--redis-url"} if args.redis_url and cls is ProducerSettings else None
        print_config_error(exc, cls, options)
        return CONFIG_ERROR_EXIT
    if isinstance(exc, BulkConfigError):
        error = {"env": exc.env, "value": None, "expected": str(exc)}
    else:  # a bad --rq-redis-url
        error = {"env": "--rq-redis-url", "value": redact(str(args.rq_redis_url)), "expected": str(exc)}
    print_config_event({**error, "settings": BulkSettings.__name__, "errors": [error]})
    return CONFIG_ERROR_EXIT


def _fetch(job_id: str, conn: redis.Redis) -> Job | None:
    try:
        return Job.fetch(job_id, connection=conn, serializer=JSONSerializer)
    except NoSuchJobError:
        print(f"no job {job_id} (unknown, or its results expired)", file=sys.stderr)
        return None


def _wait(job: Job, *, show_progress: bool) -> JobStatus | None:
    """Wait for the job to end; a progress bar (answered documents) on stderr meanwhile."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    state = job_state(job)
    total = len(job.args[0]) if job.args else None
    columns = (TextColumn("[progress.description]{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn())  # fmt: skip
    console = Console(stderr=True)
    with Progress(*columns, console=console, disable=not show_progress, transient=False) as bar:
        task = bar.add_task(f"job {job.id}", total=total)
        while True:
            status = job.get_status(refresh=True)
            bar.update(task, completed=state.answered())
            if status in ENDED:
                return JobStatus.CANCELED if settle_cancelled(job) else status
            time.sleep(0.5)


def _write_results(job: Job, output: str | None) -> int:
    """The job's results stored so far, in document order, as JSON lines (stdout or `output`)."""
    results = [r for _, r in sorted(job_state(job).results().items())]
    lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in results)
    if output:
        Path(output).write_text(lines, encoding="utf-8")
    else:
        sys.stdout.write(lines)
        sys.stdout.flush()
    return len(results)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m producer.bulk", description="Bulk document jobs through RQ.")
    p.add_argument("--redis-url", help="the service's Redis (default: REDIS_URL or redis://127.0.0.1:6379/0)")
    p.add_argument("--rq-redis-url", help="RQ's Redis, never a cluster (default: LLM_BULK_RQ_REDIS_URL, else "
                   "the service's when LLM_REDIS_CLUSTER is off)")
    p.add_argument("--queue", help="RQ queue (default LLM_BULK_QUEUE or llm-bulk)")
    sub = p.add_subparsers(dest="command", required=True)
    submit = sub.add_parser("submit", help="enqueue a job for the documents in FILE (JSON lines or array)")
    submit.add_argument("file", help="path, or - for stdin")
    submit.add_argument("--instruction", default=DEFAULT_INSTRUCTION)
    submit.add_argument("--max-in-flight", type=int)
    submit.add_argument("--max-tokens", type=int)
    submit.add_argument("--temperature", type=float, default=0.0)
    submit.add_argument("--seed", type=int)
    submit.add_argument("--skip-invalid", action="store_true",
                        help="submit the good lines when some are bad (default: refuse the whole file)")
    submit.add_argument("--strict", action="store_true", help=argparse.SUPPRESS)  # the default now
    submit.add_argument("--max-errors", type=int, default=MAX_ERRORS_SHOWN,
                        help=f"bad lines listed on stderr at most (default {MAX_ERRORS_SHOWN})")
    submit.add_argument("--wait", action="store_true",
                        help="wait for the job (progress on stderr) and write its results as JSON lines")
    submit.add_argument("--output", help="with --wait: write the results to this file instead of stdout")
    submit.add_argument("--no-progress", action="store_true", help="with --wait: no progress bar")
    status = sub.add_parser("status", help="print a job's status (and results once finished) as JSON")
    status.add_argument("job_id")
    status.add_argument("--no-results", action="store_true", help="omit the per-document results")
    res = sub.add_parser("results", help="write a job's results stored so far as JSON lines")
    res.add_argument("job_id")
    res.add_argument("--output", help="write to this file instead of stdout")
    resume = sub.add_parser("resume", help="run a failed, stopped or abandoned job again, where it stopped")
    resume.add_argument("job_id")
    resume.add_argument("--force", action="store_true",
                        help="also a job still marked started (its RQ worker is dead)")
    cancel = sub.add_parser("cancel", help="stop a job and cancel its outstanding chat requests")
    cancel.add_argument("job_id")
    cancel.add_argument("--wait-s", type=float, default=30.0,
                        help="wait this long for a running job to stop (default 30; 0: do not wait)")
    work = sub.add_parser("worker", help="run an RQ worker for the bulk queue (JSON serializer)")
    work.add_argument("--burst", action="store_true", help="exit when the queue is empty")
    args = p.parse_args(argv)

    try:
        conn = _rq_connection(args)
    except ValueError as exc:  # pydantic's ValidationError, BulkConfigError, a bad --rq-redis-url
        return _config_error(exc, args)
    if args.command == "worker":
        try:
            worker = BulkWorker([bulk_queue(conn, args.queue)], connection=conn)
        except pydantic.ValidationError as exc:
            return _config_error(exc, args)
        worker.work(burst=args.burst)
        return 0
    if args.command == "submit":
        return _submit(args, conn)
    job = _fetch(args.job_id, conn)
    if job is None:
        return 1
    if args.command == "results":
        n = _write_results(job, args.output)
        print(f"{n} results", file=sys.stderr)
        return 0
    if args.command == "resume":
        before = job.get_status(refresh=True)
        try:
            job = resume_job(job.id, conn, force=args.force)
        except InvalidJobOperation as exc:
            print(f"cannot resume: {exc}", file=sys.stderr)
            return 1
        answered = job_state(job).answered()
        if before in (JobStatus.QUEUED, JobStatus.SCHEDULED, JobStatus.DEFERRED):
            print(f"job {job.id} is already {before.value}; it resumes with {answered} documents answered",
                  file=sys.stderr)  # fmt: skip
        else:
            print(f"job {job.id} queued again; it resumes with {answered} documents answered",
                  file=sys.stderr)  # fmt: skip
        return 0
    if args.command == "cancel":
        print(json.dumps(cancel_job(job.id, conn, redis_url=args.redis_url, wait_s=max(0.0, args.wait_s))))
        return 0
    state = job_status(args.job_id, conn, with_results=not args.no_results)
    print(json.dumps(state, indent=2, ensure_ascii=False))
    return 0 if state["status"] != "failed" else 1


def _check_requests(args: argparse.Namespace, parsed: InputFile) -> str | None:
    """Each document's request checked as a worker checks it (bad ones join `parsed.errors`); the reason the
    instruction or options alone make every request invalid, else None."""
    settings = BulkSettings()
    params = request_params(
        max_tokens=args.max_tokens or settings.max_tokens, temperature=args.temperature, seed=args.seed,
        tenant="bulk", request_timeout_s=settings.request_timeout_s,
    )  # fmt: skip
    content_type = ProducerSettings().content_type
    problem = check_document("x", args.instruction, params, content_type=content_type)
    if problem is not None:
        return f"{problem[0]}: {problem[1]}"
    bad: set[int] = set()
    for i, (document, line) in enumerate(zip(parsed.documents, parsed.lines, strict=True)):
        problem = check_document(document, args.instruction, params, content_type=content_type)
        if problem is not None:
            parsed.refuse(line, *problem)
            bad.add(i)
    parsed.drop(bad)
    parsed.errors.sort(key=lambda e: e["line"])
    return None


def _report_bad_lines(args: argparse.Namespace, parsed: InputFile) -> None:
    shown = parsed.errors[: max(0, args.max_errors)]
    for error in shown:
        print(f"{args.file}:{error['line']}: {error['code']}: {error['reason']}", file=sys.stderr)
    if len(parsed.errors) > len(shown):
        print(f"{args.file}: ... and {len(parsed.errors) - len(shown)} more bad lines", file=sys.stderr)


def _submit(args: argparse.Namespace, conn: redis.Redis) -> int:
    try:
        parsed = read_documents(args.file)
    except OSError as exc:
        print(f"cannot read {args.file}: {exc}", file=sys.stderr)
        return 2
    try:
        options_problem = _check_requests(args, parsed)
    except pydantic.ValidationError as exc:  # a bad LLM_* / LLM_BULK_* setting
        return _config_error(exc, args)
    if options_problem is not None:
        print(f"nothing submitted: the instruction or options make every request invalid: {options_problem}",
              file=sys.stderr)  # fmt: skip
        return 2
    _report_bad_lines(args, parsed)
    good, bad = len(parsed.documents), len(parsed.errors)
    if bad:
        if not args.skip_invalid or args.strict:
            hint = f" (--skip-invalid submits the other {good})" if good else ""
            print(f"{bad} bad lines; nothing submitted{hint}", file=sys.stderr)
            return 2
        if not good:
            print(f"{bad} bad lines and no good ones; nothing submitted", file=sys.stderr)
            return 2
        print(f"{bad} bad lines skipped; submitting the other {good} documents", file=sys.stderr)
    elif not good:
        print(f"{args.file}: no documents; nothing submitted", file=sys.stderr)
        return 2
    job = enqueue_bulk(
        parsed.documents,
        args.instruction,
        connection=conn,
        queue=args.queue,
        max_in_flight=args.max_in_flight,
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        seed=args.seed,
        ids=parsed.ids,
        input_errors=parsed.errors[:MAX_ERRORS_STORED],
    )
    if not args.wait:
        print(job.id)
        return 0
    print(f"job {job.id}: {len(parsed.documents)} documents", file=sys.stderr)
    try:
        ended = _wait(job, show_progress=not args.no_progress)
    except KeyboardInterrupt:
        print(f"\nstopped waiting; job {job.id} goes on (cancel: llm-bulk cancel {job.id})", file=sys.stderr)
        return 130
    n = _write_results(job, args.output)
    counts = job_counts(job)
    summary = f"{counts['succeeded']} succeeded, {counts['failed']} failed"
    if ended == JobStatus.FINISHED:
        print(f"job {job.id} finished: {summary}", file=sys.stderr)
        return 0
    if counts["unanswered"] or counts["in_flight"]:
        summary += f", {counts['unanswered'] + counts['in_flight']} unanswered"
    print(f"job {job.id} {ended.value if ended else 'ended'}: {summary}; {n} results stored", file=sys.stderr)
    return 1
