"""`ChatError` reads as the service's error code, `too_long: ...`, as the wire and the docs spell it."""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import given
from hypothesis import strategies as st

from producer import AsyncChatClient, ChatClient, ChatError, ErrorCode


@pytest.mark.parametrize("code", list(ErrorCode))
@pytest.mark.parametrize("given_as", ["member", "text"])
def test_the_message_starts_with_the_wire_code(code: ErrorCode, given_as: str) -> None:
    err = ChatError(code if given_as == "member" else code.value, "over the limit", "req-1", "max_tokens")
    assert str(err) == f"{code.value}: over the limit"
    assert err.code is code
    assert (err.message, err.request_id, err.param) == ("over the limit", "req-1", "max_tokens")
    assert "ErrorCode" not in str(err) and "ErrorCode" not in repr(err)


@given(code=st.sampled_from(list(ErrorCode)), message=st.text(), as_text=st.booleans())
def test_any_message(code: ErrorCode, message: str, as_text: bool) -> None:
    assert str(ChatError(code.value if as_text else code, message)) == f"{code.value}: {message}"


def test_an_unknown_code_is_refused() -> None:
    with pytest.raises(ValueError):
        ChatError("no_such_code", "x")


def test_an_error_reply_reads_as_its_code(start_worker, redis_url: str, prefix: str) -> None:
    """Through a worker: a prompt over LLM_MAX_PROMPT_TOKENS, from the sync and the async client."""
    start_worker("echo", max_prompt_tokens=4)
    long = [{"role": "user", "content": " ".join(["word"] * 50)}]
    with ChatClient(redis_url, prefix=prefix, timeout_s=60) as client, pytest.raises(ChatError) as caught:
        client.chat(long, max_tokens=4)
    assert caught.value.code is ErrorCode.TOO_LONG
    assert str(caught.value) == f"too_long: {caught.value.message}"

    async def ask() -> ChatError:
        async with AsyncChatClient(redis_url, prefix=prefix, timeout_s=60) as client:
            try:
                await client.chat(long, max_tokens=4)
            except ChatError as exc:
                return exc
        raise AssertionError("the long prompt was served")

    err = asyncio.run(ask())
    assert str(err).startswith("too_long: ") and err.code is ErrorCode.TOO_LONG
