"""Batch tokenization gives every request exactly the tokens of encoding it alone; failures stay local."""

from __future__ import annotations

import pytest

from worker.engine.llm_engine import PagedEngine
from worker.engine.model_loader import LoadedModel
from worker.engine.tokenize import batch_encode

pytestmark = pytest.mark.model

CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Count to 5 in Spanish ✓."}],
    [{"role": "user", "content": "x " * 300}],
]
PROMPTS = ["Once upon a time", "def fib(n):\n    return", "日本語のテキスト"]


def test_batch_equals_one_by_one(smol: LoadedModel) -> None:
    tok = smol.tokenizer
    items: list = [*CHATS, *PROMPTS]
    got = batch_encode(tok, items, prompt_special_tokens=True)
    engine = PagedEngine(smol.model, tok, kv_cache_bytes=2**22)
    try:
        expected = [engine.encode_chat(c) for c in CHATS] + [engine.encode_prompt(p) for p in PROMPTS]
        assert got == expected
        assert engine.encode_batch(items) == expected
    finally:
        engine.close()


def test_a_failing_item_costs_only_itself(smol: LoadedModel) -> None:
    tok = smol.tokenizer
    bad = [{"role": "user"}]  # no content: the chat template raises while rendering it
    got = batch_encode(tok, [CHATS[0], bad, PROMPTS[0]], prompt_special_tokens=True)
    assert isinstance(got[1], Exception)
    assert got[0] == batch_encode(tok, [CHATS[0]], prompt_special_tokens=True)[0]
    assert got[2] == [int(t) for t in tok.encode(PROMPTS[0])]
