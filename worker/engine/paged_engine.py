"""PagedEngine: continuous batching over a paged, prefix-shared KV cache, behind `base.Engine`.

The loop of one `step()`: stop running sequences past their deadline, let the step scheduler
plan the step, run it through the model runner, then append each sampled token, stream its
text delta and finish sequences on EOS, stop strings or max_tokens. Finished sequences leave
at once; their full KV blocks stay in the prefix cache until evicted.
"""

from __future__ import annotations

import dataclasses
import time
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
from worker.engine.cuda_graphs import DecodeGraphs
from worker.engine.encoder import TokenizerEncoder
from worker.engine.fused_layers import fuse_model
from worker.engine.kv_cache import (
    KVCache,
    KVCacheSpec,
    num_blocks_for_budget,
    resolve_kv_dtype,
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
        num_blocks = num_blocks_for_budget(spec, block_size, self.device, c.kv_cache_bytes)
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
        self.async_output = self.device.type == "cuda" if c.async_output is None else c.async_output
        self.overlaps_host = self.device.type == "cuda"
        self._pending: list[tuple[Sequence, int, FinishReason | None, TokenLogprob | None]] = []
        self._in_flight: tuple[SchedulerOutput, LaunchedStep, list[SequenceOutput]] | None = None
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
        final outputs come with `collect()`.
        """
        now = time.monotonic()
        outputs = [
            self._finish(seq, "deadline_exceeded")
            for seq in list(self.scheduler.running)
            if seq.deadline_s is not None and seq.deadline_s <= now
        ]
        outputs += self._admit_constrained(now)
        plan = self.scheduler.schedule(now)
        for seq in plan.preempted:  # rebuilt from its tokens when it runs again: rows stay <= running
            self.runner.penalties.release(seq.seq_id)
        outputs += [self._finish(seq, "deadline_exceeded") for seq in plan.expired]
        outputs += [self._finish(seq, "too_long") for seq in plan.rejected]
        outputs += [self._finish(seq, "length") for seq in plan.cache_full]
        self._record_stats(plan)
        try:
            launched = self.runner.launch(plan.scheduled)
        except Exception:
            self._unpublish(plan)
            raise
        self._in_flight = (plan, launched, outputs)

    def collect(self) -> list[SequenceOutput]:
        """Wait for the submitted step; with `async_output`, return the tokens the previous step sampled.

        Detokenizing and building the outputs of N sampled tokens is host work proportional to the
        batch; done while the device computes the next step (vLLM's async output processing), it
        costs no step time. Stop tokens and length are checked at once, so a finished sequence never
        takes a step's slot; a stop string, and a grammar that the token completed, are found one step
        later, and the one token their sequence computed meanwhile is dropped. Between `submit_step()`
        and `collect()` the caller may add and abort requests: an aborted sequence's token from this step
        is dropped.
        """
        if self._in_flight is None:
            return []
        plan, launched, outputs = self._in_flight
        self._in_flight = None
        try:
            outputs += self._emit_pending()  # host work while the device runs this step
            sampled, logprobs = launched.result()
        except Exception:
            self._unpublish(plan)
            raise
        bs = self.block_manager.block_size
        for index, token_scores in launched.scores.items():
            if not plan.scheduled[index].seq.is_finished:
                plan.scheduled[index].seq.block_scores = block_scores(token_scores, bs)
        for item, token, logprob in zip(plan.scheduled, sampled, logprobs, strict=True):
            seq = item.seq
            if seq.is_finished:
                continue  # a stop string or an abort ended it while this step ran
            if seq.grammar_end is not None:  # its grammar ended the reply with the previous token
                outputs.append(self._finish(seq, seq.grammar_end))
                continue
            seq.num_computed_tokens = item.start + item.num_tokens
            if token is None:
                continue
            seq.token_ids.append(token)
            reason = self._stop_reason(seq, token)
            if reason is not None:
                self._release(seq, reason)  # frees its slot and blocks before the next step is planned
            self._pending.append((seq, token, reason, logprob))
        if not self.async_output:
            outputs += self._emit_pending()
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
        if self.scheduler.running or self._pending:
            return None
        if self.grammars.held:
            if self.grammars.any_done():
                return None  # a step now admits it (or ends it, if its grammar failed)
            soon = time.monotonic() + GRAMMAR_POLL_S  # poll the compiles soon, without spinning meanwhile
            return soon if self.scheduler.wake_at_s is None else min(soon, self.scheduler.wake_at_s)
        return self.scheduler.wake_at_s

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished() or bool(self._pending) or bool(self.grammars.held)

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
        if seq.matcher is not None:
            # Consumed by the next step's mask, while its forward runs (`GrammarGate.mask`); a reply the
            # token completes (or a refused token: the mask was bypassed, a bug) ends when that step is
            # read back, its one extra token dropped (`collect`).
            seq.grammar_token = token
        if seq.detokenizer is not None and seq.detokenizer.stopped:
            return "stop"
        if seq.num_completion_tokens >= seq.sampling.max_tokens:
            return "length"
        return None

    def _output(self, seq: Sequence, new_token_ids: list[int], delta: str) -> SequenceOutput:
        return SequenceOutput(
            seq_id=seq.seq_id,
            new_token_ids=new_token_ids,
            new_text=delta,
            prompt_tokens=seq.num_prompt_tokens,
            completion_tokens=seq.num_completion_tokens,
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
