"""Answering entries that will not be served: invalid, refused, poison, or failed while accepted.

Every answer here is written before the request ran, with the short `refusal_ttl_s` on its reply
stream and guard: a flood of refused requests (say, `overloaded` while shedding) costs Redis a
minute of memory each, not the hour of a served reply. Each path is total: whatever the entry
holds, it ends with an `error` reply to its sender when the sender can be named, or a dead letter
when it cannot (or when the entry can never succeed), and the entry is acknowledged with it.
Writes go through the `ReplyWriter`, so they survive Redis outages. Reply keys are those of the
writer's namespace (`ReplyWriter.names`): a tenant's entries are answered in that tenant's keys.
"""

from __future__ import annotations

import structlog

from producer.wire.codec import ContentType, ProtocolError, decode_request
from producer.wire.models import ChatRequest, ErrorCode
from worker.observability.counters import LoopCounters
from worker.replies.dead_letter import dead_letter_fields
from worker.replies.writer import ReplyWriter
from worker.settings import WorkerSettings

log = structlog.get_logger("worker")


class Refusals:
    """The worker's answers to entries it does not serve."""

    def __init__(self, replies: ReplyWriter, settings: WorkerSettings, counters: LoopCounters):
        self.replies = replies
        self.settings = settings
        self.counters = counters
        self.names = replies.names
        self.root = self.names.root  # where the senders of these entries are answered

    def reply_key(self, request: ChatRequest) -> str:
        """Where to answer: reply_to if it is a reply stream of this service, else the default stream."""
        key = request.reply_key(self.root)
        return key if self.names.reply_allowed(key) else self.names.reply(request.id)

    def fail(
        self,
        entry_id: bytes,
        request: ChatRequest,
        ct: ContentType,
        reply_key: str,
        code: ErrorCode,
        message: str,
        param: str | None = None,
    ) -> None:
        """A decoded request that cannot run (too long, cancelled before it started...); `param` names the
        request field at fault, when one is (the reply's `param`)."""
        self.counters.errors += 1
        self.counters.refused(code.value)
        tenant = self.names.tenant or request.tenant
        log.info("request_rejected", id=request.id, tenant=tenant, code=code.value, reason=message)
        self.replies.error(
            request.id, reply_key, code, message, ct, entry_id, self.settings.refusal_ttl_s, param
        )

    def refuse(self, entry_id: bytes, fields: dict[bytes, bytes], code: ErrorCode, message: str) -> None:
        """Answer an entry with an error without serving it (dead-letter it if it names no sender)."""
        try:
            request, ct = decode_request(fields, self.root, self.settings.max_body_bytes)
        except ProtocolError as exc:
            self.invalid(entry_id, fields, exc)
            return
        except Exception as exc:  # a decoder bug must cost one entry, never the loop
            log.exception("request_undecodable", entry=entry_id.decode())
            self.dead_letter(entry_id, fields, f"undecodable: {type(exc).__name__}", 1)
            return
        self.counters.errors += 1
        self.counters.refused(code.value)
        self.replies.error(
            request.id, self.reply_key(request), code, message, ct, entry_id, self.settings.refusal_ttl_s
        )

    def invalid(self, entry_id: bytes, fields: dict[bytes, bytes], exc: ProtocolError) -> None:
        self.counters.invalid += 1
        self.counters.refused(exc.code.value)
        log.warning(
            "request_invalid",
            entry=entry_id.decode(),
            id=exc.request_id,
            code=exc.code.value,
            reason=exc.message,
        )
        if exc.request_id is not None:
            self.replies.error(
                exc.request_id, exc.reply_to, exc.code, exc.message, exc.content_type, entry_id,
                self.settings.refusal_ttl_s, exc.param,
            )  # fmt: skip
        else:
            self.dead_letter(entry_id, fields, f"{exc.code.value}: {exc.message}", 1)

    def dead_letter(self, entry_id: bytes, fields: dict[bytes, bytes], reason: str, deliveries: int) -> None:
        self.counters.dead_lettered += 1
        log.warning(
            "entry_dead_lettered", entry=entry_id.decode(), reason=reason[:200], deliveries=deliveries
        )
        s = self.settings
        limits = (s.dead_letter_max_field_bytes, s.dead_letter_max_bytes)
        parked = dead_letter_fields(entry_id, fields, reason, deliveries, s.consumer_name, *limits)
        self.replies.dead_letter(parked, entry_id)

    def poison(self, entry_id: bytes, fields: dict[bytes, bytes], deliveries: int) -> None:
        """An entry delivered too often: dead-letter it and tell its sender, if known."""
        reason = (
            f"delivered {deliveries} times (max_deliveries={self.settings.max_deliveries}) without completing"
        )
        self.dead_letter_and_answer(entry_id, fields, reason, deliveries)

    def dead_letter_and_answer(
        self, entry_id: bytes, fields: dict[bytes, bytes], reason: str, deliveries: int
    ) -> None:
        """Dead-letter an entry that can never succeed and answer its sender `internal`, if one is known."""
        self.dead_letter(entry_id, fields, reason, deliveries)
        try:
            request, ct = decode_request(fields, self.root, self.settings.max_body_bytes)
        except ProtocolError as exc:
            rid, key, ct = exc.request_id, exc.reply_to, exc.content_type
        except Exception:
            return  # undecodable: the dead letter is all there is
        else:
            rid, key = request.id, self.reply_key(request)
        if rid is not None:
            self.counters.refused(ErrorCode.INTERNAL.value)
            self.replies.error(
                rid, key, ErrorCode.INTERNAL, f"request could not be processed: {reason}"[:300], ct, entry_id,
                self.settings.refusal_ttl_s,
            )  # fmt: skip
