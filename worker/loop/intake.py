"""Intake: from stream entries to validated requests ready for the engine.

Reads the consumer group (new entries, or this consumer's own pending ones after a restart),
takes entries back from dead consumers and from lost replies (resync), answers the excess of an
over-full backlog `overloaded`, and turns each entry into an `InFlight` request: decode and validate,
dedupe by request id, honour an early cancel, tokenize, check the prompt length, and skip entries
that already have a final reply. Every failure costs the entry alone (see `refusals.py`).

Request ids are claimed (`<root>:claim:<id>`, value `<body digest> <entry id>`, the reply TTL): with
the final-reply check, each candidate's claim is taken with `SET NX GET` in the same pipeline. The
entry that claimed an id owns it; a later entry (in stream order) with the same id and another body is
refused as a duplicate id: logged `request_duplicate_id`, dead-lettered and acknowledged, with no reply
(its only reply stream would be the owner's). An earlier entry that finds its id claimed by a later one
(two workers read them at once) takes the claim over while the request has no final, and the later
one's final is then not written (`CLAIMED_FINAL_SCRIPT` in `worker/replies/writer.py`). The same body
again (a redelivery, a client's retry) finds its own digest and goes on as before: deduped here, and
answered once under the final-reply guard. docs/security.md, "Duplicate request ids".

One `Intake` serves one request stream: the single `<prefix>:requests`, or one tenant's (then
every key it names is that tenant's, and requests are known by `seq_id_of(tenant, id)`). The
loop reads all streams in one call (`tenants.read_lanes`) and hands each its entries.
"""

from __future__ import annotations

import dataclasses
import time

import redis
import structlog

from producer.wire.codec import ProtocolError, decode_request
from producer.wire.models import REQUEST_EXTRAS, ChatRequest, ErrorCode, now_ms
from producer.wire.redis_factory import register_script
from producer.wire.redis_types import pending_rows, range_entries, read_entries
from producer.wire.request_digest import entry_digest
from scheduler import Priority
from worker.engine.base import Engine, GenerationRequest, SamplingParams
from worker.engine.structured.spec import GrammarError, GrammarSpec, parse_response_format
from worker.loop.backpressure import Backpressure
from worker.loop.cancellation import CancelWatch
from worker.loop.inflight import InFlight, InFlightTable, choice_seq_id, entry_epoch_ms, seq_id_of
from worker.loop.reclaim import Reclaimer, delivery_counts
from worker.observability.counters import LoopCounters
from worker.replies.refusals import Refusals
from worker.replies.writer import ReplyWriter
from worker.settings import WorkerSettings

log = structlog.get_logger("worker")

Entries = list[tuple[bytes, dict[bytes, bytes]]]
# The request fields that may use a sampling extra (`extras_used`).
EXTRA_FIELDS = frozenset(REQUEST_EXTRAS)
# Commands `queue_checks` sends per candidate: EXISTS of its guard, SET NX GET of its id's claim.
CHECKS_PER_CANDIDATE = 2

# KEYS[1] claim, KEYS[2] final-reply guard. ARGV[1] the claim's value as read, ARGV[2] ours, ARGV[3] TTL (s).
# An earlier entry takes the claim from a later one, unless the claim changed or the request has a final.
TAKE_OVER_SCRIPT = """\
if redis.call('GET', KEYS[1]) == ARGV[1] and redis.call('EXISTS', KEYS[2]) == 0 then
  redis.call('SET', KEYS[1], ARGV[2], 'EX', ARGV[3])
  return 1
end
return 0
"""


def stream_order(entry_id: bytes | str) -> tuple[int, int] | None:
    """An entry id as (ms, seq), to compare; None if it is not one."""
    text = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    ms, _, seq = text.partition("-")
    try:
        return int(ms), int(seq or 0)
    except ValueError:
        return None


def sampling_params(r: ChatRequest) -> SamplingParams:
    """A request's decoding parameters, the extras included (`logit_bias` as (id, bias) pairs by id)."""
    return SamplingParams(
        max_tokens=r.max_tokens, temperature=r.temperature, top_p=r.top_p, top_k=r.top_k, seed=r.seed,
        stop=tuple(r.stop), ignore_eos=r.ignore_eos, presence_penalty=r.presence_penalty,
        frequency_penalty=r.frequency_penalty, repetition_penalty=r.repetition_penalty,
        logit_bias=tuple(sorted(r.logit_bias.items())), min_tokens=r.min_tokens,
        stop_token_ids=tuple(r.stop_token_ids), logprobs=r.logprobs, top_logprobs=r.top_logprobs,
    )  # fmt: skip


def grammar_spec(r: ChatRequest) -> GrammarSpec | None:
    """The grammar a request's `response_format` asks for (None: unconstrained); GrammarError if invalid."""
    if r.response_format is None or not r.response_format.constrained:
        return None
    return parse_response_format(r.response_format.model_dump(by_alias=True, exclude_none=True))


def generation_request(f: InFlight) -> GenerationRequest:
    """What the engine needs of a request: its tokens, sampling, grammar, priority and deadline."""
    r = f.request
    return GenerationRequest(
        seq_id=f.seq_id,
        prompt_token_ids=f.prompt_token_ids,
        sampling=sampling_params(r),
        arrival_s=f.read_s,
        priority=int(Priority.BATCH if r.priority == "batch" else Priority.INTERACTIVE),
        deadline_s=f.deadline_s,
        kv_budget_tokens=r.kv_budget_tokens,
        grammar=grammar_spec(r),
    )  # fmt: skip


def generation_requests(f: InFlight) -> list[GenerationRequest]:
    """One sequence per choice: `generation_request` for `n` = 1; with `n` > 1, choice i is known to the
    engine as `choice_seq_id(seq_id, i)` (its outputs are published as the request's, `Publisher`), and a
    seeded request's choice i is seeded `seed + i`, so the choices differ and repeat.

    The choices reach the engine together, so its scheduler computes their shared prompt once (requests
    arriving together wait for the blocks of a common prefix another one is computing, then share them).
    The loop aborts every choice of a request it stops.
    """
    first = generation_request(f)
    if f.request.n == 1:
        return [first]
    seed = first.sampling.seed
    return [first] + [
        dataclasses.replace(
            first, seq_id=choice_seq_id(f.seq_id, i), prompt_token_ids=list(f.prompt_token_ids),
            sampling=dataclasses.replace(first.sampling, seed=None if seed is None else (seed + i) % 2**63),
        )
        for i in range(1, f.request.n)
    ]  # fmt: skip


def extras_used(r: ChatRequest, sampling: SamplingParams) -> tuple[str, ...]:
    """The sampling extras a request sets, by wire name: `SamplingParams.extras()`, `n` above 1 and a
    `response_format` that constrains the reply."""
    used = sampling.extras()
    if r.n > 1:
        used += ("n",)
    if r.response_format is not None and r.response_format.constrained:
        used += ("response_format",)
    return used


def extras_problem(
    r: ChatRequest, engine: str, supported: frozenset[str], vocab_size: int | None
) -> tuple[str, str] | None:
    """Why an engine cannot serve a request's extras, as (field, message), or None: the first extra it does
    not honour, else a token id of `logit_bias` or `stop_token_ids` outside its vocabulary (when known)."""
    for name in extras_used(r, sampling_params(r)):
        if name not in supported:
            return name, f"{name}: not supported by this worker's engine ({engine})"
    try:
        grammar_spec(r)
    except GrammarError as exc:
        return "response_format", f"response_format: {exc}"
    if vocab_size is not None:
        for name, ids in (("logit_bias", list(r.logit_bias)), ("stop_token_ids", r.stop_token_ids)):
            outside = next((t for t in ids if t >= vocab_size), None)
            if outside is not None:
                known = f"0-{vocab_size - 1}"
                return name, f"{name}: token id {outside} is not in the model's vocabulary ({known})"
    return None


def vocab_size(engine: Engine) -> int | None:
    """How many token ids the engine's tokenizer knows (`len(tokenizer)` of its encoder), or None when it
    has none (the echo engine's bytes): ids out of range are then left to the engine."""
    try:
        tokenizer = getattr(engine.encoder(), "tokenizer", None)
    except NotImplementedError:
        return None
    try:
        return len(tokenizer) if tokenizer is not None else None
    except TypeError:
        return None


class Intake:
    """Produces validated requests from the stream; knows nothing of the engine's queues."""

    def __init__(
        self,
        client: redis.Redis,
        settings: WorkerSettings,
        stream: str,
        engine: Engine,
        table: InFlightTable,
        replies: ReplyWriter,
        refusals: Refusals,
        cancels: CancelWatch,
        reclaimer: Reclaimer,
        backpressure: Backpressure,
        counters: LoopCounters,
    ):
        self.client, self.settings, self.stream, self.engine = client, settings, stream, engine
        self.table, self.replies, self.refusals, self.cancels = table, replies, refusals, cancels
        self.reclaimer, self.backpressure, self.counters = reclaimer, backpressure, counters
        self.names = replies.names  # this stream's namespace: reply keys, guards
        self.tenant = self.names.tenant
        # After a restart our own pending entries (read but never acked) are served first.
        self.replay_from: str | None = "0"
        self._vocab_size: int | None = -1  # `vocab_size(engine)`, once a request needs it (-1: not yet)
        self._take_over = register_script(client, TAKE_OVER_SCRIPT)
        self._fields: dict[bytes, dict[bytes, bytes]] = {}  # the fields of the last candidates (dead letters)

    # -- reading -----------------------------------------------------------------------------------
    def cursor(self) -> str:
        """The id to read from: `0` and on while replaying our own pending entries, then `>`."""
        return self.replay_from or ">"

    def read_candidates(self, entries: Entries) -> list[InFlight]:
        """Accept the entries one XREADGROUP from `cursor()` returned for this stream, up to the final-reply
        check, which the caller makes (`queue_checks`, then `tokenize_unanswered`): one pipeline for all."""
        replaying = self.replay_from is not None
        deliveries: dict[bytes, int] = {}
        if replaying:
            # Our own pending list, left by a previous run of this consumer: served before new entries.
            self.replay_from = entries[-1][0].decode() if entries else None
            deliveries = delivery_counts(
                self.client, self.stream, self.settings.group, [e[0] for e in entries if e[1]]
            )
            self.counters.replayed += len(entries)
            if entries:
                log.info("pending_replayed", count=len(entries), first=entries[0][0].decode())
        return self._candidates(entries, deliveries)

    def reclaim(self, room: int) -> list[InFlight]:
        """Entries of dead consumers, and our own that a lost reply hid from us (after the startup replay).

        The startup replay (XREADGROUP 0) comes first. It re-reads every entry pending under our
        name, and Redis counts that read as a delivery: an entry claimed before it would be counted
        twice for one hand-over, and parked as poison one delivery early.
        """
        if self.replay_from is not None:
            return []
        found = self._resync()
        claimed = self.reclaimer.reclaim(room)
        self.counters.reclaimed += len(claimed.entries)
        found += self._accept_all(claimed.entries, claimed.deliveries)
        return found

    def _resync(self) -> list[InFlight]:
        """Serve our own pending entries that we do not know about.

        That happens when a reply to XREADGROUP or XAUTOCLAIM was lost with the connection
        (the client library retries the call): Redis delivered entries we never saw. We
        touch every entry we serve at each heartbeat, so these are the idle ones.
        """
        idle_ms = int(self.settings.heartbeat_interval_s * 2000)
        rows = pending_rows(
            self.client.xpending_range(
                self.stream, self.settings.group, "-", "+", self.settings.max_waiting_requests,
                self.settings.consumer_name, idle=idle_ms,
            )
        )  # fmt: skip
        known = set(self.table.entry_ids())
        entries: Entries = []
        deliveries: dict[bytes, int] = {}
        for row in rows:
            entry_id = row["message_id"]
            if entry_id in known:
                continue
            got = range_entries(self.client.xrange(self.stream, entry_id, entry_id))
            if not got:
                self.replies.ack(entry_id)
                continue
            log.warning("pending_resynced", entry=entry_id.decode(), deliveries=row["times_delivered"])
            entries.append(got[0])
            deliveries[entry_id] = int(row["times_delivered"])
        return self._accept_all(entries, deliveries)

    def shed(self, excess: int) -> None:
        """Answer `overloaded` to entries over the backlog limit (oldest first), instead of queueing them."""
        reply = read_entries(
            self.client.xreadgroup(
                self.settings.group, self.settings.consumer_name, {self.stream: ">"}, count=min(excess, 1000)
            )
        )
        entries: Entries = reply[0][1] if reply else []
        self.backpressure.shed(len(entries))
        message = f"backlog is over {self.settings.max_backlog_requests} requests; retry later"
        for entry_id, fields in entries:
            self.counters.shed += 1
            with self.replies.answering(entry_digest(fields)):
                self.refusals.refuse(entry_id, fields, ErrorCode.OVERLOADED, message)
        if entries:
            log.warning("requests_shed", count=len(entries), backlog=self.backpressure.backlog)

    # -- accepting ---------------------------------------------------------------------------------
    def _accept_all(self, entries: Entries, deliveries: dict[bytes, int]) -> list[InFlight]:
        return self._finish(self._candidates(entries, deliveries))

    def _candidates(self, entries: Entries, deliveries: dict[bytes, int]) -> list[InFlight]:
        """Decode, validate and dedupe; what is left still needs the final-reply check and tokenizing."""
        accepted: dict[str, InFlight] = {}
        self._fields = {}
        for entry_id, fields in entries:
            if not fields:  # pending entry deleted from the stream: nothing to serve, just ack
                self.replies.ack(entry_id)
                continue
            self.counters.read += 1
            n = deliveries.get(entry_id, 1)
            digest = entry_digest(fields)
            try:
                with self.replies.answering(digest):
                    f = self._accept(entry_id, fields, n, accepted, digest)
            except redis.RedisError:
                raise
            except Exception as exc:  # one entry's failure costs that entry, never its batch-mates
                log.exception("entry_failed", entry=entry_id.decode(), error=type(exc).__name__)
                reason = f"failed while being accepted: {type(exc).__name__}: {exc}"
                with self.replies.answering(digest):
                    self.refusals.dead_letter_and_answer(entry_id, fields, reason, n)
                continue
            if f is not None:
                accepted[f.seq_id] = f
                self._fields[entry_id] = fields
        return list(accepted.values())

    def _finish(self, candidates: list[InFlight]) -> list[InFlight]:
        if not candidates:
            return []
        pipe = self.client.pipeline(transaction=False)
        self.queue_checks(pipe, candidates)
        return self.tokenize_unanswered(candidates, pipe.execute(raise_on_error=False))

    def queue_checks(self, pipe: redis.client.Pipeline, candidates: list[InFlight]) -> None:
        """Queue, per candidate, EXISTS of its final-reply guard and the claim of its id (SET NX GET, with the
        reply TTL): `CHECKS_PER_CANDIDATE` commands each, whose results `tokenize_unanswered` takes."""
        ttl_s = self.settings.reply_ttl_s
        for f in candidates:
            pipe.exists(self.names.final_guard(f.request.id))
            claim = f"{f.digest} {f.entry_id.decode()}"
            pipe.set(self.names.claim(f.request.id), claim, nx=True, get=True, ex=ttl_s)

    def tokenize_unanswered(self, candidates: list[InFlight], checked: list[object]) -> list[InFlight]:
        """Given the results of `queue_checks` (in order; errors as values), drop (and ack) the candidates
        that already have a final reply, refuse those whose id another body owns; tokenize the rest.

        A failed guard check raises (the read is retried); a claim that could not be written (the server
        refuses writes: OOM) does not hold the request back: its final is still checked against the claim."""
        guards = checked[0::CHECKS_PER_CANDIDATE]
        failed = next((r for r in guards if isinstance(r, Exception)), None)
        if failed is not None:
            raise failed
        claims = checked[1::CHECKS_PER_CANDIDATE]
        keep = []
        for f, answered, claim in zip(candidates, guards, claims, strict=True):
            if answered:
                log.info("request_already_answered", id=f.request.id, entry=f.entry_id.decode())
                self.replies.ack(f.entry_id)
            elif self._owns(f, claim):
                keep.append(f)
        return self._tokenize(keep)

    def _owns(self, f: InFlight, claim: object) -> bool:
        """Whether `f`'s entry owns its request id, given what SET NX GET of the claim returned; refuses it
        as a duplicate if not."""
        if claim is None or isinstance(claim, Exception):
            return True  # claimed now, or not claimable now (OOM): the final is checked against the claim
        value = claim.decode(errors="replace") if isinstance(claim, bytes) else str(claim)
        digest, _, owner = value.partition(" ")
        if digest == f.digest:
            return True  # the same body: a redelivery or a client's retry
        mine, theirs = stream_order(f.entry_id), stream_order(owner)
        if mine is not None and theirs is not None and mine < theirs:
            # An earlier entry whose id a later one claimed first (two workers read them at once).
            ours = f"{f.digest} {f.entry_id.decode()}"
            keys = [self.names.claim(f.request.id), self.names.final_guard(f.request.id)]
            if self._take_over(keys=keys, args=[value, ours, self.settings.reply_ttl_s]) == 1:
                log.warning("request_duplicate_id", id=f.request.id, entry=owner, tenant=self.tenant,
                            stage="taken_over", owner=f.entry_id.decode())  # fmt: skip
                return True
        self._duplicate(f.entry_id, f.request.id, owner)
        return False

    def _duplicate(self, entry_id: bytes, request_id: str, owner: str) -> None:
        """Refuse an entry that reuses a request id another entry owns, with another body: no reply (the id's
        reply stream is the owner's), a dead letter with the reason, and the acknowledgement."""
        log.warning("request_duplicate_id", id=request_id, entry=entry_id.decode(), tenant=self.tenant,
                    stage="read", owner=owner)  # fmt: skip
        self.counters.refused(ErrorCode.INVALID_REQUEST.value)
        fields = self._fields.get(entry_id) or {b"id": request_id.encode()}
        reason = f"invalid_request: duplicate request id {request_id!r}: entry {owner} owns it (another body)"
        self.refusals.dead_letter(entry_id, fields, reason, 1)

    def _accept(
        self, entry_id: bytes, fields: dict[bytes, bytes], deliveries: int, batch: dict[str, InFlight],
        digest: str,
    ) -> InFlight | None:  # fmt: skip
        s = self.settings
        if deliveries > s.max_deliveries:
            self.refusals.poison(entry_id, fields, deliveries)
            return None
        try:
            request, ct = decode_request(fields, self.names.root, s.max_body_bytes)
        except ProtocolError as exc:
            self.refusals.invalid(entry_id, fields, exc)
            return None
        except Exception as exc:  # a decoder bug must cost one entry, never the loop
            log.exception("request_undecodable", entry=entry_id.decode())
            self.refusals.dead_letter(entry_id, fields, f"undecodable: {type(exc).__name__}", deliveries)
            return None
        reply_key = request.reply_key(self.names.root)
        if not self.names.reply_allowed(reply_key):
            self.refusals.fail(
                entry_id, request, ct, self.refusals.reply_key(request), ErrorCode.INVALID_REQUEST,
                f"reply_to must start with `{self.names.root}:reply:`", "reply_to",
            )  # fmt: skip
            return None
        problem = None if request.kv_budget_tokens is None else s.kv_budget_problem(request.kv_budget_tokens)
        if problem:
            self.refusals.fail(
                entry_id, request, ct, reply_key, ErrorCode.INVALID_REQUEST, problem, "kv_budget_tokens"
            )
            return None
        seq_id = seq_id_of(self.tenant, request.id)
        known = self.table.get(seq_id) or batch.get(seq_id)
        if known is not None:
            if known.entry_id != entry_id and known.digest != digest:
                # The id of a request being served, with another body: refused, never run.
                self._fields[entry_id] = fields
                self._duplicate(entry_id, request.id, known.entry_id.decode())
            elif known.entry_id != entry_id:
                # The same request sent twice (a client retry): serve the first, ack this one.
                self.replies.ack(entry_id)
            return None
        if self.cancels.is_cancelled(seq_id):
            self.refusals.fail(
                entry_id, request, ct, reply_key, ErrorCode.CANCELLED, "cancelled before it started"
            )
            return None
        refused = self._extras_problem(request)
        if refused is not None:
            field, message = refused
            self.refusals.fail(entry_id, request, ct, reply_key, ErrorCode.INVALID_REQUEST, message, field)
            return None
        enqueued_ms = entry_epoch_ms(entry_id)
        deadline_epoch = request.deadline_epoch_ms(enqueued_ms)
        deadline_s = None if deadline_epoch is None else time.monotonic() + (deadline_epoch - now_ms()) / 1000
        # Tokenized with the rest of its read by `_tokenize`.
        return InFlight(
            entry_id, request, ct, reply_key, [], enqueued_ms, time.monotonic(), deadline_s,
            tenant=self.tenant, shard=self.names.shard, digest=digest,
        )  # fmt: skip

    def _extras_problem(self, request: ChatRequest) -> tuple[str, str] | None:
        """`extras_problem` against this worker's engine (nothing to check for requests without extras)."""
        if request.n == 1 and not request.model_fields_set.intersection(EXTRA_FIELDS):
            return None
        if self._vocab_size == -1 and (request.logit_bias or request.stop_token_ids):
            self._vocab_size = vocab_size(self.engine)
        known = None if self._vocab_size == -1 else self._vocab_size
        return extras_problem(request, self.engine.name, self.engine.supported_extras, known)

    def _tokenize(self, accepted: list[InFlight]) -> list[InFlight]:
        """Tokenize a read's requests in one batch; a template or tokenizer failure costs only its request."""
        if not accepted:
            return []
        items: list[list[dict[str, str]] | str] = [
            [m.model_dump() for m in f.request.messages]
            if f.request.messages is not None
            else f.request.prompt or ""
            for f in accepted
        ]
        limit = self.settings.max_prompt_tokens
        keep = []
        for f, ids in zip(accepted, self.engine.encode_batch(items), strict=True):
            r = f.request
            if isinstance(ids, Exception):
                message = f"cannot tokenize: {ids}"
                with self.replies.answering(f.digest):
                    self.refusals.fail(
                        f.entry_id, r, f.content_type, f.reply_key, ErrorCode.INVALID_REQUEST, message
                    )
            elif len(ids) > limit:
                message = f"prompt is {len(ids)} tokens; the limit is {limit}"
                with self.replies.answering(f.digest):
                    self.refusals.fail(
                        f.entry_id, r, f.content_type, f.reply_key, ErrorCode.TOO_LONG, message
                    )
            else:
                f.prompt_token_ids = ids
                keep.append(f)
        return keep
