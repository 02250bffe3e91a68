"""Exactly once into Kafka: each WAL batch one Kafka transaction with the position it
reaches (a Kafka broker block with ``exactly_once: true``; the producer side is the
adapter's, adapters/kafka_transactions.py).

The position of a message is (its transaction's commit LSN, its own LSN): commit
order, then order inside the transaction, which is how the slot hands them out. A
batch's position is its last message's; a transaction split over several batches (one
of a million messages) gets one position per batch, so a restart resumes inside it.

A batch (relay.py hands it over, stream order kept):
1. ``begin``; the dispatcher (the relay's own, with the exactly-once broker's adapter
   replaced by this transaction) publishes every message, in as many rounds as its
   waves need; records the broker acks are written, but only inside the transaction.
2. All acked: what is parked (below) is committed into the table first, then the
   position is written to the offsets topic and the transaction committed: records and
   position become visible to ``read_committed`` consumers together. Only then is the
   slot told (relay.py), so the slot keeps the WAL of anything not yet committed.
3. Anything not acked: the transaction is aborted (nothing of it is ever seen by a
   ``read_committed`` consumer), and then:
   - a message the broker rejects for good (DEAD: too large, invalid topic, max
     attempts) is parked as a dead letter, as in the WAL source, with the rest of its
     key under ``hold``; the batch goes again without it;
   - a broker away (WAIT) or a transient failure (RETRY: an attempt spent, a dead
     letter at ``max_attempts``): the relay pauses (the dispatcher's backoff) and the
     batch goes again in a new transaction. Nothing is parked for an outage, however
     long (``park_after`` does not apply): the table path publishes at least once, so
     the stream pauses and the slot keeps the WAL (its lag metric and alert say so);
   - a message acked for another broker (a route to RabbitMQ beside Kafka) is done
     for good: that broker has no transaction, and it is not sent again.
4. A commit that fails (the broker went away during it, the answer was lost): whether
   it committed is not known. The producer is restarted and the position read back
   with ``read_committed``: at or past the batch's, it committed; else it goes again.
5. Fenced (a newer relay registered the same transactional id): one line
   (``wal_producer_fenced``), nothing more is published, and the relay stops
   (``Fenced``; the runner stands by, since the other relay streams the slot).
   A relay away past its timeouts (frozen, cut off) meanwhile does not learn it from a
   refused request: its calls time out, and the producer it starts again fences the
   newer relay in turn. So every restart reads Kafka's position back: anything but this
   relay's own last commit (or the unsure one's) was committed by another relay, and
   what this one still holds from its stream may be in it: one line
   (``wal_producer_superseded``), and it stops as if fenced; the slot's next stream
   resumes from Kafka's position.

At start, after the producer is registered (which aborts what a fenced one left
open), the last committed position is read: every message at or before it is skipped,
it was committed. A park commits before its Kafka transaction, so after a crash
between the two the table's ``done_through`` is beyond Kafka's position: in that
window, messages found in the table were parked and are skipped, the rest go out
again, as that batch would have sent them (without asking the table whether their key
is held: it is, by the very park that batch made after them).

What it does not cover (docs/how-to/kafka.md, "Exactly once into Kafka"): messages that go through
the table (parked, then requeued or released) are published at least once, as the
table source does; so are routes to brokers without transactions.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime

import structlog

from outbox_relay.adapter import (
    Adapter,
    Fenced,
    PositionUndecided,
    TransactionFailed,
    Transactions,
    keeps_key_order,
)
from outbox_relay.engine.circuit import Circuit
from outbox_relay.engine.dispatch import Dispatcher
from outbox_relay.engine.retry import Backoff
from outbox_relay.errors import OutboxRelayError, first_line
from outbox_relay.models import Message, OutgoingMessage, PublishResult, Record, RecordKind
from outbox_relay.sources.wal import pgoutput
from outbox_relay.sources.wal.outcomes import Parked, sort_outcomes

log = structlog.get_logger("outbox_relay.wal")

Position = tuple[int, int]  # (commit LSN, message LSN)


class PositionAhead(OutboxRelayError):
    """The offsets topic holds a position past this database's WAL."""


def transactional_id(system_id: str, slot: str) -> str:
    """The same for every relay of one slot of one cluster (a promoted standby shares
    the primary's system identifier), and for no other."""
    return f"outbox-relay-{system_id}-{slot}"


def position_key(system_id: str, slot: str) -> str:
    return f"{system_id}/{slot}"


def encode(position: Position, *, slot: str, messages: int) -> bytes:
    return json.dumps(
        {
            "commit_lsn": pgoutput.format_lsn(position[0]),
            "lsn": pgoutput.format_lsn(position[1]),
            "slot": slot,
            "messages": messages,
            "at": datetime.now(UTC).isoformat(timespec="milliseconds"),
        },
        separators=(",", ":"),
    ).encode("utf-8")


def decode(value: bytes) -> Position:
    try:
        data = json.loads(value)
        return pgoutput.parse_lsn(data["commit_lsn"]), pgoutput.parse_lsn(data["lsn"])
    except (ValueError, KeyError, TypeError) as exc:
        raise OutboxRelayError(f"unreadable position in the offsets topic: {value[:200]!r}") from exc


class _InTransaction:
    """The exactly-once broker as the dispatcher sees it: its publish goes into the
    open transaction; ready() is the broker's own."""

    def __init__(self, broker: Adapter, transactions: Transactions):
        self.name = broker.name
        self.keeps_key_order = keeps_key_order(broker)
        self._broker = broker
        self._transactions = transactions

    async def connect(self) -> None:
        return None

    async def close(self) -> None:
        return None

    async def ready(self) -> bool:
        return await self._broker.ready()

    async def publish(self, batch: Sequence[OutgoingMessage]) -> Sequence[PublishResult]:
        return await self._transactions.publish(batch)


class ExactlyOnce:
    """One WAL relay's transactions; see the module docstring."""

    def __init__(
        self,
        broker: str,
        transactions: Transactions,
        dispatcher: Dispatcher,
        backoff: Backoff,
        *,
        slot: str,
        key: str,
        hold_dead_letters: bool,
        counted: Callable[[str, str], None] = lambda broker, outcome: None,
    ):
        self.broker = broker
        self._counted = counted  # (broker, outcome): the transactions metric (lag.py)
        self._transactions = transactions
        self._dispatcher = dispatcher.replacing(broker, _InTransaction(dispatcher.adapters[broker], transactions))
        self._backoff = backoff
        self._slot = slot
        self._key = key
        self._hold = hold_dead_letters
        self._started = False
        self._unsure: Position | None = None  # a commit whose outcome is not known
        self.committed: Position | None = None  # the last position known committed
        self.transactions = 0

    async def open(self, stop: asyncio.Event, wal_end: int) -> Position | None:
        """Register the producer (fencing older ones) and read the last committed
        position; None if stopped first. Refuses a position past `wal_end`."""
        started, self.committed = await self._start(stop)
        if not started:
            return None
        if self.committed is not None and self.committed[0] > wal_end:
            raise PositionAhead(
                f"the offsets topic says slot {self._slot!r} was published through"
                f" {pgoutput.format_lsn(self.committed[0])}, past this database's WAL"
                f" ({pgoutput.format_lsn(wal_end)}): a restore or another cluster? Delete key"
                f" {self._key!r} from the offsets topic (a null record) once no message would be lost"
            )
        log.info(
            "wal_exactly_once_started",
            broker=self.broker,
            committed=None if self.committed is None else pgoutput.format_lsn(self.committed[0]),
        )
        return self.committed

    @property
    def _circuit(self) -> Circuit:
        return self._dispatcher.circuits[self.broker]

    async def close(self) -> None:
        self._circuit.leave()  # the broker is reported without this connection's circuit
        await self._transactions.close()

    async def _start(self, stop: asyncio.Event) -> tuple[bool, Position | None]:
        """Start the producer and read Kafka's position back, trying again with the
        backoff while the broker is away (or the offsets topic cannot be read: its
        partition moving, another relay's transaction open on it); (False, None) if
        stopped first."""
        attempt = 0
        while not stop.is_set():
            try:
                await self._transactions.start()
                raw = await self._transactions.position(self._key)
            except OutboxRelayError:  # the offsets topic unfit, a position unreadable
                raise
            except Exception as exc:
                await self._transactions.abort()
                # The broker away (or refusing the relay: an ACL), told where every
                # other outage is told: this connection's circuit, reported with the
                # broker's (the log line, the gauge, /readyz, the console). A kill that
                # lands between two publishes (in a commit, before a begin) comes here
                # without a publish timing out, and nothing said the broker was away.
                # Another relay's transaction open on the positions topic is not that.
                if not isinstance(exc, PositionUndecided):
                    self._circuit.trip(first_line(exc))
                attempt += 1
                delay = self._backoff.delay(attempt)
                log.warning(
                    "wal_exactly_once_producer_unavailable",
                    broker=self.broker,
                    error=first_line(exc),
                    retry_in_s=round(delay, 2),
                )
                await _sleep(delay, stop)
                continue
            # Registered with the transaction coordinator and read the offsets topic: the
            # broker answers. A circuit left open would hold the next batch for a probe
            # up to the backoff's longest delay away; were the broker still to refuse
            # writes, that batch times out, the circuit opens again and the abort drops
            # its records (no copy is kept in a client, which is why circuit.py sends a
            # single trial message for brokers without transactions). This connection's
            # circuit only: the table path's, if open, recovers by its own trial.
            if self._circuit.open:
                self._circuit.close()
            self._started = True
            return True, None if raw is None else decode(raw)
        return False, None

    async def _restart(self, stop: asyncio.Event) -> bool:
        """A new producer after a failure, and Kafka's position read back: this relay's
        last commit, or the unsure one's; anything else was committed by another relay
        (raises Fenced, see _superseded)."""
        await self._abort()
        started, found = await self._start(stop)
        if not started:
            return False
        if found not in (self.committed, self._unsure):
            raise self._superseded(found)
        self.committed = found
        return True

    async def publish(
        self,
        todo: Sequence[Message],
        held: set[str],
        parked: list[Parked],
        through: Position,
        park: Callable[[list[Parked]], Awaitable[None]],
        stop: asyncio.Event,
        paused: Callable[[bool], None],
    ) -> list[Record] | None:
        """Publish `todo` in one committed transaction with `through`. `parked` (the
        messages of keys the table holds) grows with what the broker rejects; `park`
        writes what is new in it, before the commit. Returns the acks, or None if
        stopped first (nothing committed: it all comes again)."""
        if not todo and not parked:
            # Nothing to send (a restart's skipped batch): Kafka's position moves with
            # the next batch that has something; the slot may be told this one's end.
            return []
        order = {m.id: i for i, m in enumerate(todo)}
        left: dict[int, Message] = {m.id: m for m in todo}
        done: list[Record] = []  # acked by a broker without transactions: final
        written = 0  # how many of `parked` are in the table
        acks: list[Record] = []
        while not stop.is_set():
            if self._transactions.fenced:
                raise self._fenced()
            if not self._started and not await self._restart(stop):
                return None
            if self._unsure is not None:
                unsure, self._unsure = self._unsure, None
                if self.committed is not None and self.committed >= unsure:
                    log.info("wal_exactly_once_commit_found", position=pgoutput.format_lsn(unsure[1]))
                    return done + acks
            messages = sorted(left.values(), key=lambda m: order[m.id])
            outcome = await self._one_transaction(messages, held, left, done, parked)
            if isinstance(outcome, float):  # aborted: pause if a broker is away, then again
                if outcome > 0:
                    paused(True)
                    await _sleep(outcome, stop)
                continue
            paused(False)
            acks = outcome
            if len(parked) > written:
                try:
                    await park(parked[written:])
                except Fenced:  # the slot is another relay's now (parking.py)
                    raise self._fenced() from None
                written = len(parked)
            try:
                await self._transactions.commit(self._key, encode(through, slot=self._slot, messages=len(todo)))
            except Fenced:
                raise self._fenced() from None
            except TransactionFailed as exc:
                log.warning("wal_exactly_once_commit_failed", broker=self.broker, error=first_line(exc))
                self._counted(self.broker, "unsure")
                self._unsure, self._started = through, False
                continue
            self.committed = through
            self.transactions += 1
            self._counted(self.broker, "committed")
            return done + acks
        return None

    async def _one_transaction(
        self,
        messages: list[Message],
        held: set[str],
        left: dict[int, Message],
        done: list[Record],
        parked: list[Parked],
    ) -> list[Record] | float:
        """Publish `messages` in a new transaction: the acks to keep (the transaction
        is ready to commit), or how long to pause (it was aborted). Updates `left`,
        `done` and `parked` with what is settled for good."""
        try:
            await self._transactions.begin()
        except Exception as exc:
            if self._transactions.fenced:
                raise self._fenced() from exc
            log.warning("wal_exactly_once_begin_failed", broker=self.broker, error=first_line(exc))
            self._started = False
            return self._backoff.delay(1)
        in_transaction: list[Record] = []
        todo = messages
        while todo:
            records = await self._dispatcher.dispatch(todo)
            if self._transactions.fenced:
                raise self._fenced()
            ours = {r.id for r in records if r.broker == self.broker}
            # A transient failure of ours goes again in the next transaction, an attempt
            # spent (the dispatcher dead-letters it at max_attempts): never into the table.
            retried = {r.id for r in records if r.kind is RecordKind.RETRY and r.id in ours}
            waits = [dataclasses.replace(r, kind=RecordKind.WAIT) if r.id in retried else r for r in records]
            # Another broker (no transactions: at least once anyway) that is away or
            # fails: its messages are parked at once, as the table would retry them, and
            # the Kafka stream goes on; holding the whole batch for it stalled the stream
            # for as long as that broker's outage (found by review).
            theirs_waiting = {r.id for r in records if r.kind is RecordKind.WAIT and r.id not in ours}
            cut = self._cut_short(todo, records, ours)
            waits += cut
            theirs_waiting.update(r.id for r in cut)
            round_ = sort_outcomes(
                todo, waits, held, hold_dead_letters=self._hold, park_waits=False, parked_waits=theirs_waiting
            )
            for record in records:
                if record.kind is RecordKind.ACKED:
                    (in_transaction if record.id in ours else done).append(record)
                    if record.id not in ours:
                        left.pop(record.id, None)
            for message, outcome in round_.parked:
                left.pop(message.id, None)
                parked.append((message, outcome))
            for message_id in retried:
                message = left[message_id]
                left[message_id] = dataclasses.replace(message, attempts=message.attempts + 1)
            if any(r.kind is not RecordKind.ACKED for r in records if r.id in ours):
                # A record of ours refused or not acked: the transaction cannot commit
                # what it holds (a refused record leaves the producer's sequence out of
                # step): abort; what waits goes again after the backoff, the rest now.
                await self._abort()
                self._park_behind_held(left, parked, held)
                delays = [r.delay for r in round_.waiting]
                return max(0.01, min(delays)) if delays else 0.0
            todo = round_.again  # waves not started, keys behind a parked one: same transaction
        return in_transaction

    @staticmethod
    def _cut_short(todo: Sequence[Message], records: Sequence[Record], ours: set[int]) -> list[Record]:
        """WAIT records for the keys whose run to another broker was cut short by that
        adapter's own time (not_sent after an ack, engine/dispatch.py: no record): the
        first unrecorded message of each such key, so that it is parked at once with the
        rest of its key behind it, as that broker's waits are, and the Kafka transaction
        is not held open while the other broker's rounds go on."""
        recorded = {r.id for r in records}
        by_id = {m.id: m for m in todo}
        theirs_acked = {
            by_id[r.id].key for r in records if r.kind is RecordKind.ACKED and r.id not in ours and r.id in by_id
        }
        cut: list[Record] = []
        for message in todo:
            key = message.key
            if key is not None and key in theirs_acked and message.id not in recorded:
                cut.append(Record(message.id, RecordKind.WAIT, "not sent: another broker's rounds ran out of time"))
                theirs_acked.discard(key)  # the rest of the key follows it into the table
        return cut

    @staticmethod
    def _park_behind_held(left: dict[int, Message], parked: list[Parked], held: set[str]) -> None:
        """After an abort: a message of a held key after the key's first parked one goes
        to the table behind it, even if the aborted transaction had acked it (an ordered
        adapter may ack a later record of a key whose earlier one it refused: dispatch.py
        takes that ack as delivered, which an aborted transaction is not)."""
        first: dict[str, int] = {}
        for message, _ in parked:
            if message.key is not None and message.key in held:
                first[message.key] = min(first.get(message.key, message.id), message.id)
        behind = [m for m in left.values() if m.key is not None and m.key in first and m.id > first[m.key]]
        for message in behind:
            del left[message.id]
            parked.append((message, None))

    async def _abort(self) -> None:
        if self._started:
            self._counted(self.broker, "aborted")
        self._started = False
        await self._transactions.abort()

    def _fenced(self) -> Fenced:
        self._counted(self.broker, "fenced")
        log.error(
            "wal_producer_fenced",
            broker=self.broker,
            slot=self._slot,
            detail="another relay registered the same transactional id: this one publishes nothing more",
        )
        return Fenced(f"the exactly-once producer of slot {self._slot!r} was fenced by a newer relay")

    def _superseded(self, found: Position | None) -> Fenced:
        """Another relay took the slot while this one was away (frozen past its timeouts,
        cut off): this one's failures came after, its new producer fenced that relay in
        turn, and what it holds from its stream may be committed already. It stops; the
        slot's next stream, this relay's or the other's, resumes from Kafka's position."""
        self._counted(self.broker, "fenced")
        log.error(
            "wal_producer_superseded",
            broker=self.broker,
            slot=self._slot,
            committed=None if found is None else pgoutput.format_lsn(found[1]),
            detail="another relay committed past this one's position: this one publishes nothing more",
        )
        return Fenced(f"another relay of slot {self._slot!r} committed past this one's position")


async def _sleep(seconds: float, stop: asyncio.Event) -> None:
    """Sleep `seconds`, or less if `stop` is set first."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), timeout=seconds)
