"""A short headless Locust run of `loadtest/locustfile.py`, with its CSV and HTML report (`make loadtest`).

    python loadtest/run_locust.py                                 # 20 s, 4 users, local echo worker
    python loadtest/run_locust.py --run-time 1m --users 16 -- --llm-max-tokens 32 --llm-stream false
    REDIS_URL=redis://:PASSWORD@127.0.0.1:6379/0 LLM_PREFIX=llm \\
        python loadtest/run_locust.py --no-worker --users 50 --spawn-rate 5 --run-time 5m

By default it starts what it measures: a private Redis-compatible server (the packaged one,
on a free port) unless `REDIS_URL` is set, and one `python -m worker --engine echo` on a key
prefix of its own (`loadtest-<random>`), so a run never serves or disturbs other traffic on
the same Redis. `--no-worker` measures whatever serves `REDIS_URL` and `LLM_PREFIX` instead
(a deployment). Arguments after `--` go to Locust unchanged (the locustfile's workload options,
listed by `--help`).

The report goes to `--report-dir` (default `build/report/`): `locust_stats.csv` (requests: the
chats), `locust_latency.csv` (the `ttft` and `tpot` samples, which are not requests),
`locust_stats_history.csv`, `locust_failures.csv`, `locust_exceptions.csv`, `locust.html` (the
latency table at its end) and, with a local worker, `worker.log`. Both tables are printed at the
end. The exit status is Locust's: 1 if any request failed.
"""

from __future__ import annotations

import argparse
import csv
import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script: `producer` and `worker` from this checkout

from loadtest.worker_launch import spawn_worker, wait_started  # noqa: E402

LOCUSTFILE = ROOT / "loadtest" / "locustfile.py"


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    locust_args: list[str] = []
    if "--" in argv:
        at = argv.index("--")
        argv, locust_args = argv[:at], argv[at + 1 :]
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, add_help=False
    )
    parser.add_argument("-h", "--help", action="store_true", help="Show this help and the workload options.")
    parser.add_argument("-u", "--users", type=int, default=4, help="Peak concurrent users (default 4).")
    parser.add_argument(
        "-r", "--spawn-rate", type=float, default=4, help="Users started per second (default 4)."
    )
    parser.add_argument(
        "-t", "--run-time", default="20s", help="Run time, Locust syntax: 20s, 5m (default 20s)."
    )
    parser.add_argument(
        "--report-dir",
        type=Path,
        default=ROOT / "build" / "report",
        help="Where the CSV and HTML report go (default build/report).",
    )
    parser.add_argument(
        "--no-worker",
        action="store_true",
        help="Start no worker: load what serves REDIS_URL and LLM_PREFIX (a deployment).",
    )
    parser.add_argument(
        "--prefix",
        default=None,
        help="Key prefix of the local worker (default loadtest-<random>); with --no-worker, "
        "LLM_PREFIX or llm.",
    )
    parser.add_argument("--worker-start-timeout-s", type=float, default=60.0)
    args = parser.parse_args(argv)
    if args.help:
        parser.print_help()
        print()
        print(workload_help())
        sys.exit(0)
    return args, locust_args


def workload_help() -> str:
    """The locustfile's own options (Locust's `--help` is printed before a locustfile is loaded)."""
    import locust  # noqa: F401 - gevent's monkey patching first, as under the locust command
    from locust import events
    from locust.argument_parser import get_empty_argument_parser

    parser = get_empty_argument_parser(add_help=False)
    sys.path.insert(0, str(LOCUSTFILE.parent))
    __import__("locustfile")  # registers its init_command_line_parser listener
    events.init_command_line_parser.fire(parser=parser)
    text = parser.format_help()
    start, end = text.find("llm-stream-serve workload"), text.find("\nExamples:")
    own = text[max(start, 0) : end if end > start else len(text)].rstrip()
    return "Locust options of loadtest/locustfile.py (pass them after --):\n  " + own


def start_worker(redis_url: str, prefix: str, log_path: Path, timeout_s: float) -> subprocess.Popen[bytes]:
    proc = spawn_worker(redis_url, prefix, {"engine": "echo"}, log_path)
    wait_started([proc], [log_path], timeout_s)
    return proc


def stop(proc: subprocess.Popen[bytes], timeout_s: float = 30.0) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def run_locust(args: argparse.Namespace, locust_args: list[str], redis_url: str | None, prefix: str) -> int:
    out = args.report_dir
    cmd = [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless",
           "-u", str(args.users), "-r", str(args.spawn_rate), "-t", args.run_time,
           "--stop-timeout", "10", "--only-summary",
           "--csv", str(out / "locust"), "--csv-full-history", "--html", str(out / "locust.html"),
           "--llm-prefix", prefix, *locust_args]  # fmt: skip
    env = dict(os.environ)
    if redis_url:
        env["REDIS_URL"] = redis_url
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    print("+", " ".join(cmd), flush=True)
    return subprocess.call(cmd, cwd=ROOT, env=env)


def summary(report_dir: Path) -> str:
    """The requests (`locust_stats.csv`) and, apart, the latency samples (`locust_latency.csv`)."""
    with open(report_dir / "locust_stats.csv", newline="") as f:
        rows = {row["Name"]: row for row in csv.DictReader(f)}
    lines = [f"{'requests':<12}{'count':>10}{'failures':>10}{'req/s':>9}{'median ms':>11}{'p99 ms':>9}"]
    for name, row in rows.items():
        lines.append(
            f"{name:<12}{row['Request Count']:>10}{row['Failure Count']:>10}"
            f"{float(row['Requests/s'] or 0):>9.2f}"
            f"{float(row['Median Response Time'] or 0):>11.1f}{float(row['99%'] or 0):>9.1f}"
        )
    latency = report_dir / "locust_latency.csv"
    if latency.exists():
        with open(latency, newline="") as f:
            samples = list(csv.DictReader(f))
        if samples:
            lines += ["", f"{'latency':<12}{'samples':>10}{'median ms':>11}{'p95 ms':>9}{'p99 ms':>9}"]
            lines += [
                f"{row['Name']:<12}{row['Sample Count']:>10}{float(row['Median (ms)']):>11.1f}"
                f"{float(row['95% (ms)']):>9.1f}{float(row['99% (ms)']):>9.1f}"
                for row in samples
            ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args, locust_args = parse_args(sys.argv[1:] if argv is None else argv)
    args.report_dir.mkdir(parents=True, exist_ok=True)
    redis_url = os.environ.get("REDIS_URL") or os.environ.get("LLM_REDIS_URL")
    if args.no_worker:
        prefix = args.prefix or os.environ.get("LLM_PREFIX") or "llm"
        code = run_locust(args, locust_args, redis_url, prefix)
    else:
        from worker.local_redis.server import EmbeddedRedis

        prefix = args.prefix or f"loadtest-{uuid.uuid4().hex[:8]}"
        server = None if redis_url else EmbeddedRedis().start()
        try:
            url = redis_url or server.url  # type: ignore[union-attr]
            worker = start_worker(url, prefix, args.report_dir / "worker.log", args.worker_start_timeout_s)
            try:
                code = run_locust(args, locust_args, url, prefix)
            finally:
                stop(worker)
        finally:
            if server is not None:
                server.stop()
    stats = args.report_dir / "locust_stats.csv"
    if stats.exists():
        print(summary(args.report_dir))
    print(f"report: {args.report_dir / 'locust.html'} (CSV: {args.report_dir}/locust_*.csv)")
    return code


if __name__ == "__main__":
    sys.exit(main())
