"""The WAL source's relay: stream a slot, publish through the engine's dispatcher, park
what the brokers do not take into the outbox table, confirm what is done.

For each batch: a part of a committed transaction (stream.py, in commit order) and the
parts that have arrived after it, up to one part's bounds (many small transactions go
in one dispatch, as a claim of the table takes many rows):

1. Its frames become Messages (framing.decode): ``id`` a number rising in stream order
   (the dispatcher's handle on a message; not a row id), ``attempts`` 0, ``created_at``
   the commit time.
2. Keys the table holds back (parking.py, ``held_keys``: one query per part for all its
   keys) are parked whole, without publishing: their messages go into the table behind
   what it holds for them, so the table engine keeps their order.
3. The rest go through ``Dispatcher.dispatch``, the table engine's own: same adapters,
   routes, waves, runs of a key in one call to an ordered adapter, rejection rule,
   retry and dead-letter policy. outcomes.py sorts its answer: acked, parked (with the
   state its record says), or dispatched again (not attempted).
4. What is parked is inserted in one committed transaction (parking.py), in stream
   order, before anything later is read, with the position of the batch's last message
   (done_through), which a batch that ends inside a transaction records too: a relay
   that starts again skips the messages up to it (in the table already, or acked)
   instead of parking them twice or sending a large transaction's acked part again.
5. After a transaction's last part, its commit's end LSN is confirmed to the stream
   (never a message's own LSN: stream.py says why). Parts are handled one after the
   other, so everything before it is done too.

At least once: nothing is confirmed before it was acked or parked and the park
committed, so a relay that stops or dies gets every unconfirmed transaction again from
the slot: its acked messages are published again (the duplicates are what was in
flight), except those up to done_through (step 4), which come again from the slot but
are neither published nor parked a second time: in a transaction of a million
messages, a SIGKILL sends again at most the batch in flight, not the whole transaction.

A broker outage (answers ``WAIT``: unreachable, no answer within publish_timeout, its
circuit open). The part in hand is kept, and what waits is dispatched again after the
dispatcher's backoff; the stream is not read meanwhile, so memory holds one part (at
most ``max_part_messages`` / ``max_part_bytes``) and the slot keeps the WAL (its lag
grows: the metric and alert to come watch it). Only once the outage has lasted
``park_after`` seconds (default 60) are waiting messages parked (state ``wait``: no
attempt spent), and from then on, while the outage lasts, every message that waits is
parked at once, and its key with it: the backlog moves into the table, whose engine
retries with its own backoff. The outage clock starts at the first round with a WAIT
answer and stops at the first round without one, or, when nothing was dispatched to
tell (every key parked), at a WAIT that comes more than park_after after the last. So
a short outage parks nothing, and a long one neither grows memory nor stops the relay.
A transient failure (RETRY) or a rejection (DEAD) is parked at once: the table engine's
backoff and attempt count apply.

Lifecycle: ``run()`` until ``stop()``; it raises on a stream or database error (the
caller restarts it; nothing unconfirmed is lost). ``stop()`` ends the read or the
outage pause in progress without confirming the part in hand (it comes again); a
dispatch in progress finishes first (``publish_timeout`` bounds it). One task runs it.
The dispatcher is the caller's, shared as the table engine shares it, and closed by
the caller. ``hold_dead_letters`` must be the dispatcher's policy. ``observer`` (the
relay's: metrics, the demo) is told after each part what was acked and what outcome a
parked message was recorded with, as the table's workers tell of a committed batch.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING, Any
from uuid import UUID

import structlog

from outbox_relay.adapter import Transactions
from outbox_relay.connections import PREPARE_THRESHOLD
from outbox_relay.engine.dispatch import Dispatcher
from outbox_relay.engine.retry import Backoff
from outbox_relay.engine.stopping import until_stopped
from outbox_relay.models import Message, Record, RecordKind
from outbox_relay.sources.wal import exactly_once, framing, pgoutput
from outbox_relay.sources.wal.errors import FrameError
from outbox_relay.sources.wal.exactly_once import ExactlyOnce, Position
from outbox_relay.sources.wal.lag import WalWatch
from outbox_relay.sources.wal.outcomes import Parked, sort_outcomes
from outbox_relay.sources.wal.parking import SNAPSHOT_LIMIT, Parking
from outbox_relay.sources.wal.stream import WalStream
from outbox_relay.sources.wal.transactions import TransactionPart

if TYPE_CHECKING:
    from outbox_relay.sources.base import RelayObserver

log = structlog.get_logger("outbox_relay.wal")


PARK_AFTER_S = 60.0
TRANSACTION_PARTS = 5  # exactly once: a batch (one Kafka transaction) of up to 5 parts' bounds
MIN_PAUSE_S = 0.01  # between two rounds of a part that waits for its broker
_NO_HEADERS: Mapping[str, str] = MappingProxyType({})  # most messages have none: parse nothing


@dataclass(frozen=True)
class _Settled:
    """Exactly once, in the window after a park whose transaction did not commit."""

    parked: frozenset[UUID]  # message ids in the table: skipped
    sent: frozenset[int]  # messages that batch published: sent again, held key or not


class WalRelay:
    """Relays one outbox's WAL messages; see the module docstring for its rules."""

    def __init__(
        self,
        dsn: str,
        *,
        schema: str,
        slot_name: str,
        dispatcher: Dispatcher,
        hold_dead_letters: bool,
        publication: str | None = None,
        park_after: float = PARK_AFTER_S,
        status_interval: float = 10.0,
        max_part_messages: int = 1000,
        max_part_bytes: int = 1 << 20,
        prepare_threshold: int | None = PREPARE_THRESHOLD,
        held_keys_snapshot_limit: int = SNAPSHOT_LIMIT,
        observer: RelayObserver | None = None,
        watch: WalWatch | None = None,
        exactly_once: tuple[str, Callable[[str], Transactions]] | None = None,
        backoff: Backoff | None = None,
        feed_dead_letters: bool = True,
        receipts: bool = False,
        feeds_delivered: Callable[[str], bool] | None = None,
    ):
        self._dsn = dsn
        # outcomes.delivered: which topics' deliveries get an outcome row (None: none).
        self._feeds_delivered = feeds_delivered
        # relay.wal.receipts: the acked messages' receipts written per batch (the
        # dispatcher builds them only then).
        self._receipts = receipts
        self._schema = schema
        self._dispatcher = dispatcher
        self._hold = hold_dead_letters
        self._feed_dead = feed_dead_letters  # outcomes.dead_lettered, for the parked dead letters
        self._park_after = park_after
        self._stream_options: dict[str, Any] = {
            "slot_name": slot_name,
            "publication": publication or slot_name,
            "prefix": framing.PREFIX_FOR(schema),
            "status_interval": status_interval,
            "max_part_messages": max_part_messages,
            "max_part_bytes": max_part_bytes,
        }
        self._prepare_threshold = prepare_threshold
        self._snapshot_limit = held_keys_snapshot_limit
        self._max_batch_messages = max_part_messages
        self._max_batch_bytes = max_part_bytes
        self._observer = observer
        self._watch = watch or WalWatch(slot_name)  # the source's metrics (lag.py)
        self._ids = itertools.count(1)
        self._stop = asyncio.Event()
        self._waiting_since: float | None = None  # the outage clock (module docstring)
        self._last_wait = float("-inf")  # when a round last had a WAIT answer
        self._done_through: tuple[int, int] | None = None  # read at start (_not_parked_yet)
        # Exactly once (exactly_once.py): the broker and its transactions' factory, then
        # the ExactlyOnce of this run; the window of a park whose transaction did not
        # commit (between Kafka's position and the table's done_through).
        self._exactly_once_of = exactly_once
        self._backoff = backoff or Backoff(initial=0.5, maximum=30.0)
        self._exactly_once: ExactlyOnce | None = None
        self._window: tuple[Position, Position] | None = None
        self._streamer: tuple[str, int] | None = None  # exactly once: parks check the slot's walsender
        self.started = asyncio.Event()
        self.published = 0
        self.parked = 0
        self.confirmed_lsn = 0  # the last commit end LSN confirmed to the stream

    def stop(self) -> None:
        if not self._stop.is_set():
            # Only a relay that streamed says so: a standby's runner stops one after each
            # try that found the slot in use, every standby_interval.
            if self.started.is_set():
                log.info("wal_relay_stopping")
            self._stop.set()

    async def run(self) -> None:
        parking = Parking(
            self._dsn,
            self._schema,
            hold_dead_letters=self._hold,
            prepare_threshold=self._prepare_threshold,
            snapshot_limit=self._snapshot_limit,
            feed_dead_letters=self._feed_dead,
        )
        async with parking, WalStream(self._dsn, **self._stream_options) as stream:
            self._done_through = await parking.done_through()
            try:
                if self._exactly_once_of is not None and not await self._open_exactly_once(stream):
                    return
                await self._stream(stream, parking)
            finally:
                if self._exactly_once is not None:
                    await self._exactly_once.close()
        log.info("wal_relay_stopped", published=self.published, parked=self.parked)

    async def _open_exactly_once(self, stream: WalStream) -> bool:
        """Register the transactional producer and read Kafka's position: where the
        restart skips to, with the window of a park Kafka has no commit for."""
        assert self._exactly_once_of is not None
        broker, factory = self._exactly_once_of
        slot_name = self._stream_options["slot_name"]
        self._streamer = (slot_name, stream.walsender_pid)
        transactions = factory(exactly_once.transactional_id(stream.system_id, slot_name))
        self._exactly_once = ExactlyOnce(
            broker,
            transactions,
            self._dispatcher,
            self._backoff,
            slot=slot_name,
            key=exactly_once.position_key(stream.system_id, slot_name),
            hold_dead_letters=self._hold,
            counted=self._watch.transaction,
        )
        committed = await self._exactly_once.open(self._stop, stream.wal_end)
        if self._stop.is_set():
            return False
        # Kafka's position decides what was published; the table's done_through only
        # where a park went beyond it (a park commits before its transaction; with
        # nothing committed to Kafka yet, every park is beyond it).
        # A transaction costs a few round trips whatever it holds (partitions added, the
        # position written, the commit and its markers): parts that have already arrived
        # go in one of up to TRANSACTION_PARTS parts' bounds, which keeps that cost per
        # message small in a drain, and changes nothing when parts come one at a time.
        self._max_batch_messages *= TRANSACTION_PARTS
        self._max_batch_bytes *= TRANSACTION_PARTS
        parked, start = self._done_through, committed or (0, 0)
        self._window = (start, parked) if parked is not None and parked > start else None
        self._done_through = committed
        return True

    async def _stream(self, stream: WalStream, parking: Parking) -> None:
        log.info("wal_relay_started", schema=self._schema, slot=self._stream_options["slot_name"])
        self.started.set()
        self._watch.set_state("streaming")
        while not self._stop.is_set():
            part = await until_stopped(stream.__anext__(), self._stop)
            if part is None:
                break
            parts = await self._with_ready_parts(stream, part)
            if not await self._handle(parts, parking):
                break
            ends = [p.end_lsn for p in parts if p.end_lsn is not None]
            if ends:
                stream.confirm(ends[-1])
                self._watch.confirmed()
                self.confirmed_lsn = ends[-1]
                if parts[-1].end_lsn is None:  # a transaction goes on in the next parts
                    self._watch.reading(parts[-1].commit_time)

    async def _with_ready_parts(self, stream: WalStream, first: TransactionPart) -> list[TransactionPart]:
        """`first` and the parts after it that have already arrived, up to one part's
        bounds (max_part_messages, max_part_bytes; exactly once, TRANSACTION_PARTS') in all: one dispatch for many small
        transactions, as a claim of the table takes many rows. A transaction of one
        message otherwise cost a whole dispatch round trip, which bounded the relay near
        2,000 transactions a second (the benchmark's commit-to-ack at 1,000 msg/s)."""
        parts = [first]
        count, size = len(first.messages), sum(len(m.content) for m in first.messages)
        while count < self._max_batch_messages and size < self._max_batch_bytes and not self._stop.is_set():
            more = await stream.ready_part()
            if more is None:
                break
            parts.append(more)
            count += len(more.messages)
            size += sum(len(m.content) for m in more.messages)
        return parts

    async def _handle(self, parts: Sequence[TransactionPart], parking: Parking) -> bool:
        """Publish or park every message of `parts` (stream order); False if stopped
        before the end."""
        self._watch.reading(parts[0].commit_time)
        messages = [m for part in parts for m in self._messages(part, self._not_parked_yet(part))]
        # Exactly once, after a park whose Kafka transaction did not commit: what that
        # park put in the table is skipped, the rest goes as that batch sent it.
        settled = await self._settled_in_window(parts, messages, parking)
        messages = [m for m in messages if m.message_id not in settled.parked]
        held = await parking.held_keys({m.key for m in messages if m.key is not None and m.id not in settled.sent})
        held_out = [m for m in messages if m.key is not None and m.key in held and m.id not in settled.sent]
        parked: list[Parked] = [(m, None) for m in held_out]
        todo = [m for m in messages if m.key is None or m.key not in held or m.id in settled.sent]
        last = next((p for p in reversed(parts) if p.messages), None)
        through = None if last is None else (last.commit_lsn, last.messages[-1].lsn)
        acked: list[Record] = []
        if self._exactly_once is not None and through is not None:
            written: list[Parked] = []

            async def park(new: list[Parked]) -> None:
                written.extend(new)
                await self._park(parking, new, held, parts, through)

            outcome = await self._exactly_once.publish(
                todo, held, parked, through, park, self._stop, self._watch.paused
            )
            if outcome is None:
                return False
            acked = outcome
            self.published += len(acked)
            parked = written
            # After the Kafka commit, the position a restart skips to: a relay that dies
            # in between loses these rows (docs/how-to/receipts.md), never a message.
            if acked and (self._receipts or self._feeds_delivered is not None):
                await self._record_acked(parking, messages, acked)
        else:
            while todo:
                if self._stop.is_set():
                    # Asked to stop between rounds (a key's run cut short by its adapter's
                    # time goes round again at once, with no pause to notice the stop in):
                    # nothing of this batch is confirmed, it comes again from the slot.
                    return False
                records = await self._dispatcher.dispatch(todo)
                pause = self._outage(records)
                self._watch.paused(pause is not None)
                round_ = sort_outcomes(todo, records, held, hold_dead_letters=self._hold, park_waits=pause is None)
                self.published += round_.acked
                acked += (r for r in records if r.kind is RecordKind.ACKED)
                parked += round_.parked
                todo = round_.again
                if todo and pause is not None and not await self._pause(pause):
                    return False
            # What is kept of the acked messages first: once the position below is
            # recorded, a restart skips them, and would never write it.
            if acked and (self._receipts or self._feeds_delivered is not None):
                await self._record_acked(parking, messages, acked)
            # Every message of `parts` is done: the last one's position is where a restart
            # may skip to (parking.py, done_through), recorded with a park, or on its own
            # when the batch ends inside a transaction (the slot is told only at its commit).
            if not parked and through is not None and parts[-1].end_lsn is None:
                await parking.mark_done(through)
            if parked and through is not None:
                await self._park(parking, parked, held, parts, through)
        if self._observer is not None:
            # As the table's workers tell of a committed batch: what was acked, and the
            # outcomes now recorded in the table (a parked message's retry or dead letter).
            self._observer.batch_recorded(messages, [*acked, *(r for _, r in parked if r is not None)])
        return True

    async def _record_acked(self, parking: Parking, messages: Sequence[Message], acked: Sequence[Record]) -> None:
        """The receipts (relay.wal.receipts) and delivered outcomes (outcomes.delivered)
        of a batch's acked messages, before its position is confirmed: a relay that dies
        first sends the batch again, and writes them again."""
        by_id = {m.id: m for m in messages}
        done = [(by_id[r.id], r.receipt) for r in acked if r.id in by_id]
        receipts = [(m, receipt) for m, receipt in done if receipt is not None] if self._receipts else []
        feeds = self._feeds_delivered
        delivered = [(m, receipt) for m, receipt in done if feeds is not None and feeds(m.topic)]
        await parking.record_acked(receipts, delivered)

    async def _park(
        self,
        parking: Parking,
        parked: list[Parked],
        held: set[str],
        parts: Sequence[TransactionPart],
        through: tuple[int, int],
    ) -> None:
        parked.sort(key=lambda item: item[0].id)  # stream order, across rounds
        await parking.park(parked, through=through, streamer=self._streamer)
        parking.note_held(held)
        self.parked += len(parked)
        self._watch.parked(parked)
        log.info(
            "wal_messages_parked",
            count=len(parked),
            keys=len({m.key for m, _ in parked if m.key is not None}),
            xid=parts[0].xid,
            commit_lsn=pgoutput.format_lsn(parts[0].commit_lsn),
            transactions=len({p.xid for p in parts}),
        )

    async def _settled_in_window(
        self, parts: Sequence[TransactionPart], messages: Sequence[Message], parking: Parking
    ) -> _Settled:
        """In the window (exactly once: Kafka's position, the table's done_through], which
        messages the table has (parked: skip) and which it has not (sent by that batch,
        so sent again whatever the table holds of their key)."""
        window = self._window
        if window is None:
            return _Settled(frozenset(), frozenset())
        positions = [(p.commit_lsn, logical.lsn) for p in parts for logical in self._not_parked_yet(p)]
        inside = [m for m, at in zip(messages, positions, strict=True) if at <= window[1]]
        if any(at > window[1] for at in positions):
            # Past its end: nothing later is in it. Not before: a batch of only skipped
            # messages (at or before Kafka's position) comes first after a restart, and
            # clearing the window on it parked the window's messages a second time.
            self._window = None
        if not inside:
            return _Settled(frozenset(), frozenset())
        in_table = await parking.parked_of([m.message_id for m in inside])
        return _Settled(frozenset(in_table), frozenset(m.id for m in inside if m.message_id not in in_table))

    def _outage(self, records: Sequence[Record]) -> float | None:
        """How long to pause before dispatching what waits for its broker again, or None
        when nothing waits or the outage has lasted park_after (then it is parked)."""
        delays = [r.delay for r in records if r.kind is RecordKind.WAIT]
        if not delays:
            if self._waiting_since is not None:
                log.info("wal_broker_outage_ended")
            self._waiting_since = None
            return None
        now = asyncio.get_running_loop().time()
        if self._waiting_since is not None and now - self._last_wait > self._park_after:
            # No broker said "away" for longer than park_after: what ended the last
            # outage was never dispatched (every key parked behind the table), so no
            # round without a WAIT stopped its clock. This is a new outage: pause first.
            self._waiting_since = None
        self._last_wait = now
        if self._waiting_since is None:
            self._waiting_since = now
            log.warning("wal_broker_outage_pausing", park_after_s=self._park_after, waiting=len(delays))
        left = self._park_after - (now - self._waiting_since)
        if left <= 0:
            return None
        return max(MIN_PAUSE_S, min(min(delays), left))

    async def _pause(self, seconds: float) -> bool:
        """Sleep `seconds` unless stopped first (then False)."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stop.wait(), timeout=seconds)
        return not self._stop.is_set()

    def _not_parked_yet(self, part: TransactionPart) -> list[pgoutput.Message]:
        """The messages of `part` after the last one parked before this relay started
        (parking.py, done_through): those up to it are in the table or were acked, and
        the slot hands them out again only because its confirmed position was not sent."""
        through = self._done_through
        if through is None or part.commit_lsn > through[0]:
            return part.messages
        if part.commit_lsn < through[0]:
            return []
        return [m for m in part.messages if m.lsn > through[1]]

    def _messages(self, part: TransactionPart, logical_messages: list[pgoutput.Message]) -> list[Message]:
        created_at = pgoutput.to_datetime(part.commit_time)
        messages = []
        for logical in logical_messages:
            try:
                frame = framing.decode(logical.content)
                headers = _NO_HEADERS if frame.headers == "{}" else frame.header_map()
            except FrameError as exc:
                # Nothing of it or after it is confirmed: the relay stops here, and the
                # transaction stays in the slot until a relay that can read it comes.
                raise FrameError(
                    f"transaction {part.xid} (commit at {pgoutput.format_lsn(part.commit_lsn)}): {exc}"
                ) from exc
            messages.append(
                Message(
                    next(self._ids),
                    frame.message_id,
                    frame.topic,
                    frame.key,
                    frame.payload,
                    frame.content_type,
                    headers,
                    0,
                    created_at,
                )
            )
        return messages
