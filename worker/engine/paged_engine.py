"""PagedEngine: continuous batching over a paged, prefix-shared KV cache, behind `base.Engine`.

The loop of one `step()`: stop running sequences past their deadline, let the step scheduler
plan the step, run it through the model runner, then append each sampled token, stream its
text delta and finish sequences on EOS, stop strings or max_tokens. Finished sequences leave
at once; their full KV blocks stay in the prefix cache until evicted.
"""

from __future__ import annotations

import dataclasses
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import torch

from worker.engine.attention import resolve_backend
from worker.engine.base import (
    EXTRAS,
    Engine,
    EngineCapacity,
    FinishReason,
    GenerationRequest,
    SequenceOutput,
    StepStats,
    TokenLogprob,
)
from worker.engine.block_manager import BlockManager
from worker.engine.config import EngineConfig
from worker.engine.cuda_graphs import DecodeGraphs, decode_buckets
from worker.engine.encoder import TokenizerEncoder
from worker.engine.fused_layers import fuse_model
from worker.engine.kv_cache import (
    KVCache,
    KVCacheSpec,
    num_blocks_for_budget,
    resolve_kv_dtype,
    step_workspace_bytes,
)
from worker.engine.kv_prune import block_scores
from worker.engine.model_runner import LaunchedStep, ModelRunner
from worker.engine.quant import dtype_name, weight_bytes, weights_label
from worker.engine.sequence import Sequence
from worker.engine.step_scheduler import SchedulerOutput, StepScheduler
from worker.engine.structured.gate import GrammarGate
from worker.engine.tokenize import eos_token_ids

# With CUDA graphs, new requests join a decoding batch at the latest every this many steps (or as soon
# as they fill a step's token budget): a mixed step runs eagerly and costs several graph decode steps.
DEFAULT_PREFILL_INTERVAL_STEPS = 8
# How often an otherwise idle engine polls the compiles of requests waiting for their grammar.
GRAMMAR_POLL_S = 0.002


@dataclass
class InFlightStep:
    """A launched step until the host reads it back: its plan, its device work, and where each sampled
    row's token goes."""

    plan: SchedulerOutput
    launched: LaunchedStep
    positions: dict[int, int] = field(default_factory=dict)  # scheduled index -> its token's position
    ending: dict[int, FinishReason] = field(default_factory=dict)  # rows known to end with their token
    # True if the next step cannot be planned before this one is read back: SnapKV scores of its prefill
    # chunks decide what the next step evicts. (A grammar's mask needs its tokens later, before sampling.)
    needs_host: bool = False


def logits_width(model: Any) -> int:
    """Columns of the model's logits (its output layer's vocabulary, which may exceed the tokenizer's)."""
    head = model.get_output_embeddings()
    width = getattr(head, "out_features", None) or getattr(head, "num_embeddings", None)
    return int(width or model.config.vocab_size)


class PagedEngine(Engine):
    """Iteration-level engine with chunked prefill, prefix caching and optional preemption."""

    name = "paged"
    detokenize_optional = True
    supported_extras = frozenset(EXTRAS) | {"response_format", "n"}

    def __init__(self, model: Any, tokenizer: Any, config: EngineConfig | None = None):
        """The engine around a loaded model (`model_loader.load_model`); `create_engine` loads and builds.

        `config.model` only names the model in the start-up logs here; default: its config's path.
        """
        c = self.config = config or EngineConfig()
        self.prune = c.prune_policy()
        block_size = c.kv_block_size_tokens
        self.model = model
        self.model_name = (
            c.model if config is not None else str(getattr(model.config, "_name_or_path", "") or "unknown")
        )
        self.tokenizer = tokenizer
        self._encoder = TokenizerEncoder(tokenizer, prompt_special_tokens=True)
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.eos_token_ids = eos_token_ids(model, tokenizer)
        # Raises for an INT8 cache of a model whose head_dim is not a power of two.
        spec = KVCacheSpec.from_model_config(model.config, resolve_kv_dtype(c.kv_dtype, self.dtype))
        workspace = None
        if c.kv_cache_bytes is None and self.device.type == "cuda":  # `auto`: the pool takes what is left
            graphs_on = c.cuda_graphs and resolve_backend(c.attention_backend, self.device) == "triton"
            workspace = step_workspace_bytes(
                model.config, self.dtype, max_batch_tokens=c.policy.max_batch_tokens,
                max_num_seqs=c.policy.max_num_seqs,
                graph_rows=sum(decode_buckets(c.policy.max_num_seqs)) if graphs_on else 0,
                int8_weights=weights_label(model) in ("int8", "w8a8"),
            )  # fmt: skip
        num_blocks = num_blocks_for_budget(spec, block_size, self.device, c.kv_cache_bytes, workspace)
        self.block_manager = BlockManager(num_blocks, block_size, c.enable_prefix_caching)
        self.kv_cache = KVCache(spec, num_blocks, block_size, self.device)
        self.attention_backend = resolve_backend(c.attention_backend, self.device)
        # Longest sequence a CUDA graph's block table must hold: the model's context, or the whole cache.
        self.max_model_len = min(
            getattr(model.config, "max_position_embeddings", 0) or num_blocks * block_size,
            num_blocks * block_size,
        )
        triton = self.attention_backend == "triton"
        # The Triton path swaps in fused layers where the architecture is known; `close` restores them.
        self._fused = fuse_model(model) if triton and c.fused_layers else None
        graphs = None
        if triton and self.device.type == "cuda" and c.cuda_graphs:
            graphs = DecodeGraphs(
                model, self.kv_cache, c.policy.max_num_seqs, -(-self.max_model_len // block_size)
            )
        # Structured output: nothing is built until the first request with a grammar.
        self.grammars = GrammarGate(
            tokenizer,
            logits_width(model),
            self.eos_token_ids,
            c.policy.max_num_seqs,
            self.device,
            threads=c.grammar_threads,
        )
        self.runner = ModelRunner(
            model, self.kv_cache, self.block_manager, self.device, self.attention_backend, graphs,
            score_window=self.prune.obs_window if self.prune.mode == "snapkv" else 0, grammars=self.grammars,
            eos_token_ids=frozenset(self.eos_token_ids), max_seqs=c.policy.max_num_seqs,
        )  # fmt: skip
        if triton and self.device.type == "cuda":
            self.runner.warm_up()
        if graphs is not None:
            graphs.capture()  # after the runner registered the paged attention with the model
        self.policy = dataclasses.replace(
            c.policy,
            # Batch prefills only where decode steps replay CUDA graphs and mixed steps run eagerly.
            prefill_interval_steps=(
                c.prefill_interval_steps if c.prefill_interval_steps is not None
                else DEFAULT_PREFILL_INTERVAL_STEPS if graphs is not None else 0
            ),
        )  # fmt: skip
        self.scheduler = StepScheduler(self.policy, self.block_manager, self.prune)
        self.kv_dtype_name = dtype_name(self.kv_cache.spec.dtype)
        self._seqs: dict[str, Sequence] = {}
        # Tokens sampled by the last step, streamed by the next one (async output processing; on by
        # default where a device computes while the host works): (sequence, token, finish reason).
        # Async scheduling (on by default with CUDA; docs/benchmarks.md, "Async scheduling"): step N+1 is
        # planned and launched before step N is read back; its decode rows take their input tokens from
        # step N's sampled ids on the device, and stops are found when N is read (one step late).
        self.async_scheduling = (
            self.device.type == "cuda" if c.async_scheduling is None else c.async_scheduling
        )
        # With it, step N's tokens are streamed as soon as they are read, while N+1 computes; without,
        # async output does that by streaming them after N+1's launch.
        default_async_output = self.device.type == "cuda" and not self.async_scheduling
        self.async_output = default_async_output if c.async_output is None else c.async_output
        self.overlaps_host = self.device.type == "cuda"
        self._pending: list[tuple[Sequence, int, FinishReason | None, TokenLogprob | None]] = []
        self._in_flight: deque[InFlightStep] = deque()  # launched, not read back; oldest first
        self._ready: list[SequenceOutput] = []  # outputs of steps read back inside `submit_step`
        self._ahead = False  # the last `submit_step` launched work that `collect` need not wait for
        # Host seconds by part of the step, summed since start (`decode_step_bench.py` reports them):
        # schedule (planning), launch (inputs built and the forward and sampling queued), output
        # (reading tokens into sequences, stops, detokenizing), wait (for the device's results), other.
        self.host_seconds = dict.fromkeys(("schedule", "launch", "output", "wait", "other"), 0.0)
        self._stats = StepStats()
        self._admitted_prompt_tokens = 0
        self._admitted_cached_tokens = 0

    def encoder(self) -> TokenizerEncoder:
        return self._encoder

    def add_request(self, request: GenerationRequest) -> None:
        if request.seq_id in self._seqs:
            raise ValueError(f"duplicate request id {request.seq_id!r}")
        budget = self.prune.budget_of(request.kv_budget_tokens)
        problem = self.prune.budget_problem(budget)
        if problem:
            raise ValueError(problem)
        detokenize = request.detokenize or bool(request.sampling.stop)  # stop strings are matched on text
        seq = Sequence(request, self.tokenizer if detokenize else None)
        seq.kv_budget_tokens = budget
        self._seqs[request.seq_id] = seq
        if seq.grammar is not None:
            self.grammars.hold(seq)  # joins the scheduler once its grammar is compiled (`submit_step`)
        else:
            self.scheduler.add(seq)

    def abort_request(self, seq_id: str, reason: FinishReason = "cancelled") -> SequenceOutput | None:
        seq = self._seqs.get(seq_id)
        if seq is not None:
            self.grammars.drop(seq)
        if seq is None:  # unknown, or ended with its final output still pending
            seq = next((p[0] for p in self._pending if p[0].seq_id == seq_id), None)
        return None if seq is None else self._finish(seq, reason)

    def step(self) -> list[SequenceOutput]:
        """One iteration: `submit_step()` then `collect()`."""
        self.submit_step()
        return self.collect()

    def submit_step(self) -> None:
        """Plan the next step and queue its forward and sampling on the device; returns at once.

        Requests whose deadline passed, that can never fit, or that outgrew the cache end here; their
        final outputs come with `collect()`. With async scheduling the previous step may still be on the
        device: it is read back first only where the plan needs its tokens (`InFlightStep.needs_host`).
        """
        now = time.monotonic()
        start = time.perf_counter()
        self._sample_deferred()
        outputs = [
            self._finish(seq, "deadline_exceeded")
            for seq in list(self.scheduler.running)
            if seq.deadline_s is not None and seq.deadline_s <= now
        ]
        if not self.async_scheduling or any(step.needs_host for step in self._in_flight):
            self._read_back()
        outputs += self._admit_constrained(now)
        planned = time.perf_counter()
        plan = self.scheduler.schedule(now)
        for seq in plan.preempted:  # rebuilt from its tokens when it runs again: rows stay <= running
            self.runner.penalties.release(seq.seq_id)
        outputs += [self._finish(seq, "deadline_exceeded") for seq in plan.expired]
        outputs += [self._finish(seq, "too_long") for seq in plan.rejected]
        outputs += [self._finish(seq, "length") for seq in plan.cache_full]
        self._record_stats(plan)
        self._ready += outputs  # finals now: any token of theirs not read back yet is dropped
        prev = self._in_flight[-1].launched.tokens if self._in_flight else None
        launch = time.perf_counter()
        try:
            # With async scheduling a step with constrained rows queues only its forward: it is sampled
            # at the start of the next call (`_sample_deferred`), once this thread has streamed and
            # planned meanwhile, while the grammar gate's thread fills the masks the sampling needs.
            launched = self.runner.launch(plan.scheduled, prev, defer_sampling=self.async_scheduling)
        except Exception:
            self._unpublish(plan)
            raise
        self._ahead = bool(plan.scheduled)  # this step computes: `collect` may leave it on the device
        if plan.scheduled:
            self._in_flight.append(self._advance(plan, launched))
        host = self.host_seconds
        host["schedule"] += launch - planned
        host["launch"] += time.perf_counter() - launch
        host["other"] += planned - start

    def _sample_deferred(self) -> None:
        """Queue the sampling the last step deferred (`ModelRunner.launch`), before anything reads its
        tokens: the next forward, a read back."""
        if not self._in_flight or self._in_flight[-1].launched.unsampled is None:
            return
        step = self._in_flight[-1]
        begin = time.perf_counter()
        try:
            self.runner.sample(step.launched)
        except Exception:
            self._unpublish(step.plan)
            raise
        self.host_seconds["launch"] += time.perf_counter() - begin

    def _read_back(self) -> None:
        """Read back every step still in flight (the outputs go with `collect`)."""
        while self._in_flight:
            self._ready += self._retire(self._in_flight.popleft())

    def _advance(self, plan: SchedulerOutput, launched: LaunchedStep) -> InFlightStep:
        """Move each scheduled sequence past this step before its tokens are known: its computed tokens,
        and a `FUTURE_TOKEN` for each token sampled. A sequence this token brings to `max_tokens` leaves
        the scheduler now (its final comes when the token is read back), so no later step plans it."""
        step = InFlightStep(plan, launched)
        step.needs_host = bool(launched.scores)
        for item in plan.scheduled:
            item.seq.num_computed_tokens = item.start + item.num_tokens
        for k, index in enumerate(launched.rows):
            seq = plan.scheduled[index].seq
            if seq.finish_reason is not None:
                continue  # ended while this step was launched (`_read_back`): its token is dropped
            step.positions[index] = seq.add_future_token(k)
            if seq.num_completion_tokens >= seq.sampling.max_tokens:
                step.ending[index] = "length"
                self.scheduler.finish(seq)  # blocks freed: later steps run after this one on the device
                self.runner.penalties.release(seq.seq_id)
        return step

    def collect(self) -> list[SequenceOutput]:
        """Read back the submitted steps, all but the newest with async scheduling (it keeps the device
        busy meanwhile), and return their outputs; with `async_output`, the tokens of the step before.

        Detokenizing and building the outputs of N sampled tokens is host work proportional to the
        batch; done while the device computes the next step (vLLM's async output processing, or here
        async scheduling), it costs no step time. Stop tokens are checked when a step is read back, so
        with async scheduling a sequence that stopped has one more token computed meanwhile, which is
        dropped, like the token after a stop string or a completed grammar; `max_tokens` is known at
        launch and costs nothing. Between `submit_step()` and `collect()` the caller may add and abort
        requests: an aborted sequence's tokens not read back yet are dropped.
        """
        outputs, self._ready = self._ready, []
        launched, self._ahead = self._ahead, False
        keep = 1 if self.async_scheduling and launched else 0
        while len(self._in_flight) > keep:
            outputs += self._retire(self._in_flight.popleft())
        if not self.async_output or not launched:  # nothing computes meanwhile: stream them now
            start = time.perf_counter()
            outputs += self._emit_pending()
            self.host_seconds["output"] += time.perf_counter() - start
        return outputs

    def _retire(self, step: InFlightStep) -> list[SequenceOutput]:
        """Read one step back (the only wait for the device) and give each sampled token to its sequence."""
        plan, launched = step.plan, step.launched
        if launched.unsampled is not None:
            raise RuntimeError("a step is read back before its deferred sampling was queued")
        start = time.perf_counter()
        try:
            outputs = self._emit_pending()  # host work while the device runs this step
            waiting = time.perf_counter()
            sampled, logprobs = launched.result()
        except Exception:
            self._unpublish(plan)
            raise
        read = time.perf_counter()
        self.host_seconds["wait"] += read - waiting
        bs = self.block_manager.block_size
        for index, token_scores in launched.scores.items():
            if not plan.scheduled[index].seq.is_finished:
                plan.scheduled[index].seq.block_scores = block_scores(token_scores, bs)
        for index, (item, token, logprob) in enumerate(zip(plan.scheduled, sampled, logprobs, strict=True)):
            seq = item.seq
            if token is None or seq.finish_reason is not None:
                continue  # mid-prefill, or a stop string, an abort or a deadline ended it meanwhile
            position, end = step.positions[index], seq.grammar_end
            if end is not None and position > end[1]:  # computed past the token that ended its grammar
                outputs.append(self._finish(seq, end[0]))
                continue
            seq.resolve_token(position, token)
            grammar_reason = end[0] if end is not None else None  # this token completed (or broke) it
            reason = self._stop_reason(seq, token) or grammar_reason or step.ending.get(index)
            if reason is not None:
                self._release(seq, reason)  # frees its slot and blocks before the next step is planned
            self._pending.append((seq, token, reason, logprob))
        self.host_seconds["output"] += waiting - start + time.perf_counter() - read
        return outputs

    def _admit_constrained(self, now: float) -> list[SequenceOutput]:
        """Hand the scheduler the held requests whose grammar is compiled; end those whose grammar failed
        (`invalid_request`, naming `response_format`) or whose deadline passed while it compiled."""
        if not self.grammars.held:
            return []
        started, failed = self.grammars.ready()
        for seq in started:
            self.scheduler.add(seq)
        outputs = []
        for seq, why in failed:
            out = self._finish(seq, "invalid_request")
            out.error, out.error_param = f"response_format: {why}", "response_format"
            outputs.append(out)
        for seq in self.grammars.held:
            if seq.deadline_s is not None and seq.deadline_s <= now:
                self.grammars.drop(seq)
                outputs.append(self._finish(seq, "deadline_exceeded"))
        return outputs

    def _unpublish(self, plan: SchedulerOutput) -> None:
        """This step's K/V writes may be incomplete: no later request may reuse those blocks."""
        for item in plan.scheduled:
            self.block_manager.unpublish(item.seq, item.start // self.block_manager.block_size)

    def take_unstarted(self) -> list[str]:
        unstarted = self.scheduler.take_unstarted() + self.grammars.held
        for seq in unstarted:
            self.grammars.drop(seq)
            self._seqs.pop(seq.seq_id, None)
        return [seq.seq_id for seq in unstarted]

    def wake_at_s(self) -> float | None:
        if self.scheduler.running or self._pending or self._in_flight or self._ready:
            return None
        if self.grammars.held:
            if self.grammars.any_done():
                return None  # a step now admits it (or ends it, if its grammar failed)
            soon = time.monotonic() + GRAMMAR_POLL_S  # poll the compiles soon, without spinning meanwhile
            return soon if self.scheduler.wake_at_s is None else min(soon, self.scheduler.wake_at_s)
        return self.scheduler.wake_at_s

    def has_unfinished(self) -> bool:
        return (
            self.scheduler.has_unfinished()
            or bool(self._pending or self._in_flight or self._ready)
            or bool(self.grammars.held)
        )

    def _emit_pending(self) -> list[SequenceOutput]:
        pending, self._pending = self._pending, []
        return [self._emit(seq, token, reason, logprob) for seq, token, reason, logprob in pending]

    def _emit(
        self, seq: Sequence, token: int, reason: FinishReason | None, logprob: TokenLogprob | None = None
    ) -> SequenceOutput:
        """The output of one sampled token: its text delta, and the final reply if the sequence ended."""
        delta = seq.decode_token(token)
        if reason is None and seq.detokenizer is not None and seq.detokenizer.stopped:
            reason = "stop"
            self._release(seq, reason)
        if reason is None:
            out = self._output(seq, [token], delta)
        else:
            if not seq.is_finished:
                self._release(seq, reason)
            out = self._final(seq, reason, [token], delta)
        if logprob is not None:
            out.logprobs = [logprob]
        return out

    def capacity(self) -> EngineCapacity:
        bs = self.block_manager.block_size
        return EngineCapacity(
            running=len(self.scheduler.running),
            decode_tokens=len(self.scheduler.running),
            free_kv_tokens=self.block_manager.num_free_blocks * bs,
            total_kv_tokens=self.block_manager.num_blocks * bs,
            waiting=len(self.scheduler.waiting),
            cached_kv_tokens=len(self.block_manager.evictable) * bs,
        )

    def last_step_stats(self) -> StepStats:
        return self._stats

    def describe(self) -> dict[str, str | int]:
        return {
            "model": self.model_name, "device": str(self.device), "dtype": dtype_name(self.dtype),
            "weights": weights_label(self.model), "weight_bytes": weight_bytes(self.model),
            "kv_dtype": dtype_name(self.kv_cache.spec.dtype), "kv_pool_bytes": self.kv_cache.nbytes,
            "kv_blocks": self.block_manager.num_blocks,
        }  # fmt: skip

    def close(self) -> None:
        for seq_id in list(self._seqs):
            self.abort_request(seq_id)
        self._pending.clear()
        self._in_flight.clear()
        self._ready.clear()
        self.grammars.close()
        self.runner.model = None
        self.runner.graphs = None
        if self._fused is not None:
            self._fused.restore()
        self.kv_cache.release()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _stop_reason(self, seq: Sequence, token: int) -> FinishReason | None:
        # EOS and `stop_token_ids` are masked by the sampler until `min_tokens`; they stop the reply after.
        if not seq.sampling.ignore_eos and token in self.eos_token_ids:
            return "stop"
        if token in seq.sampling.stop_token_ids:
            return "stop"
        # A token that completes the grammar is found by the grammar gate's job (`GrammarGate`), which
        # consumes the step's tokens beside this thread and sets `seq.grammar_end`.
        if seq.detokenizer is not None and seq.detokenizer.stopped:
            return "stop"
        return None  # `max_tokens` is found when the step is launched (`_advance`)

    def _output(self, seq: Sequence, new_token_ids: list[int], delta: str) -> SequenceOutput:
        return SequenceOutput(
            seq_id=seq.seq_id,
            new_token_ids=new_token_ids,
            new_text=delta,
            prompt_tokens=seq.num_prompt_tokens,
            completion_tokens=seq.num_resolved_tokens - seq.num_prompt_tokens,
            cached_tokens=seq.cached_tokens,
            kv_dtype=self.kv_dtype_name,
            kv_peak_tokens=seq.kv_peak_tokens,
            kv_evicted_tokens=seq.kv_evicted_tokens,
        )

    def _finish(self, seq: Sequence, reason: FinishReason) -> SequenceOutput:
        """End a sequence now; a token it sampled but has not streamed yet goes out with the final reply."""
        entry = next((e for e in self._pending if e[0] is seq), None)
        if entry is not None:
            self._pending.remove(entry)
            return self._emit(seq, entry[1], entry[2] or reason, entry[3])
        self._release(seq, reason)
        return self._final(seq, reason, [], "")

    def _release(self, seq: Sequence, reason: FinishReason) -> None:
        """Take the sequence out of the engine (slot and blocks freed); its final output may come later."""
        self.scheduler.finish(seq)
        self.runner.penalties.release(seq.seq_id)
        self.grammars.release(seq)
        seq.drop_future_tokens()
        seq.finish_reason = reason
        self._seqs.pop(seq.seq_id, None)

    def _final(
        self, seq: Sequence, reason: FinishReason, new_token_ids: list[int], delta: str
    ) -> SequenceOutput:
        if seq.detokenizer is not None:
            delta += seq.detokenizer.flush()
        out = self._output(seq, new_token_ids or [], delta)
        out.finished = True
        out.finish_reason = reason
        out.text = seq.detokenizer.text if seq.detokenizer is not None else ""
        return out

    def _record_stats(self, plan: SchedulerOutput) -> None:
        self._admitted_prompt_tokens += plan.admitted_prompt_tokens
        self._admitted_cached_tokens += plan.cached_tokens
        hit_rate = self._admitted_cached_tokens / max(self._admitted_prompt_tokens, 1)
        self._stats = StepStats(
            num_seqs=len(plan.scheduled),
            prefill_tokens=plan.prefill_tokens,
            decode_tokens=plan.decode_tokens,
            cached_tokens=plan.cached_tokens,
            admitted=tuple(plan.admitted),
            extra={
                "prefix_hit_rate": hit_rate,
                "preempted": float(len(plan.preempted)),
                "running": float(len(self.scheduler.running)),
                "waiting": float(len(self.scheduler.waiting)),
                "free_kv_blocks": float(self.block_manager.num_free_blocks),
                "kv_blocks_used": float(self.block_manager.num_blocks - self.block_manager.num_free_blocks),
            },
        )
