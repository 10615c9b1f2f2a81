"""`python -m producer chat "text"`: send one chat request and stream the reply to the terminal."""

from __future__ import annotations

import argparse
import sys

import pydantic

from producer.client import ChatClient, ChatError, ChatTimeout
from producer.config_errors import CONFIG_ERROR_EXIT, print_config_error
from producer.settings import ProducerSettings


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m producer")
    sub = p.add_subparsers(dest="command", required=True)
    chat = sub.add_parser("chat", help="send one user message and stream the answer")
    chat.add_argument("text")
    chat.add_argument("--system", help="optional system prompt")
    chat.add_argument("--max-tokens", type=int, default=128)
    chat.add_argument("--temperature", type=float, default=0.0)
    chat.add_argument("--redis-url", help="default: REDIS_URL, else redis://127.0.0.1:6379/0")
    chat.add_argument("--timeout-s", type=float, default=120.0)
    args = p.parse_args(argv)

    messages = ([{"role": "system", "content": args.system}] if args.system else []) + [
        {"role": "user", "content": args.text}
    ]
    overrides = {"redis_url": args.redis_url} if args.redis_url else {}
    try:
        settings = ProducerSettings(**overrides)
    except pydantic.ValidationError as exc:
        print_config_error(exc, ProducerSettings, {k: "--redis-url" for k in overrides})
        return CONFIG_ERROR_EXIT
    with ChatClient(settings=settings) as client:
        try:
            stream = client.stream(
                messages, max_tokens=args.max_tokens, temperature=args.temperature, timeout_s=args.timeout_s
            )
            for token in stream:
                print(token.text, end="", flush=True)
        except (ChatError, ChatTimeout) as exc:
            print(f"\nerror: {exc}", file=sys.stderr)
            return 1
    reply = stream.reply
    if reply is not None:
        t = reply.timings
        print(
            f"\n[{reply.finish_reason}; {reply.usage.prompt_tokens}+{reply.usage.completion_tokens} tokens; "
            f"queue {t.queue_ms:.0f} ms, ttft {t.ttft_ms or 0:.0f} ms, total {t.total_ms:.0f} ms]",
            file=sys.stderr,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
