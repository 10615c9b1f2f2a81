"""Static padded microbatches on transformers with its own KV cache (the baseline engine).

A batch is formed when the engine is idle, left-padded, prefilled once, and decoded
step by step until its last member finishes; requests that arrive meanwhile wait for
the next batch. This is what `generate()` with padded batches does, written as
steps so the worker can stream tokens. The paged engine replaces it for serving; it
stays as the benchmark baseline and as a fallback for models the paged attention
does not cover.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch

from scheduler import RunningState
from worker.engine.admission_queue import AdmissionQueue
from worker.engine.base import (
    Engine,
    EngineCapacity,
    FinishReason,
    GenerationRequest,
    SequenceOutput,
    StepStats,
)
from worker.engine.config import EngineConfig
from worker.engine.detokenizer import IncrementalDetokenizer
from worker.engine.model_files import LoadedModel
from worker.engine.quant import dtype_name, weight_bytes, weights_label
from worker.engine.sampler import sample_next_tokens
from worker.engine.tokenize import batch_encode, encode_one, eos_token_ids


def chat_token_ids(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    """Token ids of a chat with the model's template and the assistant generation prompt (content as text)."""
    return encode_one(tokenizer, messages, prompt_special_tokens=False)


@dataclass
class _Row:
    request: GenerationRequest
    detok: IncrementalDetokenizer
    produced: list[int]
    finished: bool = False


class StaticBatchEngine(Engine):
    """Padded static batching over transformers' DynamicCache."""

    name = "static"

    def __init__(self, loaded: LoadedModel, config: EngineConfig | None = None):
        config = config or EngineConfig(engine="static", model=loaded.source)
        self.model = loaded.model
        self.model_name = config.model
        self.tokenizer = loaded.tokenizer
        self.device = torch.device(config.device)
        self.policy = config.policy
        self.eos_token_ids = eos_token_ids(self.model, self.tokenizer)
        self._pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self._waiting = AdmissionQueue(self.policy)
        self._rows: list[_Row] = []
        self._cache: Any = None
        self._mask: torch.Tensor | None = None
        self._stats = StepStats()

    def describe(self) -> dict[str, str | int]:
        dtype = next(self.model.parameters()).dtype  # transformers' cache holds K/V in the model dtype
        return {
            "model": self.model_name, "device": str(self.device), "dtype": dtype_name(dtype),
            "weights": weights_label(self.model), "weight_bytes": weight_bytes(self.model),
            "kv_dtype": dtype_name(dtype),
        }  # fmt: skip

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        return chat_token_ids(self.tokenizer, messages)

    def encode_prompt(self, prompt: str) -> list[int]:
        return encode_one(self.tokenizer, prompt, prompt_special_tokens=False)

    def encode_batch(self, items: list[list[dict[str, str]] | str]) -> list[list[int] | Exception]:
        return batch_encode(self.tokenizer, items, prompt_special_tokens=False)

    def add_request(self, request: GenerationRequest) -> None:
        self._waiting.add(request)

    def abort_request(self, seq_id: str, reason: FinishReason = "cancelled") -> SequenceOutput | None:
        req = self._waiting.remove(seq_id)
        if req is not None:
            return SequenceOutput(seq_id, [], "", True, reason, len(req.prompt_token_ids), 0)
        for row in self._rows:
            if row.request.seq_id == seq_id and not row.finished:
                return self._finish(row, reason, [], "")
        return None

    def take_unstarted(self) -> list[str]:
        return self._waiting.take_all()

    def wake_at_s(self) -> float | None:
        return None if self._busy() else self._waiting.wake_at_s

    def has_unfinished(self) -> bool:
        return bool(len(self._waiting)) or self._busy()

    def _busy(self) -> bool:
        return any(not r.finished for r in self._rows)

    def capacity(self) -> EngineCapacity:
        running = sum(not r.finished for r in self._rows)
        return EngineCapacity(
            running=running,
            decode_tokens=running,
            free_kv_tokens=None,
            total_kv_tokens=None,
            waiting=len(self._waiting),
        )

    def last_step_stats(self) -> StepStats:
        return self._stats

    def _finish(self, row: _Row, reason: FinishReason, new_ids: list[int], delta: str) -> SequenceOutput:
        row.finished = True
        delta += row.detok.flush()
        return SequenceOutput(
            seq_id=row.request.seq_id,
            new_token_ids=new_ids,
            new_text=delta,
            finished=True,
            finish_reason=reason,
            prompt_tokens=len(row.request.prompt_token_ids),
            completion_tokens=len(row.produced),
            text=row.detok.text,
        )

    @torch.inference_mode()
    def step(self) -> list[SequenceOutput]:
        if self._busy():
            return self._decode()
        # A static batch forms only on an idle engine; the policy picks its members.
        self._rows, self._cache, self._mask = [], None, None
        decision = self._waiting.admit(RunningState(), time.monotonic())
        outputs = [SequenceOutput(r.seq_id, [], "", True, "deadline_exceeded", len(r.prompt_token_ids))
                   for r in decision.expired]  # fmt: skip
        self._stats = StepStats()
        if decision.started:
            outputs += self._prefill(decision.started)
        return outputs

    def _prefill(self, batch: list[GenerationRequest]) -> list[SequenceOutput]:
        longest = max(len(r.prompt_token_ids) for r in batch)
        ids = torch.full((len(batch), longest), self._pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), longest), dtype=torch.long)
        for i, r in enumerate(batch):
            n = len(r.prompt_token_ids)
            ids[i, longest - n :] = torch.tensor(r.prompt_token_ids)
            mask[i, longest - n :] = 1
        self._rows = [
            _Row(r, IncrementalDetokenizer(self.tokenizer, r.prompt_token_ids, r.sampling.stop), [])
            for r in batch
        ]
        self._mask = mask.to(self.device)
        self._stats = StepStats(
            num_seqs=len(batch), prefill_tokens=int(mask.sum()), admitted=tuple(r.seq_id for r in batch)
        )
        return self._forward(ids.to(self.device))

    def _decode(self) -> list[SequenceOutput]:
        assert self._mask is not None
        last = [r.produced[-1] if r.produced else self._pad_id for r in self._rows]
        new_column = torch.ones((len(self._rows), 1), dtype=torch.long, device=self.device)
        self._mask = torch.cat([self._mask, new_column], 1)
        self._stats = StepStats(
            num_seqs=sum(not r.finished for r in self._rows), decode_tokens=len(self._rows)
        )
        return self._forward(torch.tensor(last, device=self.device).unsqueeze(1))

    def _forward(self, input_ids: torch.Tensor) -> list[SequenceOutput]:
        assert self._mask is not None
        positions = (self._mask.cumsum(-1) - 1).clamp(min=0)[:, -input_ids.shape[1] :]
        out = self.model(
            input_ids=input_ids,
            attention_mask=self._mask,
            position_ids=positions,
            past_key_values=self._cache,
            use_cache=True,
        )
        self._cache = out.past_key_values
        logits = out.logits[:, -1, :]
        tokens = sample_next_tokens(
            logits, [r.request.sampling for r in self._rows], [len(r.produced) for r in self._rows]
        )
        now = time.monotonic()
        outputs: list[SequenceOutput] = []
        for row, token in zip(self._rows, tokens, strict=True):
            if row.finished:
                continue
            deadline = row.request.deadline_s
            if deadline is not None and now >= deadline:
                outputs.append(self._finish(row, "deadline_exceeded", [], ""))
                continue
            sampling = row.request.sampling
            if token in self.eos_token_ids and not sampling.ignore_eos:
                outputs.append(self._finish(row, "stop", [], ""))
                continue
            row.produced.append(token)
            delta = row.detok.add(token)
            if row.detok.stopped:
                outputs.append(self._finish(row, "stop", [token], delta))
            elif len(row.produced) >= sampling.max_tokens:
                outputs.append(self._finish(row, "length", [token], delta))
            else:
                outputs.append(
                    SequenceOutput(
                        row.request.seq_id,
                        [token],
                        delta,
                        prompt_tokens=len(row.request.prompt_token_ids),
                        completion_tokens=len(row.produced),
                    )
                )
        return outputs
