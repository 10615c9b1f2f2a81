"""Every engine owns admission with the worker's one BatchPolicy: aging, deadlines, window, hand-back.

Run on the echo engine (the same AdmissionQueue serves the static engine) and on the paged engine's
step scheduler, which applies the same policy with exact KV accounting.
"""

from __future__ import annotations

import time

import pytest

from scheduler import BatchPolicy, Priority
from worker.engine.base import GenerationRequest, SamplingParams
from worker.engine.block_manager import BlockManager
from worker.engine.config import EngineConfig
from worker.engine.echo_engine import EchoEngine
from worker.engine.sequence import Sequence
from worker.engine.step_scheduler import StepScheduler


def request(
    rid: str, arrival_s: float, priority: Priority = Priority.INTERACTIVE, **kw: object
) -> GenerationRequest:
    words = b"one two three four five six seven eight"
    return GenerationRequest(
        rid, list(words), SamplingParams(max_tokens=kw.pop("max_tokens", 2)),  # type: ignore[arg-type]
        arrival_s, priority=int(priority), **kw,  # type: ignore[arg-type]
    )  # fmt: skip


def started(engine: EchoEngine) -> list[str]:
    engine.step()
    return list(engine.last_step_stats().admitted)


def test_batch_requests_age_into_service_behind_a_stream_of_interactive_ones() -> None:
    engine = EchoEngine(
        EngineConfig(engine="echo", policy=BatchPolicy(max_num_seqs=1, max_wait_ms=0, max_waiting_steps=3))
    )
    engine.add_request(request("batch", 0.0, Priority.BATCH, max_tokens=1))
    order: list[str] = []
    for i in range(8):  # a new interactive request arrives before every step
        engine.add_request(request(f"i{i}", 0.1 + i, max_tokens=1))
        order += started(engine)
    # Without aging the batch request would wait behind all eight; passed over 3 steps it goes next.
    assert order.index("batch") == 3, order


def test_waiting_requests_expire_in_the_engine() -> None:
    engine = EchoEngine(EngineConfig(engine="echo", policy=BatchPolicy(max_num_seqs=1, max_wait_ms=0)))
    engine.add_request(request("long", 0.0, max_tokens=50))
    engine.add_request(request("late", 0.0, deadline_s=0.0))  # long past on the monotonic clock
    outputs = engine.step()
    late = [o for o in outputs if o.seq_id == "late"]
    assert len(late) == 1 and late[0].finished and late[0].finish_reason == "deadline_exceeded"
    assert engine.last_step_stats().admitted == ("long",)


def test_time_window_holds_an_idle_engine_only_while_requests_keep_coming() -> None:
    engine = EchoEngine(EngineConfig(engine="echo", policy=BatchPolicy(max_wait_ms=5_000, max_num_seqs=8)))
    now = time.monotonic()
    # No estimate yet (first request): the window holds, and says until when.
    engine.add_request(request("a", now))
    engine.step()
    assert engine.last_step_stats().admitted == () and engine.wake_at_s() == pytest.approx(now + 5.0)
    # A second one 1 ms later: arrivals are dense, so the window keeps holding for more.
    engine.add_request(request("b", now + 0.001))
    assert engine.wake_at_s() is None  # adding a request asks the policy again
    engine.step()
    assert engine.last_step_stats().admitted == () and engine.wake_at_s() == pytest.approx(now + 5.0)


def test_lone_request_after_a_quiet_spell_starts_at_once() -> None:
    engine = EchoEngine(EngineConfig(engine="echo", policy=BatchPolicy(max_wait_ms=50, max_num_seqs=8)))
    now = time.monotonic()
    for i, t in enumerate((now - 30.0, now - 20.0, now - 10.0)):  # one request every 10 s
        engine.add_request(request(f"r{i}", t, max_tokens=1))
        engine.step()
    engine.add_request(request("lone", now))
    engine.step()
    assert "lone" in engine.last_step_stats().admitted and engine.wake_at_s() is None


def test_take_unstarted_returns_only_requests_that_never_ran() -> None:
    engine = EchoEngine(EngineConfig(engine="echo", policy=BatchPolicy(max_num_seqs=1, max_wait_ms=0)))
    engine.add_request(request("running", 0.0, max_tokens=5))
    engine.step()
    engine.add_request(request("waiting", 0.0))
    assert engine.take_unstarted() == ["waiting"]
    assert engine.capacity().waiting == 0 and engine.has_unfinished()  # "running" goes on


def test_step_scheduler_ages_hands_back_and_reports_admissions() -> None:
    policy = BatchPolicy(max_num_seqs=1, max_wait_ms=0, max_waiting_steps=2)
    sched = StepScheduler(policy, BlockManager(num_blocks=64, block_size=4))
    mk = lambda rid, prio, t: Sequence(  # noqa: E731
        GenerationRequest(rid, [1, 2, 3], SamplingParams(max_tokens=1), t, priority=int(prio))
    )
    sched.add(mk("batch", Priority.BATCH, 0.0))
    admitted: list[str] = []
    for i in range(4):
        sched.add(mk(f"i{i}", Priority.INTERACTIVE, 1.0 + i))
        plan = sched.schedule(10.0)
        admitted += plan.admitted
        for item in plan.scheduled:
            sched.finish(item.seq)
    assert admitted == ["i0", "i1", "batch", "i2"], admitted  # passed over twice, then served
    assert [s.seq_id for s in sched.take_unstarted()] == ["i3"] and not sched.waiting
