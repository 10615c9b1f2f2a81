"""Encoders: from chats and prompts to token ids, apart from the engine that runs them.

An engine running in its own process (`worker/engine_process/client.py`) hands its encoder to
the worker's process at start-up, so prompts are tokenized where the requests are read and
validated, and the engine's process only schedules and runs the model. An encoder is plain,
picklable data: a tokenizer and a flag, or nothing at all for the echo engine.
"""

from __future__ import annotations

from typing import Any, Protocol

from worker.engine.tokenize import EncodeItem, batch_encode, encode_one


class Encoder(Protocol):
    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]: ...

    def encode_prompt(self, prompt: str) -> list[int]: ...

    def encode_batch(self, items: list[EncodeItem]) -> list[list[int] | Exception]: ...

    def token_text(self, token_id: int) -> str: ...


class TokenizerEncoder:
    """A model's tokenizer with its chat template (`worker.engine.tokenize`); raw prompts may or may not
    start with the tokenizer's special tokens (BOS), as the engine's model expects."""

    def __init__(self, tokenizer: Any, prompt_special_tokens: bool):
        self.tokenizer = tokenizer
        self.prompt_special_tokens = prompt_special_tokens

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        return encode_one(self.tokenizer, messages, self.prompt_special_tokens)

    def encode_prompt(self, prompt: str) -> list[int]:
        return encode_one(self.tokenizer, prompt, self.prompt_special_tokens)

    def encode_batch(self, items: list[EncodeItem]) -> list[list[int] | Exception]:
        return batch_encode(self.tokenizer, items, self.prompt_special_tokens)

    def token_text(self, token_id: int) -> str:
        """One token's text, as logprobs show it: the token decoded alone (a piece of a multi-byte
        character decodes to U+FFFD, as in vLLM's and OpenAI's logprobs)."""
        return str(self.tokenizer.decode([token_id]))


class ByteEncoder:
    """The echo engine's encoding: UTF-8 bytes of the last user message, or of the prompt."""

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        last_user = next(
            (m["content"] for m in reversed(messages) if m["role"] == "user"), messages[-1]["content"]
        )
        return list(last_user.encode("utf-8"))

    def encode_prompt(self, prompt: str) -> list[int]:
        return list(prompt.encode("utf-8"))

    def encode_batch(self, items: list[EncodeItem]) -> list[list[int] | Exception]:
        out: list[list[int] | Exception] = []
        for item in items:
            try:
                out.append(self.encode_prompt(item) if isinstance(item, str) else self.encode_chat(item))
            except Exception as exc:
                out.append(exc)
        return out

    def token_text(self, token_id: int) -> str:
        """One byte's text (U+FFFD for a byte that starts or continues a multi-byte character)."""
        return bytes([token_id]).decode("utf-8", errors="replace") if 0 <= token_id < 256 else ""
