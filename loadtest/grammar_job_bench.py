"""How late the grammar gate's job finishes beside a busy engine thread, by the interpreter's switch interval.

The paged engine's grammar gate (`worker/engine/structured/gate.py`) consumes a step's tokens and fills the
next masks on its own thread while the engine's thread runs Python (streaming, planning). The job holds
the GIL only between its native calls, but it must take it back after each of them, and CPython hands the
GIL from a thread running Python to a waiting one only after the switch interval. This script runs the
job's native calls (llguidance's batched consume and mask fill, `--rows` matchers of a JSON schema inside a
string) on a thread while the main thread spins in Python for `--busy-ms`, then waits for the job, and
reports how long after the busy work the job was done (median and max of `--repeat` rounds), for each
switch interval. 0 means the job was hidden entirely behind the busy work.

    .venv/bin/python loadtest/grammar_job_bench.py
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "loadtest"))

from engine_bench import REPLY_SCHEMA  # noqa: E402

from worker.engine.random_model import load_default_tokenizer  # noqa: E402
from worker.engine.structured import (  # noqa: E402
    GrammarCompiler,
    GrammarSpec,
    allocate_bitmask,
    consume_tokens,
    fill_bitmasks,
)

PREFIX = '{"intent": "question", "confidence": 0.5, "entities": [], "answer": "hello'


def busy(seconds: float) -> None:
    """Python work that holds the GIL (the engine thread's streaming and planning stand-in)."""
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=128, help="constrained sequences in the step")
    p.add_argument("--busy-ms", type=float, default=6.0, help="the engine thread's Python work meanwhile")
    p.add_argument("--repeat", type=int, default=30)
    p.add_argument("--intervals-ms", default="5,1,0.5,0.2", help="switch intervals to try (5: the default)")
    args = p.parse_args()

    tokenizer = load_default_tokenizer()
    with GrammarCompiler(tokenizer, vocab_size=len(tokenizer)) as compiler:
        grammar = compiler.compile(GrammarSpec.json_schema(REPLY_SCHEMA))
        prefix = tokenizer.encode(PREFIX, add_special_tokens=False)
        word = tokenizer.encode(" world", add_special_tokens=False)[0]
        matchers = []
        for _ in range(args.rows):
            matcher = grammar.new_matcher()
            for token in prefix:
                assert matcher.accept(token)
            matchers.append(matcher)
        mask = allocate_bitmask(args.rows, compiler.vocab_size, pin_memory=False)

        def job() -> None:
            time.sleep(0.0002)  # the wait for the step's tokens (a CUDA event: the GIL is released)
            assert all(consume_tokens([(m, word) for m in matchers], 1))
            fill_bitmasks([(m, i) for i, m in enumerate(matchers)], mask, 1)
            for m in matchers:
                m._inner.rollback(1)  # back to the same state for the next round

        default = sys.getswitchinterval()
        print(f"{args.rows} rows, {args.busy_ms:g} ms of Python work beside the job, {args.repeat} rounds")
        print(f"{'switch interval ms':>18}  {'job alone ms':>12}  {'late p50 ms':>11}  {'late max ms':>11}")
        with ThreadPoolExecutor(1) as pool:
            try:
                for interval_ms in (float(x) for x in args.intervals_ms.split(",")):
                    sys.setswitchinterval(interval_ms / 1000)
                    alone = []
                    for _ in range(5):
                        start = time.perf_counter()
                        job()
                        alone.append(time.perf_counter() - start)
                    late = []
                    for _ in range(args.repeat):
                        start = time.perf_counter()
                        done = pool.submit(job)
                        busy(args.busy_ms / 1000)
                        done.result()
                        late.append(max(0.0, time.perf_counter() - start - args.busy_ms / 1000))
                    print(
                        f"{interval_ms:>18g}  {statistics.median(alone) * 1000:>12.2f}  "
                        f"{statistics.median(late) * 1000:>11.2f}  {max(late) * 1000:>11.2f}"
                    )
            finally:
                sys.setswitchinterval(default)


if __name__ == "__main__":
    main()
