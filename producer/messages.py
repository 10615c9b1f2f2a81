"""OpenAI-shaped chat messages, brought to the wire's shape (`ChatMessage`: a role and one string).

Backends written for the OpenAI API send what its SDKs accept: content as a list of text parts,
the `developer` role (OpenAI's newer name for `system`), a participant `name`. The wire keeps one
shape, so clients and the HTTP gateway normalise here, in one place:
- `developer` becomes `system`;
- a list of `{"type": "text", "text": ...}` parts is joined into one string (other part types,
  images or audio, are refused: no model served here reads them);
- `name` is accepted and dropped (the chat templates served here have no place for it).
Anything else (a missing role, a non-string text) is left for the wire's validation to refuse.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

# What clients accept as `messages`: the wire's dicts, or OpenAI's shapes of them.
Messages = Sequence[Mapping[str, Any]]

ROLE_ALIASES = {"developer": "system"}


class MessageError(ValueError):
    """A message the wire cannot carry; `param` names it the way OpenAI errors do (`messages[2].content`)."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


def _text_of(content: Any, where: str) -> Any:
    if not isinstance(content, list):
        return content  # a string, or something the wire's validation refuses
    parts: list[str] = []
    for i, part in enumerate(content):
        if (
            not isinstance(part, Mapping)
            or part.get("type") != "text"
            or not isinstance(part.get("text"), str)
        ):
            kind = part.get("type") if isinstance(part, Mapping) else type(part).__name__
            raise MessageError(
                f"only text content parts are supported, got {str(kind)[:40]!r}", f"{where}.content[{i}]"
            )
        parts.append(part["text"])
    return "".join(parts)


def normalize_messages(messages: Messages) -> list[Any]:
    """The messages in the wire's shape; items that are not mappings pass through to validation."""
    out: list[Any] = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            out.append(message)
            continue
        m = {k: v for k, v in message.items() if k != "name"}
        if isinstance(m.get("role"), str):
            m["role"] = ROLE_ALIASES.get(m["role"], m["role"])
        if "content" in m:
            m["content"] = _text_of(m["content"], f"messages[{i}]")
        out.append(m)
    return out
