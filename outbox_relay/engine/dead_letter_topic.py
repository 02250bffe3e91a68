"""Publishes dead letters to a dead-letter topic (`dead_letters.publish_to`).

A dead letter stays in the table (for `dead-letters requeue`, and `hold`); this task
also hands a copy to a broker, the convention consumers of Kafka Connect and Spring
Kafka know: the same message id, key, payload and headers, plus headers naming the
reason, the attempts, the original topic and when it was dead-lettered.

It works from the table, not from the batch that dead-lettered the message: a
dead letter is published once the dead-lettering committed, whichever source or relay
replica wrote it (the WAL source parks its dead letters as rows too), and a
dead-letter topic that is down, or configured later, still gets every dead letter,
oldest first, when it is back (at least once: the row is marked only after the ack,
in the transaction that holds its lock). One publisher at a time per outbox (an
advisory lock), so a key's dead letters arrive in order. A dead letter requeued and
dead-lettered again is published again.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Mapping, Sequence
from datetime import datetime
from typing import Any

import psycopg
import structlog

from outbox_relay.config import DeadLetterTopicConfig
from outbox_relay.connections import PREPARE_THRESHOLD, AnswerDeadline, connect_with_retry
from outbox_relay.engine.retry import Backoff
from outbox_relay.engine.store import Record, RecordKind, milliseconds
from outbox_relay.errors import first_line
from outbox_relay.models import Message, Outcome, OutgoingMessage, PublishResult
from outbox_relay.observability.metrics import RelayMetrics
from outbox_relay.sqlfiles import Queries

log = structlog.get_logger("outbox_relay.dead_letter_topic")

Publish = Callable[[str, list[OutgoingMessage]], Awaitable[Sequence[PublishResult]]]

# The headers every dead-letter copy carries (values are text, like every header here).
REASON = "outbox-dead-letter-reason"
ATTEMPTS = "outbox-dead-letter-attempts"
ORIGINAL_TOPIC = "outbox-dead-letter-topic"
DEAD_LETTERED_AT = "outbox-dead-lettered-at"
# Set when the payload stayed in the database (over relay.max_payload_bytes): its size.
PAYLOAD_OMITTED = "outbox-dead-letter-payload-omitted"
# The same facts under the names Kafka Connect's and Spring Kafka's dead-letter queues
# use, for consumers written against them (only their text-valued headers: Spring's
# partition, offset and timestamp headers are binary numbers).
ALIASES = {
    ORIGINAL_TOPIC: ("__connect.errors.topic", "kafka_dlt-original-topic"),
    REASON: ("__connect.errors.exception.message", "kafka_dlt-exception-message"),
}


def dead_letter_headers(
    headers: Mapping[str, str], *, topic: str, reason: str, attempts: int, dead_lettered_at: datetime
) -> dict[str, str]:
    """The message's headers with the dead-letter headers added (they win over the
    message's own headers of the same names)."""
    added = {
        REASON: reason,
        ATTEMPTS: str(attempts),
        ORIGINAL_TOPIC: topic,
        DEAD_LETTERED_AT: dead_lettered_at.isoformat(),
    }
    for name, aliases in ALIASES.items():
        for alias in aliases:
            added[alias] = added[name]
    return {**headers, **added}


def _copy(row: Sequence[Any], destination: str) -> tuple[int, OutgoingMessage]:
    (row_id, message_id, topic, key, payload, content_type, headers, attempts, created_at, size, at, reason) = row
    added = dead_letter_headers(headers or {}, topic=topic, reason=reason or "", attempts=attempts, dead_lettered_at=at)
    if payload is None:
        added[PAYLOAD_OMITTED] = f"{size} bytes, over relay.max_payload_bytes"
    message = Message(
        row_id,
        message_id,
        topic,
        key,
        b"" if payload is None else payload,
        content_type,
        added,
        attempts,
        created_at,
    )
    return row_id, OutgoingMessage(message, destination, True)


class DeadLetterTopic:
    """The relay's side task that publishes dead letters; also a relay observer, woken
    by a batch that dead-lettered something (the poll finds the others')."""

    def __init__(
        self,
        dsn: str,
        queries: Queries,
        config: DeadLetterTopicConfig,
        publish: Publish,
        *,
        schema: str,
        backoff: Backoff,
        poll_interval: float,
        publish_timeout: float,
        max_payload_bytes: int | None,
        retry_max: float,
        metrics: RelayMetrics,
        prepare_threshold: int | None = PREPARE_THRESHOLD,
        query_timeout: float = 60.0,
    ):
        self._dsn = dsn
        self._q = queries
        self._config = config
        # dispatcher.publish_to: the broker's circuit and publish_timeout apply.
        self._publish = publish
        self._lock = f"outbox_relay_dead_letter_topic.{schema}"
        self._backoff = backoff
        self._poll = poll_interval
        self._publish_timeout = publish_timeout
        self._max_payload = max_payload_bytes if max_payload_bytes is not None else 2**62
        self._retry_max = retry_max
        self._metrics = metrics
        self._prepare_threshold = prepare_threshold
        self._query_timeout = query_timeout
        self._woken = asyncio.Event()
        self._failures = 0
        self.published = 0

    def batch_recorded(self, messages: Sequence[Message], records: Sequence[Record]) -> None:
        if any(record.kind is RecordKind.DEAD for record in records):
            self._woken.set()

    async def run(self) -> None:
        while True:
            try:
                conn = await connect_with_retry(
                    self._dsn,
                    purpose="dead_letter_topic",
                    retry_max=self._retry_max,
                    prepare_threshold=self._prepare_threshold,
                )
                async with conn:
                    while True:
                        self._woken.clear()
                        taken, acked = await self.publish_once(conn)
                        if taken and acked == taken and taken >= self._config.batch_size:
                            continue  # more may be waiting
                        if taken and acked < taken:
                            self._failures += 1
                            await asyncio.sleep(self._backoff.delay(self._failures))
                            continue
                        self._failures = 0
                        with contextlib.suppress(TimeoutError):
                            await asyncio.wait_for(self._woken.wait(), self._poll)
            except psycopg.Error as exc:  # any database error: reconnect, never end the relay
                log.warning("dead_letter_topic_connection_lost", error_type=type(exc).__name__, error=first_line(exc))
                await asyncio.sleep(min(1.0, self._retry_max))

    async def publish_once(self, conn: psycopg.AsyncConnection[Any]) -> tuple[int, int]:
        """Publish the oldest dead letters not published yet, in one transaction; return
        how many were taken and how many the broker acked (and are now marked)."""
        deadline = AnswerDeadline(conn, self._query_timeout, purpose="dead_letter_topic")
        with deadline:
            async with conn.transaction():
                # Row locks are held while the broker is called: bounded like a batch's.
                idle = milliseconds(self._publish_timeout + self._query_timeout)
                await conn.execute("SELECT set_config('idle_in_transaction_session_timeout', %s, true)", (str(idle),))
                cur = await conn.execute(self._q["dead_letter_topic_lock"], {"lock": self._lock})
                row = await cur.fetchone()
                if not row or not row[0]:
                    return 0, 0  # another replica publishes
                cur = await conn.execute(
                    self._q["dead_letter_topic_take"],
                    {"limit": self._config.batch_size, "max_payload": self._max_payload},
                    binary=True,
                )
                rows = await cur.fetchall()
                if not rows:
                    return 0, 0
                copies = [_copy(row, self._config.destination_for(row[2])) for row in rows]
                with deadline.paused():
                    answers = await self._publish(self._config.broker, [out for _, out in copies])
                acked = [
                    row_id
                    for (row_id, _), answer in zip(copies, answers, strict=True)
                    if answer.outcome is Outcome.ACKED
                ]
                if acked:
                    await conn.execute(self._q["dead_letter_topic_published"], {"ids": acked})
        self.published += len(acked)
        self._metrics.dead_letters_published.inc(len(acked))
        failed = [
            (out, answer)
            for (_, out), answer in zip(copies, answers, strict=True)
            if answer.outcome not in (Outcome.ACKED, Outcome.NOT_SENT)
        ]
        if failed:
            out, answer = failed[0]
            self._metrics.dead_letter_publish_failures.inc(len(failed))
            log.warning(
                "dead_letter_topic_publish_failed",
                broker=self._config.broker,
                destination=out.destination,
                message_id=str(out.message_id),
                reason=answer.reason,
                failed=len(failed),
                retry_in_s=round(self._backoff.delay(self._failures + 1), 3),
            )
        return len(rows), len(acked)
