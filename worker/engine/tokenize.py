"""Tokenizing many requests at once: one call into the Rust tokenizer, which encodes them in parallel.

A worker reads up to `read_count` requests per call and tokenizes them while the device runs a
step; encoded one by one under the GIL, a few hundred long prompts take longer than several decode
steps. Chats are rendered with the model's chat template first (Python, per request), then every
text goes to the tokenizer's batch encoder in one call. A request whose template or text fails
gets its exception in its slot, and costs no other request its tokens.
"""

from __future__ import annotations

from typing import Any

# A chat (list of {"role", "content"}) or a raw completion prompt.
EncodeItem = list[dict[str, str]] | str


def batch_encode(
    tokenizer: Any, items: list[EncodeItem], prompt_special_tokens: bool
) -> list[list[int] | Exception]:
    """Token ids of each item, in order, or the exception that item raised.

    Chats get the chat template with the generation prompt, and no further special tokens (the
    template writes them), exactly as `apply_chat_template(..., tokenize=True)` does. Prompts get the
    tokenizer's special tokens when `prompt_special_tokens` (as `tokenizer.encode(prompt)` does).
    """
    out: list[list[int] | Exception] = [ValueError("not encoded")] * len(items)
    groups: dict[bool, list[tuple[int, str]]] = {True: [], False: []}  # add_special_tokens -> (slot, text)
    for i, item in enumerate(items):
        if isinstance(item, str):
            groups[prompt_special_tokens].append((i, item))
            continue
        try:
            text = tokenizer.apply_chat_template(item, add_generation_prompt=True, tokenize=False)
        except Exception as exc:  # a template failure is that request's
            out[i] = exc
            continue
        groups[False].append((i, text))
    for special, group in groups.items():
        if not group:
            continue
        try:
            encoded = tokenizer([text for _, text in group], add_special_tokens=special)["input_ids"]
        except Exception:  # one bad text fails the whole batch call: find it by encoding one by one
            encoded = []
            for _, text in group:
                try:
                    encoded.append(tokenizer(text, add_special_tokens=special)["input_ids"])
                except Exception as exc:
                    encoded.append(exc)
        for (i, _), ids in zip(group, encoded, strict=True):
            out[i] = ids if isinstance(ids, Exception) else [int(t) for t in ids]
    return out
