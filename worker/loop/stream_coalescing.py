"""Coalescing streamed tokens: fewer token events per request (`LLM_STREAM_INTERVAL_MS`, `_TOKENS`).

With thousands of concurrent streamed requests, one token event per token per request can be most of
the worker's host time: a body, its encoding and signature, and an XADD on Redis, for each token. As
with vLLM's `--stream-interval`, a choice's first tokens are written at once (time to first token is
unchanged) and later ones are held, then written as one event once `interval_s` has passed since the
choice's last written event, or once `interval_tokens` are held, whichever comes first. The wire needs
nothing new: a token event carries a text delta, its token ids and their logprobs, so one event
standing for several is their concatenation.

Pure: the caller passes the clock (`now_s`) and says whose tokens they are (`owner`: a request's
`InFlight`; a later request under the same `seq_id` starts afresh). `Publisher` writes what is released,
and takes a request's held tokens right before its final, so none is lost and none follows it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Held:
    """A choice's tokens in order, as the one token event they become: texts, ids, logprobs concatenated."""

    texts: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[dict[str, Any]] | None = None  # None: no token of theirs carried logprobs

    @property
    def text(self) -> str:
        return "".join(self.texts)

    def add(self, text: str, token_ids: list[int], logprobs: list[dict[str, Any]] | None) -> None:
        self.texts.append(text)
        self.token_ids.extend(token_ids)
        if logprobs is not None:
            self.logprobs = self.logprobs or []
            self.logprobs.extend(logprobs)


@dataclass
class _Choice:
    last_write_s: float  # when its last event was released
    held: Held | None = None


@dataclass
class _Request:
    owner: object
    choices: dict[int, _Choice] = field(default_factory=dict)


class StreamCoalescer:
    """Holds each choice's tokens after its first until `interval_s` has passed since its last event was
    released, or `interval_tokens` are held (0 turns either bound off)."""

    def __init__(self, interval_s: float = 0.0, interval_tokens: int = 0):
        self.interval_s = interval_s
        self.interval_tokens = interval_tokens
        self._requests: dict[str, _Request] = {}
        self._holding: dict[tuple[str, int], None] = {}  # the choices holding tokens, in the order they began

    def __len__(self) -> int:
        """The requests it keeps state of."""
        return len(self._requests)

    @property
    def holding(self) -> bool:
        return bool(self._holding)

    def add(
        self, seq_id: str, choice: int, owner: object, text: str, token_ids: list[int],
        logprobs: list[dict[str, Any]] | None, now_s: float,
    ) -> Held | None:  # fmt: skip
        """A choice's new tokens: what to write now (its first tokens, or all it holds once due), or None."""
        request = self._requests.get(seq_id)
        if request is None or request.owner is not owner:
            self.forget(seq_id)  # a request ended elsewhere left this id's state behind
            request = self._requests[seq_id] = _Request(owner)
        state = request.choices.get(choice)
        if state is None:
            request.choices[choice] = _Choice(now_s)
            return Held([text], token_ids, logprobs)
        if state.held is None:
            state.held = Held()
            self._holding[(seq_id, choice)] = None
        state.held.add(text, token_ids, logprobs)
        if not self._due(state, now_s):
            return None
        return self._release(seq_id, choice, state, now_s)

    def take_due(self, now_s: float) -> list[tuple[str, int, object, Held]]:
        """Release what has waited `interval_s` since its choice's last event, though no token came since:
        (seq_id, choice, owner, held) each."""
        if self.interval_s <= 0:
            return []
        due = []
        for seq_id, choice in list(self._holding):
            request = self._requests[seq_id]
            state = request.choices[choice]
            if now_s - state.last_write_s >= self.interval_s:
                due.append((seq_id, choice, request.owner, self._release(seq_id, choice, state, now_s)))
        return due

    def take(self, seq_id: str) -> list[tuple[int, Held]]:
        """Forget a request whose final is written now; what its choices hold, by choice."""
        request = self._requests.get(seq_id)
        if request is None:
            return []
        self.forget(seq_id)
        return [(choice, state.held) for choice, state in sorted(request.choices.items()) if state.held]

    def forget(self, seq_id: str) -> None:
        """Drop a request's state and what it holds (it ended without a final from this worker)."""
        request = self._requests.pop(seq_id, None)
        if request is not None:
            for choice in request.choices:
                self._holding.pop((seq_id, choice), None)

    def keep_only(self, alive: Callable[[str, object], bool]) -> None:
        """Forget every request for which `alive(seq_id, owner)` is false."""
        for seq_id, request in list(self._requests.items()):
            if not alive(seq_id, request.owner):
                self.forget(seq_id)

    def _due(self, state: _Choice, now_s: float) -> bool:
        assert state.held is not None
        if 0 < self.interval_tokens <= len(state.held.token_ids):
            return True
        return 0 < self.interval_s <= now_s - state.last_write_s

    def _release(self, seq_id: str, choice: int, state: _Choice, now_s: float) -> Held:
        held, state.held, state.last_write_s = state.held, None, now_s
        del self._holding[(seq_id, choice)]
        assert held is not None
        return held


def stream_coalescer(interval_ms: float, interval_tokens: int) -> StreamCoalescer | None:
    """The coalescer of these settings; None when every engine output is to be its own event."""
    if interval_ms <= 0 and interval_tokens <= 1:
        return None
    return StreamCoalescer(interval_ms / 1000, interval_tokens)
