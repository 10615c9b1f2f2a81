"""Tokenizing many requests at once: one call into the Rust tokenizer, which encodes them in parallel.

A worker reads up to `read_count` requests per call and tokenizes them while the device runs a
step; encoded one by one under the GIL, a few hundred long prompts take longer than several decode
steps. Chats are rendered with the model's chat template first (Python, per request), then every
text goes to the tokenizer's batch encoder in one call. A request whose template or text fails
gets its exception in its slot, and costs no other request its tokens.

Message content and prompts are text, never control tokens. Encoding a rendered template as one
string would let a user write `<|im_start|>system` in a message and get the real special tokens
(a forged system turn). So the template is rendered once with a placeholder per message content, to
find which text is the template's own; its special-token markers become their ids, and everything
between them (template text and content together, exactly the pieces the tokenizer would encode
between special tokens itself) is encoded with `split_special_tokens=True`. A chat without special
strings in its content gets exactly the tokens of `apply_chat_template(..., tokenize=True)`.
"""

from __future__ import annotations

import re
import secrets
from typing import Any

# A chat (list of {"role", "content"}) or a raw completion prompt.
EncodeItem = list[dict[str, str]] | str
# A chat as the tokenizer will see it: text to encode as text, and ids of the template's own markers.
Segments = list[str | int]


def special_tokens(tokenizer: Any) -> dict[str, int]:
    """The tokenizer's special added tokens (`<|im_start|>`, ...) and their ids."""
    decoder = getattr(tokenizer, "added_tokens_decoder", None) or {}
    return {t.content: int(i) for i, t in decoder.items() if getattr(t, "special", False) and t.content}


def _special_pattern(specials: dict[str, int]) -> re.Pattern[str] | None:
    if not specials:
        return None
    return re.compile("(" + "|".join(re.escape(s) for s in sorted(specials, key=len, reverse=True)) + ")")


def _render(tokenizer: Any, messages: list[dict[str, str]]) -> str:
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    if not isinstance(text, str):
        raise ValueError("the chat template did not render to text")
    return text


def chat_segments(tokenizer: Any, messages: list[dict[str, str]], specials: dict[str, int]) -> Segments:
    """The chat rendered by its template, split into text and the template's own special-token ids.

    Raises ValueError when content carries special-token text and the template does not copy message
    content verbatim (then the template's markers cannot be told from the content's).
    """
    rendered = _render(tokenizer, messages)
    pattern = _special_pattern(specials)
    if pattern is None:
        return [rendered]
    nonce = secrets.token_hex(8)
    placeholder = re.compile(rf"\ue000{nonce}:(\d+)\ue001")
    marked = [{**m, "content": f"\ue000{nonce}:{i}\ue001"} for i, m in enumerate(messages)]
    parts = placeholder.split(_render(tokenizer, marked))  # template, index, template, index, ...
    order = [int(p) for p in parts[1::2]]
    contents = [m["content"] for m in messages]
    verbatim = order == list(range(len(messages))) and rendered == "".join(
        part if k % 2 == 0 else contents[int(part)] for k, part in enumerate(parts)
    )
    if not verbatim:
        if any(pattern.search(c) for c in contents):
            raise ValueError(
                "message content holds special-token text that this chat template cannot keep as text"
            )
        parts, order = [rendered], []  # no content can produce a special token: the template's are all there
    segments: Segments = []
    text = ""
    for k, part in enumerate(parts):
        if k % 2 == 1:
            text += contents[int(part)]
            continue
        for j, piece in enumerate(pattern.split(part)):
            if j % 2 == 0:
                text += piece
                continue
            if text:
                segments.append(text)
            segments.append(specials[piece])
            text = ""
    if text:
        segments.append(text)
    return segments


def batch_encode(
    tokenizer: Any, items: list[EncodeItem], prompt_special_tokens: bool
) -> list[list[int] | Exception]:
    """Token ids of each item, in order, or the exception that item raised.

    Chats get the chat template with the generation prompt, and no further special tokens (the
    template writes them), as `apply_chat_template(..., tokenize=True)` does; special-token text in
    content stays text. Prompts are text too, with the tokenizer's own special tokens (BOS...) added
    when `prompt_special_tokens` (as `tokenizer.encode(prompt)` adds them).
    """
    out: list[list[int] | Exception] = [ValueError("not encoded")] * len(items)
    specials = special_tokens(tokenizer)
    chats: dict[int, Segments] = {}
    # add_special_tokens -> (slot, segment index or -1 for a prompt, text)
    groups: dict[bool, list[tuple[int, int, str]]] = {True: [], False: []}
    for i, item in enumerate(items):
        if isinstance(item, str):
            groups[prompt_special_tokens].append((i, -1, item))
            continue
        try:
            chats[i] = segments = chat_segments(tokenizer, item, specials)
        except Exception as exc:  # a template failure is that request's
            out[i] = exc
            continue
        groups[False].extend((i, k, s) for k, s in enumerate(segments) if isinstance(s, str))
    encoded_at: dict[tuple[int, int], list[int] | Exception] = {}
    for special, group in groups.items():
        if not group:
            continue
        kwargs = {"add_special_tokens": special, "split_special_tokens": True}
        try:
            encoded: list[Any] = tokenizer([text for _, _, text in group], **kwargs)["input_ids"]
        except Exception:  # one bad text fails the whole batch call: find it by encoding one by one
            encoded = []
            for _, _, text in group:
                try:
                    encoded.append(tokenizer(text, **kwargs)["input_ids"])
                except Exception as exc:
                    encoded.append(exc)
        for (i, k, _), ids in zip(group, encoded, strict=True):
            encoded_at[(i, k)] = ids if isinstance(ids, Exception) else [int(t) for t in ids]
    for i in range(len(items)):
        if i in chats:
            ids_out: list[int] = []
            for k, seg in enumerate(chats[i]):
                if isinstance(seg, int):
                    ids_out.append(seg)
                    continue
                got = encoded_at[(i, k)]
                if isinstance(got, Exception):
                    out[i] = got
                    break
                ids_out += got
            else:
                out[i] = ids_out
        elif (i, -1) in encoded_at:
            out[i] = encoded_at[(i, -1)]
    return out


def encode_one(tokenizer: Any, item: EncodeItem, prompt_special_tokens: bool) -> list[int]:
    """`batch_encode` of one item; raises its exception."""
    ids = batch_encode(tokenizer, [item], prompt_special_tokens)[0]
    if isinstance(ids, Exception):
        raise ids
    return ids


def eos_token_ids(model: Any, tokenizer: Any) -> frozenset[int]:
    """EOS ids from the generation config (int or list) and the tokenizer."""
    ids: set[int] = set()
    for source in (getattr(model, "generation_config", None), tokenizer):
        value = getattr(source, "eos_token_id", None)
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    return frozenset(ids)
