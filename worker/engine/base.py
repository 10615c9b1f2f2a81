"""The engine interface the worker loop drives: add requests, step, read outputs.

Every engine (the paged continuous-batching engine, the static padded baseline, the
deterministic echo engine) is stepped by the same loop in `worker/loop/consumer.py`, so
the queue path, the reply stream and the tests are shared by all of them.

The engine owns admission: the worker hands it every validated request as soon as it is
read, and the engine's scheduler decides, with the worker's one `BatchPolicy`, which
waiting requests join each step (time window, token budget, sequence cap, KV, priority
aging) and which expire. A step is split in two so the loop can overlap its Redis round
trips with the device: `submit_step()` plans and launches a step, `collect()` waits for
it and returns its outputs; `step()` is the two together.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from worker.engine.encoder import Encoder
    from worker.engine.structured import GrammarSpec

# "too_long": the request can never fit this engine's KV cache; "deadline_exceeded" covers requests
# that expired while waiting as well as while running.
# "invalid_request": the engine found the request unservable after accepting it (a grammar that fails to
# compile, or times out); `SequenceOutput.error` says why.
FinishReason = Literal[
    "stop", "length", "cancelled", "deadline_exceeded", "too_long", "invalid_request", "error"
]


@dataclass(frozen=True)
class SamplingParams:
    """Per-request decoding parameters; temperature 0 means greedy.

    The fields after `ignore_eos` are the extras (`EXTRAS` names them as the wire does); at their
    defaults they cost nothing, and an engine that does not list one in `Engine.supported_extras` has
    the request refused (`invalid_request` naming the field) rather than ignore it.
    """

    max_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    # OpenAI's: added to a token's logit, times its count in the output (frequency) or once if present.
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    # transformers' / vLLM's: logits of tokens seen in the prompt or the output divided by it (> 0) when
    # positive, multiplied by it when negative.
    repetition_penalty: float = 1.0
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias added to its logit), ids unique
    min_tokens: int = 0  # EOS and `stop_token_ids` are masked until this many tokens were sampled
    stop_token_ids: tuple[int, ...] = ()  # tokens that end the reply ("stop"), as EOS does
    logprobs: bool = False  # the sampled token's log-probability, from the logits it was drawn from
    top_logprobs: int = 0  # that many most likely tokens with theirs (needs `logprobs`)

    def extras(self) -> tuple[str, ...]:
        """The extras this request sets away from their defaults (their wire names), in `EXTRAS` order."""
        used = []
        if self.presence_penalty:
            used.append("presence_penalty")
        if self.frequency_penalty:
            used.append("frequency_penalty")
        if self.repetition_penalty != 1.0:
            used.append("repetition_penalty")
        if self.logit_bias:
            used.append("logit_bias")
        if self.min_tokens:
            used.append("min_tokens")
        if self.stop_token_ids:
            used.append("stop_token_ids")
        if self.logprobs:
            used.append("logprobs")
        if self.top_logprobs:
            used.append("top_logprobs")
        return tuple(used)


# Every extra sampling control, by its wire name (`SamplingParams.extras`, `Engine.supported_extras`).
EXTRAS = (
    "presence_penalty", "frequency_penalty", "repetition_penalty", "logit_bias", "min_tokens",
    "stop_token_ids", "logprobs", "top_logprobs",
)  # fmt: skip


@dataclass(frozen=True)
class TokenLogprob:
    """One sampled token's log-probability, and the `top_logprobs` most likely tokens with theirs
    (most likely first), all from the processed logits the token was drawn from."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass
class GenerationRequest:
    """A validated request, tokenized, ready for the engine."""

    seq_id: str  # the caller's name for it, unique in the engine (the worker's: `inflight.seq_id_of`)
    prompt_token_ids: list[int]
    sampling: SamplingParams
    arrival_s: float
    priority: int = 0
    deadline_s: float | None = None
    kv_budget_tokens: int | None = None  # KV pruning budget; None = the engine's default (0 = off)
    # False: the engine returns token ids only (no text), for a caller that detokenizes them itself;
    # honoured by engines with `Engine.detokenize_optional`, and only for requests without stop strings.
    detokenize: bool = True
    # The grammar the reply must follow (`response_format`: a JSON schema, any JSON object, a regex).
    grammar: GrammarSpec | None = None


@dataclass
class SequenceOutput:
    """What one sequence produced in one engine step."""

    seq_id: str
    new_token_ids: list[int]
    new_text: str
    finished: bool = False
    finish_reason: FinishReason | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    # Full reply text; set when finished.
    text: str = ""
    # KV usage (engines with a KV cache): format, most tokens held at once, tokens evicted by pruning.
    # Keep new fields at the end: `worker/engine_process/child.pack_output` packs them in this order.
    kv_dtype: str = ""
    kv_peak_tokens: int = 0
    kv_evicted_tokens: int = 0
    # One entry per token of `new_token_ids` when the request asked for logprobs, else None.
    logprobs: list[TokenLogprob] | None = None
    # Finish reason "invalid_request": what is wrong with the request, and the request field at fault.
    error: str = ""
    error_param: str | None = None


@dataclass(frozen=True)
class StepSample:
    """One engine step, for the metrics: its wall time and what it computed."""

    seconds: float
    num_seqs: int = 0
    prefill_tokens: int = 0
    decode_tokens: int = 0
    preempted: int = 0
    # Of `seconds`, the host's part: planning and launching the step (`submit_step`); the rest is the wait
    # for the device and the output processing of `collect`.
    host_seconds: float = 0.0


@dataclass
class StepStats:
    """Counters of the last step, for the `batch_done` log event."""

    num_seqs: int = 0
    prefill_tokens: int = 0
    decode_tokens: int = 0
    cached_tokens: int = 0
    admitted: tuple[str, ...] = ()  # requests this step started for the first time (one microbatch)
    extra: dict[str, float] = field(default_factory=dict)
    # An engine in its own process reports every step it ran since the last report: their count and
    # samples (wall time and shape); an engine stepped by the loop reports one step, timed by the loop.
    steps: int = 1
    samples: tuple[StepSample, ...] = ()

    @property
    def step_s(self) -> tuple[float, ...]:
        """The reported steps' wall times (seconds)."""
        return tuple(s.seconds for s in self.samples)


@dataclass(frozen=True)
class EngineCapacity:
    """What admission may still hand the engine without overrunning its memory."""

    running: int
    decode_tokens: int
    free_kv_tokens: int | None
    total_kv_tokens: int | None
    waiting: int = 0  # requests handed over that have not started yet
    cached_kv_tokens: int | None = None  # of the free ones, those holding a reusable prefix (live stats)


class Engine(abc.ABC):
    """Iteration-level engine: the caller adds requests and calls `step()` until idle."""

    name: str = "engine"
    eos_token_ids: frozenset[int] = frozenset()
    # True when `submit_step()` returns before the step's work is done (a device computes it), so the
    # loop publishes the previous step's outputs meanwhile; engines that compute in `submit_step()`
    # have their outputs published in the same iteration.
    overlaps_host: bool = False
    # True when the engine steps on its own (in its own process) and times its steps itself
    # (`StepStats.step_s`); the loop then does not take its submit-to-collect time for a step's.
    times_own_steps: bool = False
    # True when the engine honours `GenerationRequest.detokenize=False` (token ids only, no text).
    detokenize_optional: bool = False
    # The sampling extras (`EXTRAS`) this engine honours; a request setting any other is refused.
    supported_extras: frozenset[str] = frozenset()
    _collected: list[SequenceOutput] | None = None

    def encoder(self) -> Encoder:
        """How this engine turns chats and prompts into token ids (`worker/engine/encoder.py`): a
        picklable object, so an engine in its own process hands it to the worker's process."""
        raise NotImplementedError(f"the {self.name} engine has no encoder of its own")

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        """Token ids of a chat, with the model's chat template and the generation prompt."""
        return self.encoder().encode_chat(messages)

    def encode_prompt(self, prompt: str) -> list[int]:
        """Token ids of a raw completion prompt."""
        return self.encoder().encode_prompt(prompt)

    def encode_batch(self, items: list[list[dict[str, str]] | str]) -> list[list[int] | Exception]:
        """Token ids of many chats (message lists) and prompts (strings), or the exception of each failure.

        Engines with a tokenizer encode them in one parallel call (`worker.engine.tokenize`).
        """
        return self.encoder().encode_batch(items)

    @abc.abstractmethod
    def add_request(self, request: GenerationRequest) -> None:
        """Queue a request; the engine's scheduler starts it at a later step."""

    @abc.abstractmethod
    def abort_request(self, seq_id: str, reason: FinishReason = "cancelled") -> SequenceOutput | None:
        """Stop a request, waiting or running, and free its resources; its final output if it was known.

        Safe between `submit_step()` and `collect()`: the step in flight drops the request's token.
        """

    @abc.abstractmethod
    def step(self) -> list[SequenceOutput]:
        """Run one iteration; returns the outputs of every sequence that produced tokens or finished."""

    def submit_step(self) -> None:
        """Plan and launch one step; `collect()` returns its outputs. Engines without a device run it here."""
        self._collected = self.step()

    def collect(self) -> list[SequenceOutput]:
        """Wait for the step launched by `submit_step()` and return its outputs ([] if none was launched)."""
        outputs, self._collected = self._collected or [], None
        return outputs

    @abc.abstractmethod
    def take_unstarted(self) -> list[str]:
        """Remove every waiting request that has produced nothing yet and return their ids (no outputs).

        A warm shutdown hands these back to the queue, where another worker serves them.
        """

    @abc.abstractmethod
    def wake_at_s(self) -> float | None:
        """When the time window holds every waiting request of an idle engine: when to step again.

        None when a step now can make progress (or there is nothing to do). Adding a request clears it.
        """

    @abc.abstractmethod
    def has_unfinished(self) -> bool:
        """True while any request is waiting or running inside the engine."""

    @abc.abstractmethod
    def capacity(self) -> EngineCapacity:
        """Current load and free KV capacity, for admission control."""

    def last_step_stats(self) -> StepStats:
        """Counters of the most recent step."""
        return StepStats()

    def check_alive(self) -> None:
        """Raise if the engine can no longer serve (an engine in its own process whose process died); an
        engine in the worker's process always can. Called every loop iteration, so it must be cheap."""
        return None

    def describe(self) -> dict[str, str | int]:
        """What the engine runs, for the start-up logs (`engine_ready`, `worker_started`).

        Model engines name `model`, `device`, `dtype` (activations), `weights` and `kv_dtype` (fp16,
        int8...) and `weight_bytes` (the model's parameters and buffers, each storage once); engines
        with a preallocated KV pool add `kv_pool_bytes` and `kv_blocks`.
        """
        return {}

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release model memory; engines without resources need not override."""
