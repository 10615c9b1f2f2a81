"""Conversation affinity: prompt tokens computed, TTFT and throughput of multi-turn chats, on vs off.

Why: each turn of a chat resends the whole history, and a worker's prefix cache only helps the turns it
serves itself. Affinity (docs/scaling.md, "Conversation affinity") sends a conversation's turns to the
worker that owns its shard; this measures what that saves against workers that read every shard.

The workload: `--conversations` C chats of `--turns` T turns each, every chat belonging to one of
`--apps` K applications, each with a system prompt of its own of `--system-tokens` tokens (the same for
every chat of the app). A turn's request is the whole history as chat `messages`: the system prompt,
the previous user and assistant turns, and a new user message (about 25 tokens); turn t+1 of a chat is
sent once turn t's final reply is read, its text appended to the history. The chats run concurrently
(one thread each). Every reply is greedy and ends at its end-of-turn token or `--max-tokens`.

The modes, each on `--workers` W fresh `python -m worker` processes (paged engine, the same model and
settings, `LLM_STREAM_SHARDS` = `--shards`, 4 x W by default so that ownership spreads evenly), on one
private Redis-compatible server, a key prefix of their own:

  on   the workers' default `LLM_STEAL_AFTER_MS` (500, or `--steal-after-ms`): each reads the shards it
       owns first; each request carries `session=<chat id>`, so a chat's turns go to one shard;
  off  `LLM_STEAL_AFTER_MS=0`: every worker reads every shard, as before affinity existed, so a turn
       goes to whichever worker reads first. Requests carry no `session`; the client still places
       them by their first user message, but with every worker reading every shard the placement
       decides nothing.

With `--repeat N` the modes alternate their order each round (on first in odd rounds), so a slow or
fast spell of the machine hits both. Per mode: prompt tokens, the cached prompt tokens of the final
replies (`usage.cached_tokens`), prompt tokens computed (prompt - cached), TTFT p50/p95 (the worker's
`timings.ttft_ms`, from the XADD, so it includes the wait in the stream), output tok/s (completion
tokens over the mode's wall time, first send to last reply), requests, errors, and the share of turns
after the first served by the worker that served the chat's turn before; "lost" counts the turns
without a final reply (an error, or a turn never sent after its chat's error), "dup" the replies with
more than one final. The last lines give on / off.

    python loadtest/chat_affinity_bench.py --workers 4 --conversations 100 --turns 5 --max-tokens 64 \
        --kv-cache-bytes 1073741824 --json-out cpu_chat_affinity_100.json       # SmolLM2 on a CPU, ~20 min
    python loadtest/chat_affinity_bench.py --model llama-1b-random --device cuda --dtype float16 \
        --workers 4 --conversations 100 --turns 5 --kv-cache-bytes 4294967296   # 4 workers on one GPU

A toy run: `--conversations 4 --turns 2 --workers 2 --apps 2 --max-tokens 4`. `--kill-one` SIGKILLs
worker 0 once half of the requests are answered and reports the hit ratio per `--window-s` after it.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import sys
import tempfile
import threading
import time
import uuid
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from loadtest.worker_launch import spawn_worker, wait_started  # noqa: E402
from producer.client import ChatClient, ChatError, Reply  # noqa: E402
from producer.wire.codec import decode_event  # noqa: E402
from producer.wire.models import TokenEvent  # noqa: E402
from worker.engine.model_files import DEFAULT_MODEL  # noqa: E402
from worker.engine.random_model import load_default_tokenizer  # noqa: E402
from worker.local_redis.server import EmbeddedRedis  # noqa: E402

MODES = ("on", "off")
WORDS = (
    "account", "billing", "customer", "order", "refund", "policy", "shipping", "warranty", "invoice",
    "support", "ticket", "product", "return", "delivery", "address", "payment", "card", "subscription",
    "plan", "upgrade", "cancel", "escalate", "agent", "manager", "polite", "concise", "answer", "question",
    "summary", "detail", "step", "guide", "reference", "number", "status", "update",
)  # fmt: skip


def system_prompt(app: int, tokens: int, tokenizer: Any) -> str:
    """App `app`'s system prompt: `tokens` tokens of instructions, different for every app."""
    rng = random.Random(f"app-{app}")
    text = f"You are the assistant of application {app}. " + " ".join(
        rng.choice(WORDS) for _ in range(tokens)
    )
    return str(tokenizer.decode(tokenizer.encode(text)[:tokens]))


def user_message(chat: str, turn: int) -> str:
    rng = random.Random(f"{chat}-{turn}")
    return f"{chat}, question {turn}: " + " ".join(rng.choice(WORDS) for _ in range(16)) + "?"


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def served_by(attempt: str) -> str:
    return attempt.rsplit(":", 1)[0]  # `<consumer>:<start ms>`


def start_worker(url: str, prefix: str, name: str, mode: str, args: argparse.Namespace, log: Path) -> Any:
    model = DEFAULT_MODEL if args.model == "default" else args.model
    settings = {
        "engine": "paged", "model": model, "device": args.device, "dtype": args.dtype,
        "stream_shards": args.shards, "consumer_name": name, "metrics_port": 0,
        "max_prompt_tokens": 16384, "max_backlog_requests": 0,
        "steal_after_ms": args.steal_after_ms if mode == "on" else 0,
    }  # fmt: skip
    if args.kv_cache_bytes:
        settings["kv_cache_bytes"] = args.kv_cache_bytes
    return spawn_worker(url, prefix, settings, log)


def wait_ownership(logs: list[Path], workers: int, timeout_s: float = 30) -> None:
    """Until every worker has logged a share of the shards counting all `workers` live ones."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        seen = [
            any(
                json.loads(line).get("workers") == workers
                for line in log.read_text(errors="replace").splitlines()
                if '"shards_owned"' in line and line.startswith("{")
            )
            for log in logs
        ]
        if all(seen):
            return
        time.sleep(0.2)
    raise SystemExit(f"the workers did not all see {workers} live workers within {timeout_s:g} s")


@dataclass
class Turn:
    """One request of a conversation: its turn, when its final reply (or error) came, and which."""

    turn: int
    done_s: float  # time.monotonic()
    result: Reply | ChatError


def run_chat(
    client: ChatClient, chat: str, system: str, mode: str, args: argparse.Namespace, out: list[Turn]
) -> None:
    """One conversation's turns in order, each the whole history; its replies (or errors) into `out`."""
    history: list[dict[str, str]] = [{"role": "system", "content": system}]
    params: dict[str, Any] = {
        "max_tokens": args.max_tokens,
        "ignore_eos": args.ignore_eos,
        "temperature": 0.0,
    }
    if mode == "on":
        params["session"] = chat
    for turn in range(args.turns):
        history.append({"role": "user", "content": user_message(chat, turn)})
        try:
            reply = client.chat(list(history), timeout_s=args.timeout_s, **params)
        except ChatError as exc:
            out.append(Turn(turn, time.monotonic(), exc))
            return
        out.append(Turn(turn, time.monotonic(), reply))
        history.append({"role": "assistant", "content": reply.text})


def kill_midway(
    procs: list[Any], outs: list[list[Turn]], total: int, done: threading.Event
) -> dict[str, Any]:
    """SIGKILL the first worker once half of the `total` requests are answered; when, in `killed_at_s`."""
    while sum(len(o) for o in outs) < total // 2:
        if done.wait(0.05):
            return {}
    procs[0].kill()
    return {"killed_at_s": time.monotonic()}


def finals_per_request(client: ChatClient, outs: list[list[Turn]]) -> list[int]:
    """How many final events each answered request's reply stream holds (exactly one each, or a duplicate)."""
    ids = [t.result.id for out in outs for t in out if isinstance(t.result, Reply)]
    pipe = client.redis.pipeline(transaction=False)
    for request_id in ids:
        pipe.xrange(client.reply_key(request_id))
    return [
        sum(1 for _, fields in entries if not isinstance(decode_event(fields), TokenEvent))
        for entries in pipe.execute()
    ]


def run_mode(mode: str, server_url: str, systems: list[str], args: argparse.Namespace, logdir: Path) -> dict:
    """Fresh workers in `mode`, every conversation to its end (one worker killed midway with `--kill-one`);
    the mode's row."""
    prefix = f"ca-{mode}-{uuid.uuid4().hex[:6]}"
    names = [f"{mode}{i}" for i in range(args.workers)]
    logs = [logdir / f"{prefix}-{n}.log" for n in names]
    procs = [start_worker(server_url, prefix, n, mode, args, log) for n, log in zip(names, logs, strict=True)]
    kill: dict[str, Any] = {}
    try:
        wait_started(procs, logs, args.start_timeout_s)
        if mode == "on":
            wait_ownership(logs, args.workers)
        with ExitStack() as stack:
            chats = [f"chat-{i}" for i in range(args.conversations)]
            clients = [
                stack.enter_context(
                    ChatClient(server_url, prefix=prefix, stream_shards=args.shards, timeout_s=args.timeout_s)
                )
                for _ in chats
            ]
            outs: list[list[Turn]] = [[] for _ in chats]
            threads = [
                threading.Thread(target=run_chat, args=(c, chat, systems[i % len(systems)], mode, args, o))
                for i, (c, chat, o) in enumerate(zip(clients, chats, outs, strict=True))
            ]
            done = threading.Event()
            killer = threading.Thread(
                target=lambda: kill.update(kill_midway(procs, outs, len(chats) * args.turns, done))
            )
            start = time.monotonic()
            for t in threads:
                t.start()
            if args.kill_one:
                killer.start()
            for t in threads:
                t.join()
            wall_s = time.monotonic() - start
            done.set()
            if args.kill_one:
                killer.join()
            finals = finals_per_request(clients[0], outs)
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(timeout=120)
    row = summarize(mode, outs, wall_s, finals, args)
    row |= {"owner_share": owner_share(logs), "per_worker": per_worker(logs)}
    if args.kill_one:
        row |= after_kill(outs, start, kill.get("killed_at_s"), names[0], args.window_s)
    return row


def requests_done(log: Path) -> list[dict[str, Any]]:
    """The `request_done` events of one worker's log (JSON lines)."""
    return [
        json.loads(text)
        for text in log.read_text(errors="replace").splitlines()
        if text.startswith("{") and '"request_done"' in text
    ]


def owner_share(logs: list[Path]) -> float:
    """The share of requests that a worker read from a shard it owned (`request_done`'s `owned`); NaN with
    ownership off."""
    owned = [event["owned"] for log in logs for event in requests_done(log) if event.get("owned") is not None]
    return sum(owned) / len(owned) if owned else float("nan")


def per_worker(logs: list[Path]) -> list[dict[str, Any]]:
    """Each worker's share of the load, from its own `request_done` lines: requests served, prompt tokens
    computed (prompt - cached), queue time and TTFT p50 (the worker's, from the XADD). An even spread is
    what pull-based reading gives; affinity trades some of it for cache hits."""
    rows = []
    for log in logs:
        done = requests_done(log)
        rows.append({
            "requests": len(done),
            "computed_tokens": sum(e.get("prompt_tokens", 0) - e.get("cached_tokens", 0) for e in done),
            "queue_p50_ms": percentile([e["queue_ms"] for e in done if e.get("queue_ms") is not None], 50),
            "ttft_p50_ms": percentile([e["ttft_ms"] for e in done if e.get("ttft_ms") is not None], 50),
        })  # fmt: skip
    return rows


def computed_by_placement(outs: list[list[Turn]]) -> dict[str, Any]:
    """Where the prompt tokens computed (prompt - cached) went: first turns (`first`), follow-up turns served
    by the worker of the chat's turn before (`same`) and by another (`moved`), with how many turns of each
    (`*_turns`). A follow-up on the same worker computes about what any routing must (the new message,
    the part of a block after the cached ones), so `same` per turn estimates a perfect router's cost.
    `moved_by_turn[k]`: how many moved turns were turn k (0-based), which tells the start-up's second
    turns (their first turn taken by another worker while every worker ran its first step) from later
    moves."""
    split: dict[str, Any] = dict.fromkeys(
        ("first", "same", "moved", "first_turns", "same_turns", "moved_turns"), 0
    )
    split["moved_by_turn"] = [0] * max((len(out) for out in outs), default=0)
    for out in outs:
        before: Reply | None = None
        for t in out:
            if not isinstance(t.result, Reply):
                before = None
                continue
            reply = t.result
            if t.turn == 0 or before is None:
                kind = "first" if t.turn == 0 else "moved"  # after a failed turn: no worker to compare
            else:
                kind = "same" if served_by(reply.attempt) == served_by(before.attempt) else "moved"
            split[kind] += reply.usage.prompt_tokens - reply.usage.cached_tokens
            split[f"{kind}_turns"] += 1
            if kind == "moved":
                split["moved_by_turn"][t.turn] += 1
            before = reply
    return split


def hit_ratio(turns: list[Turn]) -> float:
    """Cached over prompt tokens of the follow-up turns (a first turn has no history to find)."""
    replies = [t.result for t in turns if t.turn > 0 and isinstance(t.result, Reply)]
    prompt = sum(r.usage.prompt_tokens for r in replies)
    return sum(r.usage.cached_tokens for r in replies) / prompt if prompt else float("nan")


def after_kill(
    outs: list[list[Turn]], start: float, killed_at: float | None, victim: str, window_s: float
) -> dict[str, Any]:
    """The hit ratio of follow-up turns before the kill, and per `window_s` window after it; `recovered_s`:
    from the kill to the end of the first window back at 90% of the ratio before it (None: never)."""
    if killed_at is None:
        return {"killed": None}
    turns = [t for out in outs for t in out]
    before = hit_ratio([t for t in turns if t.done_s < killed_at])
    windows, recovered_s = [], None
    end = max(t.done_s for t in turns)
    w = 0
    while killed_at + w * window_s < end:
        lo, hi = killed_at + w * window_s, killed_at + (w + 1) * window_s
        ratio = hit_ratio([t for t in turns if lo <= t.done_s < hi])
        windows.append(None if math.isnan(ratio) else round(ratio, 3))
        if recovered_s is None and not math.isnan(ratio) and ratio >= 0.9 * before:
            recovered_s = (w + 1) * window_s
        w += 1
    return {
        "killed": victim, "killed_after_s": killed_at - start, "hit_ratio_before": before,
        "hit_ratio_windows": windows, "window_s": window_s, "recovered_s": recovered_s,
    }  # fmt: skip


def summarize(
    mode: str, outs: list[list[Turn]], wall_s: float, finals: list[int], args: argparse.Namespace
) -> dict[str, Any]:
    replies = [t.result for out in outs for t in out if isinstance(t.result, Reply)]
    prompt = sum(r.usage.prompt_tokens for r in replies)
    cached = sum(r.usage.cached_tokens for r in replies)
    ttft = [r.timings.ttft_ms for r in replies if r.timings.ttft_ms is not None]
    output = sum(r.usage.completion_tokens for r in replies)
    follow = [
        served_by(a.result.attempt) == served_by(b.result.attempt)
        for out in outs
        for a, b in zip(out, out[1:], strict=False)
        if isinstance(a.result, Reply) and isinstance(b.result, Reply)
    ]
    return {
        "mode": mode, "requests": sum(len(o) for o in outs), "answered": len(replies),
        "errors": sum(isinstance(t.result, ChatError) for o in outs for t in o),
        "lost": args.conversations * args.turns - len(replies),
        "duplicates": sum(1 for n in finals if n != 1),
        "prompt_tokens": prompt, "cached_tokens": cached, "computed_tokens": prompt - cached,
        "hit_ratio": hit_ratio([t for o in outs for t in o]),
        "ttft_p50_ms": percentile(ttft, 50), "ttft_p95_ms": percentile(ttft, 95),
        "output_tokens": output, "wall_s": wall_s, "output_tok_s": output / wall_s,
        "same_worker_share": sum(follow) / len(follow) if follow else float("nan"),
        "computed_by_placement": computed_by_placement(outs),
    }  # fmt: skip


HEADER = (
    f"{'mode':<5} {'round':>5} {'prompt tok':>10} {'cached':>8} {'computed':>9} {'hit':>5} {'TTFT p50':>9} "
    f"{'p95':>8} {'out tok/s':>9} {'requests':>8} {'errors':>6} {'lost':>4} {'dup':>3} {'same worker':>11} "
    f"{'by owner':>8}"
)


def line(r: dict[str, Any]) -> str:
    return (
        f"{r['mode']:<5} {r['round']:>5} {r['prompt_tokens']:>10,} {r['cached_tokens']:>8,} "
        f"{r['computed_tokens']:>9,} {r['hit_ratio']:>5.0%} {r['ttft_p50_ms']:>9.0f} "
        f"{r['ttft_p95_ms']:>8.0f} {r['output_tok_s']:>9.1f} {r['requests']:>8} {r['errors']:>6} "
        f"{r['lost']:>4} {r['duplicates']:>3} {share(r['same_worker_share']):>11} "
        f"{share(r['owner_share']):>8}"
    )


def no_nan(value: Any) -> Any:
    """`value` with every NaN (a ratio of nothing) as None, so the JSON file is strict JSON (null)."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: no_nan(v) for k, v in value.items()}
    if isinstance(value, list):
        return [no_nan(v) for v in value]
    return value


def share(x: float) -> str:
    """A ratio as a percentage; n/a where nothing was counted (no owner while affinity is off)."""
    return "n/a" if math.isnan(x) else f"{x:.0%}"


def kill_line(r: dict[str, Any]) -> str:
    if r.get("killed") is None:
        return (
            f"{r['mode']} round {r['round']}: the run ended before half of it was answered; no worker killed"
        )
    windows = " ".join("-" if w is None else f"{w:.0%}" for w in r["hit_ratio_windows"])
    back = f"{r['recovered_s']:g} s" if r["recovered_s"] is not None else "not within the run"
    return (
        f"{r['mode']} round {r['round']}: killed {r['killed']} at {r['killed_after_s']:.0f} s; follow-up "
        f"hit ratio before {r['hit_ratio_before']:.0%}, per {r['window_s']:g} s after: {windows}; "
        f"back to 90% of it: {back}"
    )


def perfect_routing(c: dict[str, Any]) -> float:
    """An estimate of what a router that kept every follow-up on its chat's worker would compute: the first
    turns as measured, and every follow-up at the measured same-worker cost per turn (NaN without one)."""
    if not c["same_turns"]:
        return float("nan")
    return c["first"] + c["same"] / c["same_turns"] * (c["same_turns"] + c["moved_turns"])


def ratios(rows: list[dict[str, Any]]) -> dict[str, float]:
    """on / off of the medians over the rounds: prompt tokens computed, TTFT p50 and output tok/s."""

    def median(mode: str, key: str) -> float:
        return statistics.median(r[key] for r in rows if r["mode"] == mode)

    keys = ("computed_tokens", "ttft_p50_ms", "output_tok_s")
    if {r["mode"] for r in rows} != set(MODES):
        return {k: float("nan") for k in keys}
    return {k: median("on", k) / median("off", k) if median("off", k) else float("nan") for k in keys}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--conversations", type=int, default=64)
    p.add_argument("--turns", type=int, default=4)
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--shards", type=int, default=None, help="LLM_STREAM_SHARDS (default: 4 x --workers)")
    p.add_argument("--apps", type=int, default=8, help="applications, each with a system prompt of its own")
    p.add_argument("--system-tokens", type=int, default=300)
    p.add_argument("--max-tokens", type=int, default=64, help="the most tokens of a reply")
    p.add_argument(
        "--ignore-eos", action="store_true",
        help="every reply exactly --max-tokens tokens; its text past an end-of-turn token then differs "
        "from the tokens that the next turn's prompt holds, so less of it is found in the cache",
    )  # fmt: skip
    p.add_argument("--model", default="default", help="the worker's LLM_MODEL (default: SmolLM2-135M)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default="float32", choices=["auto", "float32", "float16", "bfloat16"])
    p.add_argument("--kv-cache-bytes", type=int, default=None)
    p.add_argument("--steal-after-ms", type=int, default=500, help="LLM_STEAL_AFTER_MS of the 'on' workers")
    p.add_argument(
        "--kill-one", action="store_true", help="SIGKILL one worker once half the requests are answered"
    )
    p.add_argument("--window-s", type=float, default=10.0, help="hit-ratio windows after the kill")
    p.add_argument("--repeat", type=int, default=1, help="rounds of both modes, their order alternated")
    p.add_argument("--start-timeout-s", type=float, default=600)
    p.add_argument("--timeout-s", type=float, default=900)
    p.add_argument("--modes", default="on,off", help="the modes to run, in this order in odd rounds")
    p.add_argument("--json-out", type=Path)
    args = p.parse_args()
    args.modes = args.modes.split(",")
    if not args.modes or set(args.modes) - set(MODES):
        raise SystemExit(f"--modes: a comma-separated list of {', '.join(MODES)}")
    args.shards = args.shards or 4 * args.workers
    if args.steal_after_ms <= 0:
        raise SystemExit("--steal-after-ms must be positive: 0 turns affinity off")
    tokenizer = load_default_tokenizer()
    systems = [system_prompt(k, args.system_tokens, tokenizer) for k in range(args.apps)]
    rows = []
    with tempfile.TemporaryDirectory() as tmp, EmbeddedRedis() as server:
        for n in range(args.repeat):
            for mode in args.modes if n % 2 == 0 else args.modes[::-1]:
                row = run_mode(mode, server.url, systems, args, Path(tmp)) | {"round": n + 1}
                rows.append(row)
                print(line(row), flush=True)
    on_off = ratios(rows)
    print(
        f"\n{args.conversations} conversations x {args.turns} turns, {args.apps} apps "
        f"({args.system_tokens}-token system prompts), {args.workers} workers, {args.shards} shards, "
        f"{args.model} {args.dtype} on {args.device}, {args.max_tokens} tokens a reply\n"
    )
    print(HEADER)
    for r in rows:
        print(line(r))
    print("\nper worker (requests served; queue / TTFT p50 ms, the worker's own):")
    for r in rows:
        cells = [
            f"{w['requests']} ({w['queue_p50_ms']:.0f} / {w['ttft_p50_ms']:.0f})" for w in r["per_worker"]
        ]
        print(f"  {r['mode']} round {r['round']}: " + ", ".join(cells))
    print("\nprompt tokens computed by where the turn ran (tokens / turns):")
    for r in rows:
        c = r["computed_by_placement"]
        cells = [f"{k} {c[k]:,} / {c[k + '_turns']}" for k in ("first", "same", "moved")]
        cells[-1] += f" (by turn: {c['moved_by_turn']})"
        stayed = perfect_routing(c)
        print(
            f"  {r['mode']} round {r['round']}: " + ", ".join(cells)
            + f"; {stayed:,.0f} if every follow-up had stayed (at the same-worker cost per turn)"
        )  # fmt: skip
    if args.kill_one:
        print()
        for r in rows:
            print(kill_line(r))
    if {"on", "off"} <= set(args.modes):
        print(
            f"\non / off (medians over {args.repeat} round(s)): prompt tokens computed "
            f"{on_off['computed_tokens']:.2f}, TTFT p50 {on_off['ttft_p50_ms']:.2f}, "
            f"output tok/s {on_off['output_tok_s']:.2f}"
        )
    if args.json_out:
        config = {k: str(v) for k, v in vars(args).items()}
        data = {"config": config, "results": rows, "on_off": on_off}
        args.json_out.write_text(json.dumps(no_nan(data), indent=2, allow_nan=False))


if __name__ == "__main__":
    main()
