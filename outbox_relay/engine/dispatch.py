"""Publishes a claimed batch and decides each message's outcome.

Per-key order: the batch is cut into waves, wave i holding the i-th message of
every key (keyless messages all go in wave 0). Waves go out one after the other and
a key whose message was not acked sends nothing more in this batch, so a later
message of a key is never delivered before an earlier one. Within a wave, every
broker gets its share in one concurrent call.
"""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict
from collections.abc import Mapping, Sequence

import structlog

from outbox_relay.adapter import Adapter
from outbox_relay.engine.store import Record
from outbox_relay.metrics import RelayMetrics
from outbox_relay.models import Message, Outcome, OutgoingMessage, PublishResult
from outbox_relay.retry import Backoff
from outbox_relay.routing import Router, Target

log = structlog.get_logger("outbox_relay.dispatch")

NO_ROUTE = "no route"


def waves(messages: Sequence[Message]) -> list[list[Message]]:
    """Split a batch (in enqueue order) so no wave holds two messages of one key."""
    result: list[list[Message]] = []
    seen: dict[str, int] = defaultdict(int)
    for message in messages:
        index = 0
        if message.key is not None:
            index = seen[message.key]
            seen[message.key] += 1
        if index == len(result):
            result.append([])
        result[index].append(message)
    return result


class Dispatcher:
    def __init__(
        self,
        adapters: Mapping[str, Adapter],
        router: Router,
        backoff: Backoff,
        *,
        max_attempts: int,
        publish_timeout: float,
        metrics: RelayMetrics | None = None,
        max_payload_bytes: int | None = None,
    ):
        self._adapters = adapters
        self._router = router
        self._backoff = backoff
        self._max_attempts = max_attempts
        self._timeout = publish_timeout
        self._metrics = metrics or RelayMetrics()
        self._max_payload = max_payload_bytes
        # Consecutive "unreachable" answers per broker: the backoff for messages that
        # did not spend an attempt grows with the outage, not with the message.
        self._outage: dict[str, int] = defaultdict(int)

    async def dispatch(self, messages: Sequence[Message]) -> list[Record]:
        """Publish in waves; start no new wave once `publish_timeout` has passed.

        The claiming transaction sits idle while the waves go out, and Postgres ends a
        session idle in a transaction for too long (the relay sets that limit): a key
        with hundreds of rows in one batch must not keep it open that long. Messages
        of waves not started stay unattempted and go in a later batch.
        """
        records: list[Record] = []
        blocked: set[str] = set()
        deadline = time.monotonic() + self._timeout
        for wave in waves(messages):
            todo = [m for m in wave if m.key is None or m.key not in blocked]
            if not todo or time.monotonic() >= deadline:
                break
            for message, record in zip(todo, await self._publish_wave(todo), strict=True):
                records.append(record)
                if record.kind != "acked" and message.key is not None:
                    blocked.add(message.key)
        return records

    async def _publish_wave(self, wave: Sequence[Message]) -> list[Record]:
        by_broker: dict[str, list[tuple[int, OutgoingMessage]]] = defaultdict(list)
        results: list[PublishResult | None] = [None] * len(wave)
        targets: list[Target | None] = [None] * len(wave)
        for index, message in enumerate(wave):
            target = self._router.resolve(message.topic)
            targets[index] = target
            if target is None:
                results[index] = PublishResult.permanent(NO_ROUTE)
                continue
            if self._max_payload is not None and len(message.payload) > self._max_payload:
                results[index] = PublishResult.permanent(
                    f"payload too large: {len(message.payload)} bytes > relay.max_payload_bytes ({self._max_payload})")
                continue
            by_broker[target.broker].append((index, OutgoingMessage(message, target.destination, target.explicit)))

        async def send(broker: str, items: list[tuple[int, OutgoingMessage]]) -> None:
            answers = await self._publish(broker, [out for _, out in items])
            for (index, _), answer in zip(items, answers, strict=True):
                results[index] = answer

        async with asyncio.TaskGroup() as group:
            for broker, items in by_broker.items():
                group.create_task(send(broker, items))

        return [
            self._decide(message, target, result)
            for message, target, result in zip(wave, targets, results, strict=True)
            if result is not None
        ]

    async def _publish(self, broker: str, batch: list[OutgoingMessage]) -> Sequence[PublishResult]:
        adapter = self._adapters[broker]
        started = time.perf_counter()
        try:
            answers = await asyncio.wait_for(adapter.publish(batch), self._timeout)
        except TimeoutError:
            return [PublishResult.transient(f"publish timed out after {self._timeout:g}s")] * len(batch)
        except Exception as exc:  # an adapter must not take the relay down
            log.error("adapter_failed", broker=broker, error=repr(exc))
            return [PublishResult.transient(f"adapter error: {exc!r}")] * len(batch)
        if len(answers) != len(batch):
            log.error("adapter_result_count", broker=broker, expected=len(batch), got=len(answers))
            return [PublishResult.transient("adapter returned a wrong number of results")] * len(batch)
        self._metrics.publish_duration.labels(broker).observe(time.perf_counter() - started)
        if any(a.outcome is Outcome.ACKED for a in answers):
            self._outage.pop(broker, None)
        elif any(a.outcome is Outcome.UNAVAILABLE for a in answers):
            self._outage[broker] += 1
        return answers

    def _decide(self, message: Message, target: Target | None, result: PublishResult) -> Record:
        broker = target.broker if target else None
        destination = target.destination if target else None
        if result.outcome is Outcome.ACKED:
            return Record(message.id, "acked", broker=broker, destination=destination)
        self._metrics.publish_failures.labels(broker or "", result.outcome.value).inc()
        bound = log.bind(message_id=str(message.message_id), topic=message.topic, broker=broker)
        reason = result.reason or "unknown error"
        if result.outcome is Outcome.PERMANENT:
            bound.warning("message_dead_lettered", reason=reason, attempts=message.attempts + 1)
            return Record(message.id, "dead", reason, broker=broker, destination=destination)
        if result.outcome is Outcome.UNAVAILABLE:
            delay = self._backoff.delay(self._outage.get(broker or "", 1))
            bound.info("broker_unavailable", reason=reason, retry_in_s=round(delay, 3))
            return Record(message.id, "wait", reason, delay, broker, destination)
        attempt = message.attempts + 1
        if attempt >= self._max_attempts:
            dead_reason = f"max attempts ({self._max_attempts}) reached; last error: {reason}"
            bound.warning("message_dead_lettered", reason=dead_reason, attempts=attempt)
            return Record(message.id, "dead", dead_reason, broker=broker, destination=destination)
        delay = self._backoff.delay(attempt)
        bound.info("publish_failed", reason=reason, attempt=attempt, retry_in_s=round(delay, 3))
        return Record(message.id, "retry", reason, delay, broker, destination)
