"""Publishes a claimed batch and decides each message's outcome.

Per-key order. The batch is cut into waves that go out one after the other; each
wave gives every broker its share in one concurrent call. A key's messages are cut
into segments, segment i going in wave i: a segment is one message, or, when the
broker keeps the order of one key's messages handed over in one call (an adapter
that declares ``keeps_key_order``: Kafka, RabbitMQ, file, stdout), the whole
unbroken stretch of the key's messages routed to that broker and destination. So a
hot key goes out in one call instead of one round trip per message, and a key whose
messages go to different brokers or destinations (two Kafka topics: two partitions,
no order between them) never has a later message sent before an earlier one is acked. Keyless messages all go in wave 0.

An adapter may also answer ``not_sent`` for a key's message after earlier ones of the
key were acked in the call (its rounds ran out of time: SQS, NATS with ``key_rounds``):
the message is left as it was, due at once, and its key stops for this batch.

When a message of a key is not acked, the key stops for this batch: later waves
leave it out, and within its call:
- later messages the adapter did not ack are left as they were (no attempt spent)
  and go in a later batch, after the failed one;
- an ordered adapter never acks a later message of a key after an earlier one
  failed (the adapters answer ``not_sent``: adapters/_rounds.py for Kafka), with
  exceptions that the broker itself decides after the fact, RabbitMQ with
  ``pipeline_keys`` returning an unroutable message or nacking one (a full
  ``reject-publish`` queue) while the next ones were taken. A
  later message that was acked anyway is delivered: it is marked dispatched (sending
  it again would only add a duplicate) and logged as ``key_order_exception``, unless
  the failure was a dead letter under ``release``, where going on is the policy.
"""

from __future__ import annotations

import asyncio
import copy
import json
import time
from collections import defaultdict
from collections.abc import Callable, Hashable, Mapping, Sequence

import structlog

from outbox_relay.adapter import Adapter, keeps_key_order
from outbox_relay.claim_check.uploads import ClaimChecks
from outbox_relay.engine.circuit import Circuit
from outbox_relay.engine.retry import Backoff
from outbox_relay.engine.routing import Router, Target
from outbox_relay.models import Message, Outcome, OutgoingMessage, PublishResult, Record, RecordKind
from outbox_relay.observability.metrics import RelayMetrics

log = structlog.get_logger("outbox_relay.dispatch")

NO_ROUTE = "no route"
MAX_REASON_CHARS = 2000


def clean_reason(text: str) -> str:
    """A reason as it can be stored and logged: an adapter's or broker's text may hold a
    NUL (PostgreSQL text refuses it: recording the batch failed, and the relay restarted
    into the same batch) or a lone surrogate (no UTF-8 for it: the log line failed), and
    may be any length."""
    text = text.replace("\x00", "\\0").encode("utf-8", "backslashreplace").decode("utf-8")
    return text if len(text) <= MAX_REASON_CHARS else text[: MAX_REASON_CHARS - 1] + "…"


Grouping = Callable[[Message], Hashable | None]


def waves(messages: Sequence[Message], same_call: Grouping | None = None) -> list[list[Message]]:
    """Split a batch (in enqueue order) into waves that keep per-key order.

    `same_call(m)` names the ordered broker call that `m` may share with the message of
    its key right before it (None: it may not share one); without it every message of
    a key goes in a wave of its own.
    """
    result: list[list[Message]] = []
    wave_of: dict[str, int] = {}
    call_of: dict[str, Hashable | None] = {}
    for message in messages:
        index = 0
        key = message.key
        if key is not None:
            call = same_call(message) if same_call is not None else None
            if key in wave_of:
                index = wave_of[key] if call is not None and call_of[key] == call else wave_of[key] + 1
            wave_of[key] = index
            call_of[key] = call
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
        hold_dead_letters: bool = False,
        receipts: bool = True,
        claim_checks: ClaimChecks | None = None,
    ):
        self._adapters = adapters
        # Large payloads to object storage before the broker call (claim_check/uploads.py).
        self.claim_checks = claim_checks
        self._router = router
        self._backoff = backoff
        self._max_attempts = max_attempts
        self._timeout = publish_timeout
        self._metrics = metrics or RelayMetrics()
        self._max_payload = max_payload_bytes
        self._hold = hold_dead_letters
        # relay.receipts: each acked message's receipt, opened once per broker and
        # destination (the broker's words are appended to it per message).
        self._receipts = receipts
        self._receipt_heads: dict[tuple[str, str], str] = {}
        # A receipt that is not JSON would fail the mark, and with it the batch, again and
        # again: a third-party adapter's words are checked; this package's are JSON by
        # construction (and checking them would cost every message a parse).
        self._unchecked = {name for name, adapter in adapters.items() if _ours(adapter)}
        self._ordered = {name for name, adapter in adapters.items() if keeps_key_order(adapter)}
        # Consecutive "unreachable" answers per broker: the backoff for messages that
        # did not spend an attempt grows with the outage, not with the message.
        self._outage: dict[str, int] = defaultdict(int)
        self.circuits = {
            name: Circuit(name, adapter, backoff, publish_timeout, self._metrics.broker_circuit_open.labels(name))
            for name, adapter in adapters.items()
        }

    def replacing(self, broker: str, adapter: Adapter) -> Dispatcher:
        """A dispatcher with the same routes and policy that publishes to `broker`
        through `adapter` (an exactly-once relay's transactions: sources/wal/
        exactly_once.py). It shares this one's metrics and its other brokers' circuits;
        `adapter`, another connection, gets a circuit of its own that gates its calls
        only (a refusal on one connection does not hold the other's messages, nor does
        one connection's recovery close the other's circuit), joined to this one's for
        `broker` so that /readyz, the console and the gauge report the broker open
        while either is (circuit.py, joined)."""
        other = Dispatcher(
            {**self._adapters, broker: adapter},
            self._router,
            self._backoff,
            max_attempts=self._max_attempts,
            publish_timeout=self._timeout,
            metrics=self._metrics,
            max_payload_bytes=self._max_payload,
            hold_dead_letters=self._hold,
            receipts=self._receipts,
            claim_checks=self.claim_checks,
        )
        for name, circuit in self.circuits.items():
            other.circuits[name].cancel()
            other.circuits[name] = circuit.joined(adapter) if name == broker else circuit
        return other

    @property
    def adapters(self) -> Mapping[str, Adapter]:
        return self._adapters

    @property
    def metrics(self) -> RelayMetrics:
        """The registry it counts into: the relay's, which the sources it serves share."""
        return self._metrics

    def _same_call(self, message: Message) -> tuple[str, str] | None:
        # A run shares a call only while it goes to one destination of one broker: two
        # Kafka topics are two partitions, with no order between them.
        target = self._router.resolve(message.topic)
        if target is None or target.broker not in self._ordered or self._too_large(message):
            return None
        return target.broker, target.destination

    def _too_large(self, message: Message) -> bool:
        return self._max_payload is not None and message.size > self._max_payload

    async def dispatch(self, messages: Sequence[Message]) -> list[Record]:
        """Publish in waves; start no new wave once `publish_timeout` has passed.

        The claiming transaction sits idle while the waves go out, and Postgres ends a
        session idle in a transaction for too long (the relay sets that limit): a key
        whose messages need many waves must not keep it open that long. Messages of
        waves not started stay unattempted and go in a later batch.
        """
        records: list[Record] = []
        stopped: set[str] = set()
        deadline = time.monotonic() + self._timeout
        for wave in waves(messages, self._same_call):
            todo = [m for m in wave if m.key is None or m.key not in stopped]
            if not todo or time.monotonic() >= deadline:
                break
            failed_at: dict[str, Record] = {}  # key -> its first failure in this wave
            acked: set[str] = set()  # keys with a message acked in this wave
            for message, target, result in await self._publish_wave(todo):
                key = message.key
                if key is not None and key in failed_at:
                    late = self._after_failure(message, target, result, failed_at[key])
                    if late is None:  # left pending: anything acked after it is out of order
                        failed_at[key] = Record(message.id, RecordKind.RETRY, clean_reason(result.reason or ""))
                    else:
                        records.append(late)
                        if late.kind is not RecordKind.ACKED:
                            failed_at[key] = late
                    continue
                if result.outcome is Outcome.NOT_SENT:
                    if key is not None and key in acked:
                        # The call ran out of time after acking the key's earlier messages
                        # (an adapter sending a key's run in rounds bounded by its timeout:
                        # SQS, NATS with key_rounds). Nothing is wrong: the message is left
                        # as it was, due at once, and the key stops for this batch; the
                        # next claim takes it up. Every call acks or tries each key's first
                        # message, so this cannot loop without progress.
                        failed_at[key] = Record(message.id, RecordKind.RETRY, clean_reason(result.reason or ""))
                        stopped.add(key)
                        continue
                    # Otherwise "not sent" is only for a message after its key's failure in
                    # this call (handled above). Anything else is an adapter's mistake: a
                    # transient failure, so it backs off instead of looping.
                    result = PublishResult.transient(f"adapter answered not_sent out of turn: {result.reason}")
                record = self._decide(message, target, result)
                records.append(record)
                if key is None:
                    continue
                if record.kind is RecordKind.ACKED:
                    acked.add(key)
                else:
                    failed_at[key] = record
                    stopped.add(key)
        return records

    def _after_failure(
        self, message: Message, target: Target | None, result: PublishResult, failure: Record
    ) -> Record | None:
        """A message of a key after the key's first failure in the same call."""
        released = failure.kind is RecordKind.DEAD and not self._hold
        if result.outcome is Outcome.ACKED:
            if not released:
                log.warning(
                    "key_order_exception",
                    message_id=str(message.message_id),
                    key=message.key,
                    failed_id=failure.id,
                    reason=failure.error,
                )
            return self._decide(message, target, result)
        if released and result.outcome is not Outcome.NOT_SENT:
            return self._decide(message, target, result)
        return None  # left as it was: goes again, after the failed message, in a later batch

    async def _publish_wave(self, wave: Sequence[Message]) -> list[tuple[Message, Target | None, PublishResult]]:
        by_broker: dict[str, list[tuple[int, OutgoingMessage]]] = defaultdict(list)
        claim_checked: set[str] = set()  # brokers with a message for the claim check
        results: list[PublishResult | None] = [None] * len(wave)
        targets: list[Target | None] = [None] * len(wave)
        for index, message in enumerate(wave):
            target = self._router.resolve(message.topic)
            targets[index] = target
            if target is None:
                results[index] = PublishResult.permanent(NO_ROUTE)
                continue
            if self._too_large(message):
                results[index] = PublishResult.permanent(
                    f"payload too large: {message.size} bytes > relay.max_payload_bytes ({self._max_payload})"
                )
                continue
            by_broker[target.broker].append((index, OutgoingMessage(message, target.destination, target.explicit)))
            if self.claim_checks is not None and self.claim_checks.wanted(message, target.claim_check):
                claim_checked.add(target.broker)

        async def send(broker: str, items: list[tuple[int, OutgoingMessage]]) -> None:
            if broker in claim_checked and self.claim_checks is not None:
                items, held = await self.claim_checks.prepare(
                    [(index, out, targets[index].claim_check) for index, out in items],  # type: ignore[union-attr]
                    ordered=broker in self._ordered,
                )
                for index, answer in held.items():
                    results[index] = answer
                if not items:
                    return
            answers = await self._publish(broker, [out for _, out in items])
            for (index, _), answer in zip(items, answers, strict=True):
                results[index] = answer

        async with asyncio.TaskGroup() as group:
            for broker, items in by_broker.items():
                group.create_task(send(broker, items))

        return [
            (message, target, result)
            for message, target, result in zip(wave, targets, results, strict=True)
            if result is not None
        ]

    def keeps_order(self, broker: str) -> bool:
        return broker in self._ordered

    async def publish_to(self, broker: str, batch: list[OutgoingMessage]) -> Sequence[PublishResult]:
        """One call to `broker` outside a claimed batch (a dead-letter topic's copies),
        through the claim check its messages' topics have, the broker's circuit and
        within publish_timeout, like a batch's calls."""
        if self.claim_checks is None:
            return await self._publish(broker, batch)
        checks = self.claim_checks
        items = []
        for index, out in enumerate(batch):
            target = self._router.resolve(out.message.topic)
            items.append((index, out, target.claim_check if target is not None else self._router.default_claim_check))
        ready, held = await checks.prepare(items, ordered=broker in self._ordered)
        answers: list[PublishResult | None] = [None] * len(batch)
        for index, answer in held.items():
            answers[index] = answer
        if ready:
            for (index, _), answer in zip(ready, await self._publish(broker, [out for _, out in ready]), strict=True):
                answers[index] = answer
        return [a if a is not None else PublishResult.transient("not published") for a in answers]

    async def _publish(self, broker: str, batch: list[OutgoingMessage]) -> Sequence[PublishResult]:
        circuit = self.circuits[broker]
        blocked = circuit.blocked()
        if blocked is not None:  # no call, so no copy queued in a client that holds it (circuit.py)
            self._outage[broker] += 1
            return [PublishResult.unavailable(blocked)] * len(batch)
        if circuit.take_trial():
            # Half-open: one message tries the broker, the rest wait for its answer.
            held = [PublishResult.unavailable(f"broker {broker!r} on trial after an outage")] * (len(batch) - 1)
            answered = False
            try:
                answers = await self._call(broker, circuit, batch[:1])
                answered = True
            finally:
                # Acked or unanswered, _call closed or tripped the circuit; any other
                # answer (a rejection) also shows the broker back. Cancelled: try again.
                circuit.end_trial(answered=answered)
            return [*answers, *held]
        return await self._call(broker, circuit, batch)

    async def _call(self, broker: str, circuit: Circuit, batch: list[OutgoingMessage]) -> Sequence[PublishResult]:
        adapter = self._adapters[broker]
        started = time.perf_counter()
        try:
            # asyncio.timeout, not wait_for: wait_for runs the call in a task of its own,
            # which keeps an adapter's exception, whose traceback keeps wait_for's frame,
            # which keeps the task: a cycle holding the batch's payloads until the garbage
            # collector runs (tests/unit/test_dispatch.py, ..._leaves_no_garbage_cycle).
            async with asyncio.timeout(self._timeout):
                answers = await adapter.publish(batch)
        except TimeoutError:
            # Not one answer in publish_timeout: the broker is away, not the messages wrong.
            reason = f"no answer within publish_timeout ({self._timeout:g}s)"
            circuit.trip(reason)
            self._outage[broker] += 1
            return [PublishResult.unavailable(reason)] * len(batch)
        except Exception as exc:  # an adapter must not take the relay down
            log.error("adapter_failed", broker=broker, error=repr(exc))
            return [PublishResult.transient(f"adapter error: {exc!r}")] * len(batch)
        if len(answers) != len(batch):
            log.error("adapter_result_count", broker=broker, expected=len(batch), got=len(answers))
            return [PublishResult.transient("adapter returned a wrong number of results")] * len(batch)
        self._metrics.publish_duration.labels(broker).observe(time.perf_counter() - started)
        if any(a.outcome is Outcome.ACKED for a in answers):
            self._outage.pop(broker, None)
            circuit.close()
        elif any(a.outcome is Outcome.UNAVAILABLE for a in answers):
            self._outage[broker] += 1
            if all(a.outcome in (Outcome.UNAVAILABLE, Outcome.NOT_SENT) for a in answers):
                circuit.trip(next(a.reason for a in answers if a.outcome is Outcome.UNAVAILABLE) or "unavailable")
        return answers

    def _receipt(self, target: Target, words: str | None) -> str:
        """The receipt kept with an acked message: the broker and destination, and what
        the adapter said of where it landed (the text of a JSON object, or None). Text,
        not a dict: one string per message, no JSON encoding on the hot path."""
        head = self._receipt_heads.get((target.broker, target.destination))
        if head is None:
            if len(self._receipt_heads) >= 10_000:  # a destination per tenant: bounded
                self._receipt_heads.clear()
            head = self._receipt_heads[(target.broker, target.destination)] = (
                f'{{"broker":{json.dumps(target.broker)},"destination":{json.dumps(target.destination)}'
            )
        if words is None or len(words) <= 2:
            return head + "}"
        if target.broker in self._unchecked:
            return f"{head},{words[1:]}"
        checked = _checked_receipt(words, target)
        if checked is None:
            log.warning("adapter_receipt_invalid", broker=target.broker, receipt=words[:200])
            return head + "}"
        return checked

    def without_receipts(self) -> Dispatcher:
        """This dispatcher, sharing its circuits, outages and metrics, building no receipts:
        for a source whose messages have no row to keep one in (the WAL source streams)."""
        other = copy.copy(self)
        other._receipts = False
        return other

    def close(self) -> None:
        """Stop the circuits' background probes."""
        for circuit in self.circuits.values():
            circuit.cancel()

    def _decide(self, message: Message, target: Target | None, result: PublishResult) -> Record:
        broker = target.broker if target else None
        destination = target.destination if target else None
        if result.outcome is Outcome.ACKED:
            receipt = self._receipt(target, result.receipt) if self._receipts and target else None
            return Record(message.id, RecordKind.ACKED, broker=broker, destination=destination, receipt=receipt)
        self._metrics.publish_failures.labels(broker or "", result.outcome.value).inc()
        bound = log.bind(message_id=str(message.message_id), topic=message.topic, broker=broker)
        reason = clean_reason(result.reason or "unknown error")
        if result.outcome is Outcome.PERMANENT:
            bound.warning("message_dead_lettered", reason=reason, attempts=message.attempts + 1)
            return Record(message.id, RecordKind.DEAD, reason, broker=broker, destination=destination)
        if result.outcome is Outcome.UNAVAILABLE:
            delay = max(self._backoff.delay(self._outage.get(broker or "", 1)), result.retry_after or 0.0)
            bound.info("broker_unavailable", reason=reason, retry_in_s=round(delay, 3))
            return Record(message.id, RecordKind.WAIT, reason, delay, broker, destination)
        attempt = message.attempts + 1
        if attempt >= self._max_attempts:
            dead_reason = clean_reason(f"max attempts ({self._max_attempts}) reached; last error: {reason}")
            bound.warning("message_dead_lettered", reason=dead_reason, attempts=attempt)
            return Record(message.id, RecordKind.DEAD, dead_reason, broker=broker, destination=destination)
        delay = self._backoff.delay(attempt)
        bound.info("publish_failed", reason=reason, attempt=attempt, retry_in_s=round(delay, 3))
        return Record(message.id, RecordKind.RETRY, reason, delay, broker, destination)


def _ours(adapter: object) -> bool:
    """Whether an adapter (behind the engine's BrokerHandle, if it is one) is this
    project's (the built-in adapters are installed as outbox_relay_adapters): its
    receipts are JSON objects by construction and need no check."""
    inner = getattr(adapter, "adapter", adapter)
    return type(inner).__module__.split(".", 1)[0] in {"adapters", "outbox_relay_adapters", "outbox_relay"}


def _no_constant(name: str) -> object:
    raise ValueError(f"{name} is not JSON")


def _checked_receipt(words: str, target: Target) -> str | None:
    """A third-party adapter's receipt as PostgreSQL's jsonb takes it, or None: a JSON
    object without NaN or Infinity, and no NUL character (jsonb refuses both), written
    anew with the relay's broker and destination, which it cannot overwrite."""
    try:
        said = json.loads(words, parse_constant=_no_constant)
    except ValueError:
        return None
    if not isinstance(said, dict):
        return None
    text = json.dumps({**said, "broker": target.broker, "destination": target.destination}, allow_nan=False)
    return None if "\\u0000" in text else text
