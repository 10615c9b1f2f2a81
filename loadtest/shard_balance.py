"""How evenly the workers share the shard streams, and how many streams move when one joins or leaves.

Conversation affinity (docs/scaling.md) sends each chat to one shard stream, and each stream's owner
serves it first, so an owner's load is the chats of its streams. This script draws `--fleets` random
deployments (a random prefix, as `chat_affinity_bench.py` uses, `--shards` streams, `--workers` workers
named like that benchmark's, `--conversations` chat ids placed by the client's `shard_for`) and compares
two ways of choosing owners:

  plain     rendezvous hashing: each stream to the worker of highest weight (`shard_ownership.weight`)
  bounded   what the workers run (`shard_ownership.owners`): the same weights, at most
            ceil(streams / workers) streams per worker

For each: the busiest worker's streams and its share of the chats over the mean share (median and p90
over the fleets), and the streams that change owner when a worker joins or when one leaves (mean and
max, as a fraction of the streams; the least possible is 1 / (W + 1) on a join and 1 / W on a leave).

    .venv/bin/python loadtest/shard_balance.py
    .venv/bin/python loadtest/shard_balance.py --workers 8 --shards 32 --conversations 1000
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from producer.wire.keys import namespace, requests_stream, shard_for  # noqa: E402
from worker.loop.shard_ownership import owners, weight  # noqa: E402

Assign = Callable[[Sequence[str], Sequence[str]], dict[str, str]]


def plain(streams: Sequence[str], workers: Sequence[str]) -> dict[str, str]:
    """Rendezvous without a bound: each stream's top worker."""
    return {s: max(workers, key=lambda w: (weight(w, s), w)) for s in streams}


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def measure(assign: Assign, args: argparse.Namespace) -> dict[str, list[float]]:
    found: dict[str, list[float]] = {"streams": [], "load": [], "join": [], "leave": []}
    rng = random.Random(args.seed)  # the same fleets for both ways of choosing owners
    for _ in range(args.fleets):
        prefix = f"ca-on-{rng.getrandbits(24):06x}"
        streams = [requests_stream(namespace(prefix, shard=n)) for n in range(args.shards)]
        workers = [f"on{i}" for i in range(args.workers)]
        owner = assign(streams, workers)
        found["streams"].append(max(Counter(owner.values()).values()))
        chats = Counter(
            shard_for(f"chat-{rng.getrandbits(32):08x}", args.shards) for _ in range(args.conversations)
        )
        load = Counter({w: 0 for w in workers})
        for n, stream in enumerate(streams):
            load[owner[stream]] += chats[n]
        found["load"].append(max(load.values()) / (args.conversations / args.workers))
        joined = assign(streams, [*workers, f"on{args.workers}"])
        found["join"].append(sum(joined[s] != owner[s] for s in streams) / len(streams))
        left = assign(streams, workers[1:])
        found["leave"].append(sum(left[s] != owner[s] for s in streams) / len(streams))
    return found


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--shards", type=int, default=16)
    p.add_argument("--conversations", type=int, default=100)
    p.add_argument("--fleets", type=int, default=500)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    if args.workers < 2 or args.shards < 1:
        raise SystemExit("--workers must be at least 2 (a leave needs one left) and --shards at least 1")

    print(
        f"{args.fleets} fleets: {args.workers} workers, {args.shards} shards, {args.conversations} chats; "
        f"least moved: join {1 / (args.workers + 1):.0%}, leave {1 / args.workers:.0%}"
    )
    head = (
        "owners", "busiest streams p50", "p90", "busiest load / mean p50", "p90", "join moves mean", "max",
        "leave moves mean", "max",
    )  # fmt: skip
    print("| " + " | ".join(head) + " |")
    print("|" + " --- |" * len(head))
    for name, assign in (("plain", plain), ("bounded", owners)):
        m = measure(assign, args)
        row = (
            name, f"{quantile(m['streams'], 0.5):g}", f"{quantile(m['streams'], 0.9):g}",
            f"{quantile(m['load'], 0.5):.2f}", f"{quantile(m['load'], 0.9):.2f}",
            f"{statistics.mean(m['join']):.0%}", f"{max(m['join']):.0%}",
            f"{statistics.mean(m['leave']):.0%}", f"{max(m['leave']):.0%}",
        )  # fmt: skip
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
