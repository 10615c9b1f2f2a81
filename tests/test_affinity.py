"""Conversation affinity: a chat's turns go to one shard, and that shard's owner serves them.

The client places a request by its affinity key (`session`, else the first user message) and gives it
an id of the same shard; the shell computation of docs/protocol.md gives the same shard. Two real echo
workers share four shards by rendezvous hashing and each serves its own (the replies' `attempt` names
the worker); a worker stopped with SIGSTOP has its shard's requests stolen by the other after
`LLM_STEAL_AFTER_MS`, long before its heartbeat expires; after a kill -9 its shards move to the
survivor and nothing is lost or answered twice. A malformed `session` is `invalid_request`, from the
client and from a worker. With the real model (`model` mark), a conversation's second turn finds its
first turn's prompt in the prefix cache of the worker that owns its shard.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from collections import Counter
from pathlib import Path

import pytest
import redis
from pydantic import ValidationError
from rich.console import Console
from test_logging_schema import check, documented
from test_reliability_recovery import count_finals, wait_finals
from worker_process import WorkerProcess, spawn_worker

from producer.client import ChatClient, ChatError
from producer.gateway.openai_schema import ChatCompletionRequest
from producer.gateway.settings import GatewaySettings
from producer.gateway.translate import chat_params
from producer.wire.keys import StreamNames, shard_for
from producer.wire.models import ChatRequest, ErrorCode
from worker.loop.shard_ownership import owned_by
from worker.observability import top

pytestmark = pytest.mark.timeout(120)

ROOT = Path(__file__).resolve().parents[1]
SHARDS = 4
# A steal (500 ms) well inside the heartbeat TTL (3 s), so that the test tells a steal from ownership
# moving; liveness short enough that a kill -9 is recovered within seconds.
AFFINITY = dict(
    stream_shards=SHARDS, steal_after_ms=500, heartbeat_interval_s=0.5, heartbeat_ttl_s=3.0,
    reclaim_interval_s=0.3, reclaim_min_idle_ms=1000, read_block_ms=200, stats_interval_s=1,
    echo_token_delay_ms=5,
)  # fmt: skip


def user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def conversation(first: str, turns: int) -> list[list[dict[str, str]]]:
    """The messages of each turn of a chat: each resends the history before its new question."""
    history = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": first}]
    out = [list(history)]
    for turn in range(1, turns):
        history += [{"role": "assistant", "content": f"answer {turn}"}, *user(f"q{turn}")]
        out.append(list(history))
    return out


# -- the client's placement (no server) -----------------------------------------------------------------
def test_one_key_goes_to_one_shard_and_its_id_says_so() -> None:
    client = ChatClient("redis://127.0.0.1:1/0", prefix="p", stream_shards=SHARDS)
    chats = [conversation(f"first question {i}", 4) for i in range(40)]
    for i, turns in enumerate(chats):
        placed = [client.prepare(m, max_tokens=4) for m in turns]
        shard = shard_for(f"first question {i}", SHARDS)
        assert {p.names.root for p in placed} == {f"p:s:{{{shard}}}"}
        assert all(shard_for(p.id, SHARDS) == shard and len(p.id) == 36 for p in placed)  # found by id alone
        assert client._names_for(placed[-1].id) is placed[-1].names
    # The conversations spread over every shard, as ids did.
    assert len({shard_for(f"first question {i}", SHARDS) for i in range(40)}) == SHARDS
    # `session` wins over the first message, `shard_key` over both; an id of the caller's keeps its text.
    assert client.prepare(user("x"), session="conv-9").names.shard == shard_for("conv-9", SHARDS)
    assert client.prepare(user("x"), session="conv-9", shard_key="k").names.shard == shard_for("k", SHARDS)
    mine = client.prepare(user("x"), session="conv-9", id="my-id")
    assert (mine.id, mine.names.shard) == ("my-id", shard_for("conv-9", SHARDS))
    # No key (a prompt, an empty first message): the id places it, as before; 32 hex characters.
    for placed in (client.prepare(prompt="hello"), client.prepare(user(""))):
        assert len(placed.id) == 32 and placed.names.shard == shard_for(placed.id, SHARDS)
    # A tenant's client does the same within its tenant; a client without shards has one namespace.
    alice = ChatClient("redis://127.0.0.1:1/0", prefix="p", tenant="alice", stream_shards=SHARDS)
    assert alice.prepare(user("x"), session="conv-9").names.root == f"p:t:{{alice.{shard_for('conv-9', 4)}}}"
    plain = ChatClient("redis://127.0.0.1:1/0", prefix="p").prepare(user("x"), session="conv-9")
    assert plain.names.root == "p" and len(plain.id) == 32
    # The body carries `session` only when set (older workers read the others as before).
    bare = ChatRequest(prompt="x")
    assert "session" not in bare.model_dump() and bare.affinity_key() is None


@pytest.mark.parametrize("session", ["", "has space", "x" * 129, "ünï", "a\nb", "semi;colon"])
def test_a_malformed_session_is_refused_by_the_client(session: str) -> None:
    client = ChatClient("redis://127.0.0.1:1/0", prefix="p", stream_shards=SHARDS)
    with pytest.raises(ValidationError) as info:
        client.prepare(user("x"), session=session)
    assert info.value.errors()[0]["loc"] == ("session",)


def test_the_gateway_passes_a_session() -> None:
    req = ChatCompletionRequest.model_validate({"model": "m", "messages": user("hi"), "session": "conv-1"})
    assert chat_params(req, GatewaySettings())["session"] == "conv-1"


def test_the_documented_shell_computation_is_the_clients() -> None:
    """docs/protocol.md's gzip and python lines print the shard the Python client picks, and its redis-cli
    example sends to that shard."""
    doc = (ROOT / "docs" / "protocol.md").read_text()
    block = re.search(r"```bash\n(key=.+?)```", doc, flags=re.S)
    assert block
    script = block.group(1)
    key = re.search(r"^key='([^']+)'", script, flags=re.M)
    n = re.search(r"^n=(\d+)", script, flags=re.M)
    assert key and n and int(n.group(1)) == SHARDS
    client = ChatClient("redis://127.0.0.1:1/0", prefix="llm", stream_shards=SHARDS)
    placed = client.prepare(user("Hello"), session=key.group(1))
    out = subprocess.run(["bash", "-c", script], capture_output=True, text=True, check=True).stdout.split()
    assert out == [str(placed.names.shard)] * 2
    # With no session the key is the first user message, which the same lines turn into its shard.
    question = "What is the capital of France?"
    derived = script.replace(f"key='{key.group(1)}'", f"key='{question}'")
    out = subprocess.run(["bash", "-c", derived], capture_output=True, text=True, check=True).stdout.split()
    assert out == [str(client.prepare(user(question)).names.shard)] * 2
    xadd = re.search(r"^redis-cli XADD '(\S+)' '\*' v 1 ct json body '(.+)'$", doc, flags=re.M)
    assert xadd and xadd.group(1) == placed.names.requests
    assert ChatRequest.model_validate_json(xadd.group(2)).affinity_key() == key.group(1)


# -- real workers ---------------------------------------------------------------------------------------
def names_splitting(prefix: str) -> tuple[str, str]:
    """Two worker names that each own some of the prefix's shards (so that each has its own to serve)."""
    streams = [n.requests for n in StreamNames.layout(prefix, [None], SHARDS)]
    for i in range(100):
        a, b = f"wa{i}", f"wb{i}"
        if 0 < len(owned_by(a, streams, [a, b])) < SHARDS:
            return a, b
    raise AssertionError("no pair of names splits the shards")


def ownership(worker: WorkerProcess) -> dict:
    found = worker.events("shards_owned")
    return found[-1] if found else {}


def last_stats(worker: WorkerProcess) -> dict:
    found = worker.events("worker_stats")
    return found[-1] if found else {}


def wait_for(predicate, timeout_s: float, what: str) -> None:  # noqa: ANN001
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def served_by(reply_attempt: str) -> str:
    return reply_attempt.rsplit(":", 1)[0]  # `<consumer>:<start ms>`


def sessions_of(shard: int, count: int) -> list[str]:
    return [s for s in (f"conv-{i}" for i in range(1000)) if shard_for(s, SHARDS) == shard][:count]


def test_owners_serve_their_shards_others_steal_and_a_dead_owners_shards_move(
    redis_url: str, prefix: str, redis_client: redis.Redis, tmp_path: Path
) -> None:
    a, b = names_splitting(prefix)
    first = spawn_worker(redis_url, prefix, tmp_path, a, **AFFINITY)  # type: ignore[arg-type]
    workers = {a: first}
    client = ChatClient(redis_url, prefix=prefix, stream_shards=SHARDS, timeout_s=60)
    try:
        wait_for(lambda: ownership(first).get("owned") == SHARDS, 10, "the only worker owns every shard")
        workers[b] = spawn_worker(redis_url, prefix, tmp_path, b, **AFFINITY)  # type: ignore[arg-type]
        wait_for(
            lambda: all(ownership(w).get("workers") == 2 for w in workers.values()), 10, "both see each other"
        )
        # The join moved to b exactly the shards b owns now, and both agree on every owner.
        owner = {label: name for name, w in workers.items() for label in ownership(w)["shards"]}
        assert sorted(owner) == [str(n) for n in range(SHARDS)]
        streams = [n.requests for n in client.spaces]
        kept = owned_by(a, streams, [a, b])
        assert ownership(workers[a])["shards"] == [str(n) for n in range(SHARDS) if streams[n] in kept]

        # Every turn of every conversation is served by its shard's owner.
        for turn in range(3):
            ids = {}
            for i in range(12):
                messages = conversation(f"chat {i}", turn + 1)[-1]
                session = {"session": f"conv-{i}"} if i % 2 else {}  # half by session, half by first message
                ids[client.submit(messages, max_tokens=4, **session)] = f"conv-{i}" if i % 2 else f"chat {i}"
            for request_id, reply in client.results(list(ids), timeout_s=30).items():
                assert not isinstance(reply, ChatError), reply
                assert served_by(reply.attempt) == owner[str(shard_for(ids[request_id], SHARDS))], request_id

        # A malformed session from a raw client: `invalid_request` naming it, from the worker.
        for request_id, session in (("bad-space", "has space"), ("bad-long", "x" * 129)):
            body = {"id": request_id, "messages": user("x"), "session": session}
            entry = {"v": "1", "ct": "json", "body": json.dumps(body)}
            redis_client.xadd(client.spaces[shard_for(request_id, SHARDS)].requests, entry)  # type: ignore[arg-type]
            with pytest.raises(ChatError) as info:
                client.result(request_id, timeout_s=30)
            assert (info.value.code, info.value.param) == (ErrorCode.INVALID_REQUEST, "session")

        # Steal: the owner of a shard stops (SIGSTOP); the other serves that shard after the steal delay,
        # while the stopped one's heartbeat still lives (ownership has not moved).
        victim_name = owner["0"]
        survivor_name = next(n for n in workers if n != victim_name)
        victim, survivor = workers[victim_name], workers[survivor_name]
        moves = len(survivor.events("shards_owned"))
        victim.proc.send_signal(signal.SIGSTOP)
        try:
            time.sleep(0.3)  # a read it was blocked in ends (a stopped reader still gets what it blocks on)
            began = time.monotonic()
            ids = [client.submit(user("stolen"), session=s, max_tokens=4) for s in sessions_of(0, 3)]
            replies = client.results(ids, timeout_s=20)
            waited = time.monotonic() - began
        finally:
            victim.proc.send_signal(signal.SIGCONT)
        answered = [r for r in replies.values() if not isinstance(r, ChatError)]
        assert len(answered) == 3 and {served_by(r.attempt) for r in answered} == {survivor_name}
        assert all(r.timings.queue_ms >= 450 for r in answered)
        assert waited < AFFINITY["heartbeat_ttl_s"], waited  # type: ignore[operator]
        assert len(survivor.events("shards_owned")) == moves  # stolen, not moved
        done = {e["id"]: e for w in workers.values() for e in w.events("request_done")}
        assert [(done[i]["shard"], done[i]["owned"]) for i in ids] == [(0, False)] * 3  # the log says so
        by_owner = [e["owned"] for i, e in done.items() if i not in ids]  # the 36 turns above
        assert len(by_owner) == 36 and all(by_owner)

        # kill -9 of an owner with requests in flight on every shard: its shards move to the survivor
        # once its heartbeat expires; every request is answered exactly once.
        long = [" ".join(f"w{i}x{j}" for j in range(60)) for i in range(40)]  # the echo of 60 words: 0.3 s
        sent = [client.submit(user(text), session=f"conv-{i}", max_tokens=60) for i, text in enumerate(long)]
        time.sleep(0.15)
        victim.proc.kill()
        victim.proc.wait()
        events = wait_finals(redis_client, [client.reply_key(i) for i in sent], timeout_s=30)
        assert count_finals(events) == (0, 0)
        wait_for(lambda: ownership(survivor).get("owned") == SHARDS, 10, "the survivor owns every shard")
        assert ownership(survivor)["workers"] == 1
        by = Counter(served_by(e["attempt"]) for evs in events.values() for e in evs if e["type"] == "done")
        assert by[survivor_name] > 0 and sum(by.values()) == len(sent), by
        assert survivor.events("entries_reclaimed")  # the victim died holding some
        wait_for(lambda: last_stats(survivor).get("owned_shards") == SHARDS, 10, "the live stats show it")
        # `python -m worker.top` shows it too.
        console = Console(width=200, record=True, file=open(os.devnull, "w"))  # noqa: SIM115
        frame = top.read_frame(redis_client, client.names, "workers", 5.0)
        console.print(top.render(frame, prefix, 200, console))
        lines = console.export_text().splitlines()
        header = next(line for line in lines if " shards " in line)
        row = next(line for line in lines if line.split()[:1] == [survivor_name])
        at = header.index(" shards ")
        assert row[at : at + len(" shards ")].strip() == str(SHARDS), lines
    finally:
        client.close()
        for worker in workers.values():
            if worker.proc.poll() is None:
                os.kill(worker.proc.pid, signal.SIGCONT)
            worker.stop()
    assert not any(w.events("iteration_failed") for w in workers.values())
    common, known = documented()  # every line, `shards_owned` and `owned_shards` included
    problems = [p for w in workers.values() for line in w.events() for p in check(line, common, known)]
    assert not problems, problems[:5]


@pytest.mark.model
@pytest.mark.timeout(300)
def test_a_conversations_next_turn_finds_its_history_in_the_owners_prefix_cache(
    redis_url: str, prefix: str, tmp_path: Path
) -> None:
    """The real model, two workers: each conversation's second turn is served by the worker that served
    its first, and reuses the first turn's whole prompt from that worker's prefix cache."""
    a, b = names_splitting(prefix)
    settings = dict(AFFINITY, echo_token_delay_ms=0, steal_after_ms=20_000)  # no steal while a CPU prefills
    workers = [
        spawn_worker(redis_url, prefix, tmp_path, n, "paged", wait=False, **settings)  # type: ignore[arg-type]
        for n in (a, b)
    ]
    client = ChatClient(redis_url, prefix=prefix, stream_shards=SHARDS, timeout_s=240)
    try:
        for w in workers:
            w.wait_started()
        wait_for(lambda: all(ownership(w).get("workers") == 2 for w in workers), 10, "both see each other")
        owner = {label: w.name for w in workers for label in ownership(w)["shards"]}
        # Two conversations per worker, each with a history of its own (no other conversation shares it).
        mine = {
            w.name: [s for s in (f"c{i}" for i in range(200)) if owner[str(shard_for(s, SHARDS))] == w.name]
            for w in workers
        }
        chosen = [s for w in workers for s in mine[w.name][:2]]
        system = {"role": "system", "content": "You are terse."}
        for session in chosen:
            first = [system, *user(f"Repeat after me: {' '.join(f'{session}w{j}' for j in range(50))}")]
            one = client.chat(first, session=session, max_tokens=4)
            history = [*first, {"role": "assistant", "content": one.text}, *user("Again.")]
            two = client.chat(history, session=session, max_tokens=4)
            assert served_by(one.attempt) == served_by(two.attempt) == owner[str(shard_for(session, SHARDS))]
            assert one.usage.cached_tokens < one.usage.prompt_tokens // 2  # at most the system prompt
            # The whole first prompt, but for its last partial KV block (two blocks of 16 of slack).
            assert two.usage.cached_tokens >= one.usage.prompt_tokens - 32, (one.usage, two.usage)
        for w in workers:  # the live stats show each worker's hit ratio next to its shards

            def hits(w: WorkerProcess = w) -> bool:
                return any(e.get("prefix_hit_rate", 0) > 0.3 for e in w.events("worker_stats"))

            wait_for(hits, 10, "the hit ratio shows")
            assert last_stats(w)["owned_shards"] == len(ownership(w)["shards"])
    finally:
        client.close()
        for w in workers:
            w.stop()
