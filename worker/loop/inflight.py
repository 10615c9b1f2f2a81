"""What the worker knows about each request it serves, from the moment it is read to its final reply."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from producer.wire.codec import ContentType
from producer.wire.models import ChatRequest
from worker.engine.base import SequenceOutput


def seq_id_of(tenant: str | None, request_id: str) -> str:
    """How the loop and the engine know a request (its `seq_id`): the wire's request id, prefixed
    `<tenant>/` when read from a tenant's stream (ids are the tenants' own, so two tenants may use the
    same one; `/` is in no id or tenant)."""
    return request_id if tenant is None else f"{tenant}/{request_id}"


def choice_seq_id(seq_id: str, choice: int) -> str:
    """How the engine knows choice `choice` of a request with `n` > 1: choice 0 by the request's own
    `seq_id`, choice i > 0 by `<seq_id>#<i>` (`#` is in no request id or tenant)."""
    return seq_id if choice == 0 else f"{seq_id}#{choice}"


def split_choice(seq_id: str) -> tuple[str, int]:
    """The request's `seq_id` and the choice of an engine's `seq_id` (`choice_seq_id` undone)."""
    base, mark, choice = seq_id.rpartition("#")
    return (base, int(choice)) if mark else (seq_id, 0)


def entry_epoch_ms(entry_id: bytes) -> int:
    """The server time (ms) embedded in a stream entry id, i.e. when it was XADDed."""
    return int(entry_id.split(b"-", 1)[0])


@dataclass
class InFlight:
    """A validated request handed to the engine; leaves the `InFlightTable` with its final reply."""

    entry_id: bytes
    request: ChatRequest
    content_type: ContentType
    reply_key: str
    prompt_token_ids: list[int]
    enqueued_epoch_ms: int  # when it was XADDed (server clock)
    read_s: float  # when this worker read it (monotonic)
    deadline_s: float | None  # monotonic
    admitted_s: float | None = None  # when the engine started it
    first_token_s: float | None = None
    tokens_sent: int = 0
    batch_id: int = 0
    tenant: str | None = None  # the tenant whose stream it was read from (None: the un-namespaced one)
    shard: int | None = None  # the shard whose stream it was read from (None: not sharded)
    owned: bool | None = None  # whether this worker owned that stream when it read it (None: ownership off)
    # The digest of the entry (`producer.wire.request_digest`): what the request id's claim names, what
    # its reply events carry (`rd`), and what its final reply is checked against (`FinalWrite.digest`).
    digest: str = ""
    # Requests asking for logprobs: each choice's so far, as reply bodies (`Logprob`), for the final reply.
    logprobs: dict[int, list[dict[str, Any]]] | None = None
    # Requests with `n` > 1: the final outputs of the choices that finished (the reply waits for all).
    finished_choices: dict[int, SequenceOutput] | None = None

    @property
    def lane(self) -> tuple[str | None, int | None]:
        """The request stream it was read from, as `StreamNames.lane`."""
        return (self.tenant, self.shard)

    @property
    def seq_id(self) -> str:
        """The request's id in the loop's table and in the engine (`seq_id_of`)."""
        return seq_id_of(self.tenant, self.request.id)

    @property
    def started(self) -> bool:
        """Whether the engine has admitted it (it runs, or ran)."""
        return self.admitted_s is not None


Lane = tuple[str | None, int | None]


class InFlightTable:
    """Every request handed to the engine, by `seq_id`, from its hand-over to its final reply.

    The one owner of a request's life in the worker: the loop adds what intake accepted, the publisher
    ends what finished, cancels, lost entries and shutdown take requests out; intake only asks.
    """

    def __init__(self) -> None:
        self._by_id: dict[str, InFlight] = {}

    def __len__(self) -> int:
        return len(self._by_id)

    def __contains__(self, seq_id: object) -> bool:
        return seq_id in self._by_id

    def get(self, seq_id: str) -> InFlight | None:
        return self._by_id.get(seq_id)

    def add(self, f: InFlight) -> None:
        """A request handed to the engine."""
        self._by_id[f.seq_id] = f

    def end(self, seq_id: str) -> InFlight | None:
        """Take a request out (answered, lost or handed back); None if it is not here."""
        return self._by_id.pop(seq_id, None)

    def take_all(self) -> list[InFlight]:
        """Take every request out (the end of a shutdown)."""
        taken = list(self._by_id.values())
        self._by_id.clear()
        return taken

    def started_ids(self) -> list[str]:
        """The requests the engine has admitted."""
        return [seq_id for seq_id, f in self._by_id.items() if f.started]

    def entry_ids(self, lane: Lane | None = None) -> list[bytes]:
        """The stream entries being served (of one lane's stream, or of all)."""
        return [f.entry_id for f in self._by_id.values() if lane is None or f.lane == lane]

    def served_from(self, lane: Lane, entry_id: bytes) -> list[str]:
        """The requests read from this entry of this lane's stream."""
        return [seq_id for seq_id, f in self._by_id.items() if f.entry_id == entry_id and f.lane == lane]
