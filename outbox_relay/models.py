"""The data that crosses the engine's boundaries: messages on their way to the
brokers and what each broker said (adapters), and what the relay writes back for
each message (sources, and the metrics that observe it). Imports nothing of ours."""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from uuid import UUID


@dataclass(frozen=True, slots=True)
class Message:
    """One outbox row as claimed by the relay."""

    id: int  # enqueue order; per-key ordering follows it
    message_id: UUID  # stable across redeliveries; travels to the broker
    topic: str
    key: str | None
    payload: bytes
    content_type: str
    headers: Mapping[str, str]
    attempts: int  # publish attempts before this one
    created_at: datetime
    # The payload's size in bytes as stored. The relay leaves the payload of a row over
    # relay.max_payload_bytes in the database (payload is then b""): it is dead-lettered
    # on its size alone. None: len(payload).
    payload_size: int | None = None

    @property
    def size(self) -> int:
        return len(self.payload) if self.payload_size is None else self.payload_size


@dataclass(frozen=True, slots=True)
class OutgoingMessage:
    """A message on its way to one broker, with the route's destination resolved."""

    message: Message
    destination: str  # the route's destination, or the message topic when it names none
    explicit_destination: bool = False  # the route named a destination itself

    @property
    def message_id(self) -> UUID:
        return self.message.message_id


class Outcome(enum.Enum):
    ACKED = "acked"
    TRANSIENT = "transient"  # try again later; counts toward max_attempts
    UNAVAILABLE = "unavailable"  # broker unreachable: try again later, attempt not counted
    PERMANENT = "permanent"  # will never succeed: dead-letter it
    NOT_SENT = "not_sent"  # held back: an earlier message of its key failed, or the call ran out of time


@dataclass(frozen=True, slots=True)
class PublishResult:
    """What the broker said about one message."""

    outcome: Outcome
    reason: str | None = field(default=None)
    # The broker asked for this much time before the next try (an HTTP Retry-After):
    # the message waits at least this long, whatever the backoff says.
    retry_after: float | None = field(default=None)
    # Where an acked message landed, as the text of a JSON object of the broker's own
    # words (a Kafka partition and offset, an HTTP status): the relay adds the broker and
    # destination and keeps it with the message (messages.receipt, outbox.receipt()).
    receipt: str | None = field(default=None)

    @classmethod
    def acked(cls, receipt: str | None = None) -> PublishResult:
        """The broker durably accepted the message; `receipt`: where it landed, the text
        of a JSON object (``'{"partition":3,"offset":42}'``), or None."""
        return _ACKED if receipt is None else cls(Outcome.ACKED, receipt=receipt)

    @classmethod
    def transient(cls, reason: str) -> PublishResult:
        return cls(Outcome.TRANSIENT, reason)

    @classmethod
    def unavailable(cls, reason: str, *, retry_after: float | None = None) -> PublishResult:
        """The broker could not be reached, or refuses everything for now: nothing is
        wrong with the message.

        Retried with backoff like a transient failure, but does not spend one of the
        message's `max_attempts`, so a long broker outage dead-letters nothing.
        """
        return cls(Outcome.UNAVAILABLE, reason, retry_after)

    @classmethod
    def permanent(cls, reason: str) -> PublishResult:
        return cls(Outcome.PERMANENT, reason)

    @classmethod
    def not_sent(cls, reason: str) -> PublishResult:
        """Not handed to the broker because an earlier message of its key in the same
        call failed (an adapter that keeps key order stops a key at its first failure),
        or because the call ran out of time after earlier messages of its key were acked
        (an adapter that sends a key's run in rounds bounded by a timeout). Nothing is
        recorded for it: it goes again, in order, in a later batch (at once in the second
        case; the WAL source sends it again within the same batch). Answered for a key's
        first message in the call, it is the adapter's mistake and counts as a transient
        failure."""
        return cls(Outcome.NOT_SENT, reason)


_ACKED = PublishResult(Outcome.ACKED)


class RecordKind(enum.StrEnum):
    """What is written for one attempted message (its value is what queries.sql reads)."""

    ACKED = "acked"  # marked dispatched
    RETRY = "retry"  # tried again after a delay; the attempt counts
    WAIT = "wait"  # tried again after a delay; no attempt spent (the broker was away)
    DEAD = "dead"  # dead-lettered


@dataclass(frozen=True, slots=True)
class Record:
    """What to write for one attempted message."""

    id: int
    kind: RecordKind
    error: str | None = None
    delay: float = 0.0
    # Where it went, for metrics and logs (None: no route); not part of what is written.
    broker: str | None = field(default=None, compare=False)
    destination: str | None = field(default=None, compare=False)
    # An acked message's receipt (engine/dispatch.py, receipt_of): written by the mark.
    receipt: str | None = field(default=None, compare=False)
