"""`python -m producer chat "text"` (`llm-chat`): send one chat request and stream the reply to the terminal.

How long it waits: `--timeout-s`, else `LLM_TIMEOUT_S`, else 120 s. When the wait runs out, or on
Ctrl-C (SIGINT), the request is cancelled (no worker serves it afterwards) and the command exits
with one line on stderr: status 124 after a timeout, 130 after an interrupt, 1 for an error reply,
2 for a bad setting.
"""

from __future__ import annotations

import argparse
import contextlib
import sys

import pydantic

from producer.client import ChatClient, ChatError, ChatTimeout
from producer.config_errors import CONFIG_ERROR_EXIT, print_config_error
from producer.settings import ProducerSettings
from producer.wire.backoff import TRANSIENT_ERRORS
from producer.wire.models import new_request_id

ERROR_EXIT = 1
TIMEOUT_EXIT = 124  # as coreutils' `timeout`
INTERRUPT_EXIT = 130  # 128 + SIGINT, as a shell reports a command ended by Ctrl-C


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m producer")
    sub = p.add_subparsers(dest="command", required=True)
    chat = sub.add_parser("chat", help="send one user message and stream the answer")
    chat.add_argument("text")
    chat.add_argument("--system", help="optional system prompt")
    chat.add_argument("--max-tokens", type=int, default=128)
    chat.add_argument("--temperature", type=float, default=0.0)
    chat.add_argument("--redis-url", help="default: REDIS_URL, else redis://127.0.0.1:6379/0")
    chat.add_argument(
        "--timeout-s", type=float, help="how long to wait for the reply; default: LLM_TIMEOUT_S, else 120"
    )
    args = p.parse_args(argv)

    messages = ([{"role": "system", "content": args.system}] if args.system else []) + [
        {"role": "user", "content": args.text}
    ]
    overrides: dict[str, object] = {"redis_url": args.redis_url} if args.redis_url else {}
    if args.timeout_s is not None:
        overrides["timeout_s"] = args.timeout_s
    try:
        settings = ProducerSettings(**overrides)  # type: ignore[arg-type]
    except pydantic.ValidationError as exc:
        options = {"redis_url": "--redis-url", "timeout_s": "--timeout-s"}
        print_config_error(exc, ProducerSettings, {k: options[k] for k in overrides})
        return CONFIG_ERROR_EXIT
    request_id = new_request_id()  # known before sending, so an interrupt at any point can cancel it
    printed = False  # whether a token is on the terminal (messages then start on a line of their own)
    try:
        with ChatClient(settings=settings) as client:
            try:
                stream = client.stream(
                    messages, id=request_id, max_tokens=args.max_tokens, temperature=args.temperature,
                    timeout_s=settings.timeout_s,
                )  # fmt: skip
                for token in stream:
                    printed = printed or bool(token.text)
                    print(token.text, end="", flush=True)
            except ChatTimeout:
                if not settings.cancel_on_timeout:  # else the client has just cancelled it
                    _cancel(client, request_id)
                waited = f"{settings.timeout_s:g} s"
                _say(printed, f"error: no reply within {waited}; request {request_id} cancelled")
                return TIMEOUT_EXIT
            except ChatError as exc:
                _say(printed, f"error: {exc}")
                return ERROR_EXIT
            except KeyboardInterrupt:
                _cancel(client, request_id)
                _say(printed, f"interrupted: request {request_id} cancelled")
                return INTERRUPT_EXIT
    except KeyboardInterrupt:  # while connecting or closing: nothing was sent, or it is answered
        _say(printed, "interrupted")
        return INTERRUPT_EXIT
    reply = stream.reply
    if reply is not None:
        t = reply.timings
        print(
            f"\n[{reply.finish_reason}; {reply.usage.prompt_tokens}+{reply.usage.completion_tokens} tokens; "
            f"queue {t.queue_ms:.0f} ms, ttft {t.ttft_ms or 0:.0f} ms, total {t.total_ms:.0f} ms]",
            file=sys.stderr,
        )
    return 0


def _say(printed: bool, line: str) -> None:
    print(("\n" if printed else "") + line, file=sys.stderr, flush=True)


def _cancel(client: ChatClient, request_id: str) -> None:
    """Cancel after Ctrl-C: a second Ctrl-C or an unreachable Redis does not turn into a traceback."""
    with contextlib.suppress(KeyboardInterrupt, *TRANSIENT_ERRORS):
        client.cancel(request_id)


if __name__ == "__main__":
    sys.exit(main())
