"""Redis commands per request, end to end (client + echo worker), from the server's INFO commandstats.

The figure sizes a Redis node for a fleet (docs/scaling.md); the test prints the table and fails
if a change makes the per-request cost grow past the budget below.
"""

from __future__ import annotations

import pytest
import redis

from producer.client import ChatClient

REQUESTS = 200
WORDS = 8  # tokens each echo request generates
# Server-side commands per request, counting those run inside the Lua scripts (commandstats counts
# them): measured 10.5 final-only and 28.2 streamed with 8 tokens (docs/scaling.md), then 12.6 and 30.1
# with the request id's claim (docs/security.md, "Duplicate request ids": its SET in the read pipeline
# and a GET in the final's script). A budget with headroom: a fixed part, plus two per streamed token
# (the guard check and the XADD).
BUDGET = {False: 13.5, True: 13.5 + 2.5 * WORDS}


@pytest.mark.slow
@pytest.mark.parametrize("stream", [False, True], ids=["final-only", "streamed"])
def test_commands_per_request(
    start_worker, chat_client: ChatClient, redis_client: redis.Redis, stream: bool
) -> None:
    start_worker("echo", max_wait_ms=2)
    chat_client.chat([{"role": "user", "content": "warm up"}], max_tokens=2)
    redis_client.config_resetstat()
    text = " ".join(f"w{i}" for i in range(WORDS))
    ids = []
    for _ in range(0, REQUESTS, 50):
        batch = chat_client.submit_many([{"prompt": text, "max_tokens": WORDS, "stream": stream}] * 50)
        ids += [r for r in batch if isinstance(r, str)]
    replies = chat_client.results(ids, timeout_s=120)
    assert len(replies) == REQUESTS
    stats = redis_client.info("commandstats")
    calls = {k.removeprefix("cmdstat_"): v["calls"] for k, v in stats.items() if k != "cmdstat_info"}
    per_request = sum(calls.values()) / REQUESTS
    rows = sorted(calls.items(), key=lambda kv: -kv[1])
    print(f"\nCOMMANDS_PER_REQUEST stream={stream} total={per_request:.2f} " + " ".join(
        f"{name}={n / REQUESTS:.2f}" for name, n in rows))  # fmt: skip
    assert per_request <= BUDGET[stream], rows
