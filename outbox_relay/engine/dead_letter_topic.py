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
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from datetime import datetime
from typing import Any

import psycopg
import structlog

from outbox_relay.config import DeadLetterTopicConfig
from outbox_relay.connections import PREPARE_THRESHOLD, AnswerDeadline, connect_with_retry
from outbox_relay.engine.dispatch import waves
from outbox_relay.engine.retry import Backoff
from outbox_relay.engine.store import milliseconds
from outbox_relay.errors import first_line
from outbox_relay.models import Message, Outcome, OutgoingMessage, PublishResult, Record, RecordKind
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
        keeps_order: Callable[[str], bool],
        *,
        schema: str,
        backoff: Backoff,
        poll_interval: float,
        publish_timeout: float,
        max_payload_bytes: int | None,
        max_batch_bytes: int,
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
        self._keeps_order = keeps_order  # dispatcher.keeps_order: whether one call keeps a key's order
        self._lock = f"outbox_relay_dead_letter_topic.{schema}"
        self._backoff = backoff
        self._poll = poll_interval
        self._publish_timeout = publish_timeout
        self._max_payload = max_payload_bytes if max_payload_bytes is not None else 2**62
        self._max_batch_bytes = max_batch_bytes
        self._retry_max = retry_max
        self._metrics = metrics
        self._prepare_threshold = prepare_threshold
        self._query_timeout = query_timeout
        self._woken = asyncio.Event()
        # Per destination, when it last acked a copy and last refused one for good: a
        # refusal is a copy's own problem only while its destination takes other copies
        # (acked since its last refusal); otherwise it is the destination's (an ACL, a
        # name the broker refuses), and the topic's copies rest instead (_resting).
        self._acked_at: dict[str, float] = {}
        self._refused_at: dict[str, float] = {}
        self._cut = False  # the last take stopped at its deadline with copies left to send
        self._take_failures = 0  # copies of the last take that failed (a cut take is clean only without)
        self._resting: dict[str, float] = {}  # original topic -> until (monotonic): left out of takes
        self._last_refusal: dict[str, str | None] = {}  # destination -> its last refusal's reason (logs)
        self._rests: dict[str, int] = {}  # original topic -> refusals in a row (its backoff)
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
                        if taken and (acked == taken or (self._cut and not self._take_failures)):
                            self._failures = 0
                            continue  # more may be waiting (a take is bounded in rows, bytes and time)
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
        how many were taken and how many are now done (acked, or refused for good)."""
        deadline = AnswerDeadline(conn, self._query_timeout, purpose="dead_letter_topic")
        with deadline:
            async with conn.transaction():
                # Row locks are held while the broker is called: bounded like a batch's.
                # A last wave may start just before the deadline: its uploads (the claim
                # check) and its publish may each take publish_timeout.
                idle = milliseconds(3 * self._publish_timeout + self._query_timeout)
                await conn.execute("SELECT set_config('idle_in_transaction_session_timeout', %s, true)", (str(idle),))
                cur = await conn.execute(self._q["dead_letter_topic_lock"], {"lock": self._lock})
                row = await cur.fetchone()
                if not row or not row[0]:
                    return 0, 0  # another replica publishes
                now = time.monotonic()
                resting = [topic for topic, until in self._resting.items() if until > now]
                cur = await conn.execute(
                    self._q["dead_letter_topic_take"], {"limit": self._config.batch_size, "resting": resting}
                )
                ids = _within(await cur.fetchall(), self._max_batch_bytes)
                if not ids:
                    return 0, 0
                cur = await conn.execute(
                    self._q["dead_letter_topic_rows"], {"ids": ids, "max_payload": self._max_payload}, binary=True
                )
                copies = [_copy(row, self._config.destination_for(row[2])) for row in await cur.fetchall()]
                with deadline.paused():
                    done = await self._publish_in_order(copies)
                if done:
                    await conn.execute(self._q["dead_letter_topic_published"], {"ids": done})
        self.published += len(done)
        return len(copies), len(done)

    async def _publish_in_order(self, copies: list[tuple[int, OutgoingMessage]]) -> list[int]:
        """Publish the copies, each key's in order (a key stops at its first copy not
        acked); the row ids that are done. A copy the topic refuses for good goes again
        without its payload; refused again, it is given up, loudly, while its destination
        takes other copies, or else its topic's copies rest (_without_payload, _rest)."""
        broker = self._config.broker
        by_id = dict(copies)
        # A key's copies share a call only to one destination of a broker that keeps a
        # key's order (two topics have no order between them), as the dispatcher's do.
        same_call = (lambda m: by_id[m.id].destination) if self._keeps_order(broker) else None
        done: list[int] = []
        stopped: set[str] = set()
        # Destinations that refused a bare copy in this take without proof that they take
        # others: their further refusals in the take are not sent bare again (one call
        # each), and unless they ack a copy before the take ends, their topics rest.
        suspect: dict[str, set[str]] = {}
        self._cut = False
        self._take_failures = 0
        started = time.monotonic()
        deadline = started + self._publish_timeout
        for wave in waves([out.message for _, out in copies], same_call):
            todo = [m for m in wave if m.key is None or m.key not in stopped]
            if not todo:
                continue
            if time.monotonic() >= deadline:
                self._cut = True  # the rest in the next take, at once
                break
            answers = await self._publish(broker, [by_id[m.id] for m in todo])
            refused: list[tuple[Message, PublishResult]] = []
            for message, answer in zip(todo, answers, strict=True):
                if answer.outcome is Outcome.ACKED:
                    done.append(message.id)
                    self._acked(message.topic, by_id[message.id].destination)
                    self._metrics.dead_letters_published.inc()
                elif answer.outcome is Outcome.PERMANENT:
                    refused.append((message, answer))
                else:
                    if answer.outcome is not Outcome.NOT_SENT:  # held back behind its key's failure: no news
                        self._failed(by_id[message.id], answer)
                    if message.key is not None:
                        stopped.add(message.key)
            for message, answer in refused:
                out = by_id[message.id]
                if out.destination in suspect:
                    self._failed(out, answer)
                    suspect[out.destination].add(message.topic)
                elif time.monotonic() < deadline and await self._without_payload(out, answer, suspect):
                    done.append(message.id)
                    continue
                if message.key is not None:
                    stopped.add(message.key)
        for destination, topics in suspect.items():
            if self._acked_at.get(destination, float("-inf")) < started:
                self._rest(destination, topics)
        return done

    async def _without_payload(
        self, out: OutgoingMessage, refusal: PublishResult, suspect: dict[str, set[str]]
    ) -> bool:
        """A copy refused for good, sent again without its payload; True when that is
        done with (acked, or refused again and given up). A destination that refuses
        it again without having taken a copy since its last refusal joins `suspect`."""
        message = out.message
        headers = {**message.headers, PAYLOAD_OMITTED: f"{message.size} bytes, refused: {refusal.reason}"}
        bare = Message(
            message.id,
            message.message_id,
            message.topic,
            message.key,
            b"",
            message.content_type,
            headers,
            message.attempts,
            message.created_at,
        )
        [answer] = await self._publish(self._config.broker, [OutgoingMessage(bare, out.destination, True)])
        if answer.outcome is Outcome.ACKED:
            self._acked(message.topic, out.destination)
            self._metrics.dead_letters_published.inc()
            log.warning(
                "dead_letter_topic_copy_without_payload",
                message_id=str(message.message_id),
                destination=out.destination,
                refused=refusal.reason,
            )
            return True
        self._failed(out, answer)
        if answer.outcome is not Outcome.PERMANENT:
            return False
        destination = out.destination
        accepting = self._acked_at.get(destination, float("-inf")) > self._refused_at.get(destination, float("-inf"))
        self._refused_at[destination] = time.monotonic()
        if not accepting:
            # The destination has not taken a copy since it last refused one: the relay
            # may not be authorized for it, or the broker refuses its name. Not given up:
            # the take goes on (another copy acked by it says the copy is the problem,
            # and the next take gives it up); otherwise its topic rests (_rest).
            suspect.setdefault(destination, set()).add(message.topic)
            self._last_refusal[destination] = answer.reason
            return False
        log.error(
            "dead_letter_topic_copy_refused",
            message_id=str(message.message_id),
            broker=self._config.broker,
            destination=out.destination,
            reason=answer.reason,
            hint="the dead letter stays in the table (outbox-relay dead-letters list); the topic will not get it",
        )
        return True

    def _rest(self, destination: str, topics: set[str]) -> None:
        """A destination refused copies and took none in a take: the configuration's
        problem, most likely (fixed later), or, right after a start, a copy's own. Its
        topics' copies are left out of takes (so they stall no others) for a growing
        backoff, once per take; the next try after it tells the two apart."""
        now = time.monotonic()
        for topic in sorted(topics):
            rests = self._rests[topic] = self._rests.get(topic, 0) + 1
            delay = self._backoff.delay(rests)
            self._resting[topic] = now + delay
            log.error(
                "dead_letter_topic_destination_refused",
                broker=self._config.broker,
                destination=destination,
                topic=topic,
                reason=self._last_refusal.get(destination),
                retry_in_s=round(delay, 3),
                hint=(
                    "check the dead-letter topic's name and the relay's rights on it (dead_letters.publish_to); "
                    "if it takes other copies, the refused one is given up on the next try"
                ),
            )

    def _acked(self, topic: str, destination: str) -> None:
        self._acked_at[destination] = time.monotonic()
        self._resting.pop(topic, None)
        self._rests.pop(topic, None)

    def _failed(self, out: OutgoingMessage, answer: PublishResult) -> None:
        self._take_failures += 1
        self._metrics.dead_letter_publish_failures.inc()
        log.warning(
            "dead_letter_topic_publish_failed",
            broker=self._config.broker,
            destination=out.destination,
            message_id=str(out.message_id),
            outcome=answer.outcome.value,
            reason=answer.reason,
        )


def _within(rows: Sequence[Sequence[Any]], budget: int) -> list[int]:
    """The ids of the taken rows whose payloads fit `budget` bytes together (the first
    one always: a single larger row goes alone)."""
    ids: list[int] = []
    total = 0
    for row_id, size in rows:
        if ids and total + size > budget:
            break
        ids.append(row_id)
        total += size
    return ids
