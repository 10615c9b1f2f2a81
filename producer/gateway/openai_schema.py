"""The OpenAI shapes the gateway reads and writes, as pydantic models.

Requests (`ChatCompletionRequest`, `CompletionRequest`) are strict: a field of the wrong JSON type is
refused, not coerced ("5" is no integer), and a field OpenAI does not define is refused by name
(`extra="forbid"`). The sampling extras (`n`, `logprobs`, penalties, `logit_bias`, `response_format`)
go to the wire, whose limits they meet there, and a worker whose engine does not honour one refuses
it by name. Fields of later work (`tools`, `echo`, ...) are declared so that `unsupported()` can name
them: set to anything but their neutral value they get 400 `unsupported_parameter`. Extensions of this
service: `top_k`, `priority`, `timeout_ms`, `repetition_penalty`, `min_tokens`, `stop_token_ids`,
`ignore_eos`, `session` (a conversation id: the wire's affinity key, docs/protocol.md).

Responses and stream chunks (`ChatCompletion`, `ChatCompletionChunk`, `Completion`) follow OpenAI's
objects field for field, so the official SDKs parse them.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr

Number = StrictInt | float  # a JSON number (strict mode: no strings, no booleans)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Strict):
    include_usage: StrictBool | None = None


class _Sampling(_Strict):
    """What chat and completions requests share."""

    model: StrictStr = Field(min_length=1, max_length=256)
    max_tokens: StrictInt | None = None
    temperature: Number | None = None
    top_p: Number | None = None
    seed: StrictInt | None = None
    stop: StrictStr | list[StrictStr] | None = None
    stream: StrictBool | None = False
    stream_options: StreamOptions | None = None
    user: StrictStr | None = Field(default=None, max_length=1024)
    # sampling extras (the wire's fields of the same names)
    n: StrictInt | None = None
    presence_penalty: Number | None = None
    frequency_penalty: Number | None = None
    logit_bias: dict[str, Number] | None = None  # token id (a string of digits) -> bias
    # extensions of this service
    top_k: StrictInt | None = None
    priority: Literal["interactive", "batch"] | None = None
    timeout_ms: StrictInt | None = None
    repetition_penalty: Number | None = None
    min_tokens: StrictInt | None = None
    stop_token_ids: list[StrictInt] | None = None
    ignore_eos: StrictBool | None = None
    session: StrictStr | None = None

    def unsupported(self) -> str | None:
        """The first field set to something this gateway does not do yet, else None."""
        return None


class ChatCompletionRequest(_Sampling):
    messages: list[Any] = Field(min_length=1)  # each checked by producer.messages.normalize_messages
    max_completion_tokens: StrictInt | None = None
    logprobs: StrictBool | None = None
    top_logprobs: StrictInt | None = None
    response_format: dict[str, Any] | None = None  # the wire's `ResponseFormat` checks it
    # later work
    tools: list[Any] | None = None
    tool_choice: Any = None
    parallel_tool_calls: StrictBool | None = None
    functions: list[Any] | None = None
    function_call: Any = None

    def unsupported(self) -> str | None:
        found = super().unsupported()
        if found is not None:
            return found
        if self.tools:
            return "tools"
        if self.tool_choice not in (None, "none"):
            return "tool_choice"
        if self.parallel_tool_calls is not None:
            return "parallel_tool_calls"
        if self.functions:
            return "functions"
        if self.function_call not in (None, "none"):
            return "function_call"
        return None


class CompletionRequest(_Sampling):
    prompt: StrictStr | list[StrictStr]
    logprobs: StrictInt | None = None  # the legacy API's: how many most likely tokens (0-5) per position
    # later work
    best_of: StrictInt | None = None
    echo: StrictBool | None = None
    suffix: StrictStr | None = None

    def unsupported(self) -> str | None:
        found = super().unsupported()
        if found is not None:
            return found
        if isinstance(self.prompt, list) and len(self.prompt) != 1:
            return "prompt"  # several prompts in one request
        if self.best_of not in (None, 1):
            return "best_of"
        if self.echo:
            return "echo"
        if self.suffix:
            return "suffix"
        return None


# Responses.


class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails = Field(default_factory=PromptTokensDetails)


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(BaseModel):
    """A chat choice's (or chunk's) `logprobs`."""

    content: list[TokenLogprob] | None
    refusal: None = None


class ChatMessageOut(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str
    refusal: None = None


class ChatChoice(BaseModel):
    index: int = 0
    message: ChatMessageOut
    logprobs: ChoiceLogprobs | None = None
    finish_reason: str


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class Delta(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["assistant"] | None = None
    content: str | None = None


class ChunkChoice(BaseModel):
    index: int = 0
    delta: Delta
    logprobs: ChoiceLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None


class CompletionLogprobs(BaseModel):
    """The legacy completions' `logprobs`: parallel lists, one entry per token."""

    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int] | None  # where each token starts in the choice's text; None without token texts


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None


class Completion(BaseModel):
    """A text completion, and (with `usage` None until the last) a chunk of a streamed one."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class Model(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "llm-stream-serve"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Model]
