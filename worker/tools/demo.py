"""`python -m worker.tools.demo`: the whole path on one machine, with real model answers.

With `REDIS_URL` unset it uses the address worker and client share by default,
127.0.0.1:6379 (`LLM_LOCAL_REDIS_PORT`), and starts the packaged Redis-compatible
server there when nothing listens. It starts one worker process (default engine and
model), sends a handful of concurrent chat requests through `ChatClient`, prints each
reply with its timings, deletes its keys and shuts down.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from contextlib import ExitStack
from pathlib import Path

import redis

from producer.client import ChatClient
from producer.settings import ProducerSettings
from worker.local_redis.server import local_server

QUESTIONS = [
    "What is the capital of France?",
    "Name three primary colors.",
    "Write a haiku about the sea.",
    "What is 12 times 12?",
    "Give one tip for writing clear code.",
    "Which planet is known as the Red Planet?",
]


def _wait_for_worker(log_path: Path, proc: subprocess.Popen[bytes], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if '"worker_started"' in log_path.read_text(errors="replace"):
            return
        if proc.poll() is not None:
            raise SystemExit(f"worker exited early:\n{log_path.read_text()[-2000:]}")
        time.sleep(0.2)
    raise SystemExit(f"worker did not start within {timeout_s:.0f} s; log: {log_path}")


def _delete_keys(url: str, prefix: str) -> None:
    """Remove the demo's streams and keys, so a shared server keeps nothing of it."""
    client = redis.Redis.from_url(url)
    try:
        keys = list(client.scan_iter(match=f"{prefix}:*", count=1000))
        if keys:
            client.delete(*keys)
    finally:
        client.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m worker.tools.demo", description=__doc__)
    p.add_argument(
        "--engine", default=os.environ.get("LLM_ENGINE", "paged"), choices=["paged", "static", "echo", "hf"]
    )
    p.add_argument("--max-tokens", type=int, default=48)
    args = p.parse_args(argv)

    with ExitStack() as stack:
        settings = ProducerSettings()
        url = settings.redis_url
        if "redis_url" not in settings.model_fields_set:
            server = local_server(settings.local_redis_port)
            if server is None:
                print(f"using the Redis server that listens at {url}")
            else:
                stack.callback(server.stop)
                print(f"started the packaged Redis-compatible server at {url}")
        prefix = f"demo-{uuid.uuid4().hex[:6]}"
        stack.callback(_delete_keys, url, prefix)
        log_path = Path(tempfile.gettempdir()) / f"{prefix}-worker.log"
        env = {
            **os.environ,
            "REDIS_URL": url,
            "LLM_PREFIX": prefix,
            "LLM_ENGINE": args.engine,
            "PYTHONUNBUFFERED": "1",
            "HF_HUB_OFFLINE": "1",
            "TQDM_DISABLE": "1",
        }
        with open(log_path, "wb") as log_file:
            worker = subprocess.Popen(
                [sys.executable, "-m", "worker"], env=env, stdout=log_file, stderr=subprocess.STDOUT
            )

        def stop_worker() -> None:
            worker.send_signal(signal.SIGTERM)
            worker.wait(timeout=60)

        stack.callback(stop_worker)
        print(f"worker starting (engine={args.engine}); its JSON log: {log_path}")
        _wait_for_worker(log_path, worker, timeout_s=600)

        client = stack.enter_context(ChatClient(url, prefix=prefix, timeout_s=600))
        started = time.monotonic()
        ids = [client.submit([{"role": "user", "content": q}], max_tokens=args.max_tokens) for q in QUESTIONS]
        replies = [client.result(i) for i in ids]
        wall_s = time.monotonic() - started
        for question, reply in zip(QUESTIONS, replies, strict=True):
            t = reply.timings
            print(f"\nQ: {question}\nA: {reply.text.strip()}")
            u = reply.usage
            print(
                f"   [{reply.finish_reason}; {u.prompt_tokens} prompt + {u.completion_tokens} "
                f"completion tokens; queue {t.queue_ms:.0f} ms, TTFT {t.ttft_ms or 0:.0f} ms, "
                f"total {t.total_ms:.0f} ms]"
            )
        tokens = sum(r.usage.completion_tokens for r in replies)
        print(
            f"\n{len(replies)} concurrent requests answered in {wall_s:.1f} s "
            f"({tokens / wall_s:.1f} output tok/s)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
