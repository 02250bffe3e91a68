"""The WAL source inside `outbox-relay run`: beside the table engine's workers, with their
dispatcher (same adapters, routes, circuits, retry and dead-letter policy).

It reads the outbox's source ({schema}.settings) and its slot (relay.wal.slot, or
``outbox_relay_<schema>``) at start and again every SOURCE_POLL_S, so a running relay
follows a switch (a switch keeps each key's order: migrations/0009_switch_order.sql):

- ``wal``: it streams the slot with a WalRelay (relay.py) until the relay stops or the
  source changes (the switch waited for every transaction that enqueued through the
  table body: none writes a row after it, so the table's held keys are all there to
  see). A
  database or replication error ends that WalRelay; a new one starts after the relay's
  backoff and resumes after the slot's confirmed position (nothing unconfirmed is lost).
  While another relay streams the slot (PostgreSQL lets one walsender use a slot at a
  time) it stands by: it tries again every ``relay.wal.standby_interval`` seconds,
  having logged ``wal_slot_in_use`` once, and takes over when that relay's walsender
  goes (a relay that dies drops its connection, so the slot is free at once). A slot
  that is missing, invalidated (wal_status 'lost': kept by PostgreSQL but never able to
  stream again), or not this database's, stops the relay with one line: it is never
  recreated here, since the WAL between a lost slot and a new one would not be read.
- ``table``, with the slot the switch to wal used (settings.wal_slot) still there: the
  slot may hold messages enqueued before the switch, and the drain gate keeps the
  table's newer keyed rows back until they are out. The switch waited for every
  transaction that enqueued (the source fence), so every message of the outbox lies
  before the WAL inserted when the relay sees it: it streams the slot until it is
  confirmed that far, then drops the slot and its publication and lifts the gate
  (``wal_slot_dropped``) if the source is still table, checked under the schema's lock.
  Another relay doing the same stands by, then finds the slot gone. A relay configured
  with another slot leaves that drain alone (``wal_drain_of_another_slot``).
- ``table`` without a usable slot: the drain gate, if a switch left one, is lifted with
  a warning (its messages not yet streamed may be lost); then nothing to do until a
  switch to wal.

Lifecycle: ``run(dispatcher, stop, observer)`` returns once ``stop`` is set (having stopped its
WalRelay, which finishes a dispatch in progress and sends its confirmed position), or
raises what the relay cannot go on after. One task runs it.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

import psycopg
import structlog

from outbox_relay import outbox_source
from outbox_relay.adapter import Adapter, Fenced, transactions_of
from outbox_relay.config import Config
from outbox_relay.connections import connect_once
from outbox_relay.engine.dispatch import Dispatcher
from outbox_relay.engine.outcomes import feeds_dead_letters
from outbox_relay.engine.retry import Backoff
from outbox_relay.errors import ConfigError, first_line
from outbox_relay.sources.base import RelayObserver
from outbox_relay.sources.wal import pgoutput, slot
from outbox_relay.sources.wal.errors import ReplicationError, SlotInUse, SlotLost, SlotMissing, WalSourceError
from outbox_relay.sources.wal.lag import LAG_POLL_S, WalWatch
from outbox_relay.sources.wal.relay import WalRelay
from outbox_relay.sqlfiles import Queries

log = structlog.get_logger("outbox_relay.wal")


def _unwrapped(adapter: Adapter) -> Adapter:
    """The adapter behind the engine's BrokerHandle (engine/brokers.py)."""
    return getattr(adapter, "adapter", adapter)


def exactly_once_brokers(adapters: Mapping[str, Adapter]) -> list[str]:
    """The brokers whose block says exactly_once (assembly.py allows one)."""
    return [name for name, a in adapters.items() if transactions_of(_unwrapped(a)) is not None]


DRAIN_POLL_S = 0.5  # how often the slot's confirmed position is read while draining it
# How often a relay reads the outbox's source to notice a switch: a table-mode relay then
# streams (the slot keeps the WAL meanwhile), a streaming one drains (the drain gate
# keeps the table's newer rows back meanwhile), so noticing late delays, never reorders.
SOURCE_POLL_S = 2.0


class WalSource:
    """The WAL source of one relay process; see the module docstring for its rules."""

    name = "wal-source"

    def __init__(self, config: Config, *, lag_interval: float = LAG_POLL_S):
        self._config = config
        self._dsn = config.database.dsn.get_secret_value()
        self._schema = config.database.schema_name
        self._slot = config.wal_slot
        self._settings = config.relay.wal
        self._prepare_threshold = config.database.prepare_threshold
        self._backoff = Backoff.from_config(config.relay)
        self.watch = WalWatch(self._slot, poll_interval=lag_interval)  # its metrics and /readyz (lag.py)
        self._session = _Session(self._dsn)
        self._foreign_drain_logged = False
        self._table_warned = False
        self._feed_dead = config.outcomes.dead_lettered  # as granted: check_start

    async def run(self, dispatcher: Dispatcher, stop: asyncio.Event, observer: RelayObserver | None = None) -> None:
        stream = self._stream(dispatcher, stop, observer)
        await self.watch.run_watched(stream, dispatcher.metrics, self._dsn, prepare_threshold=self._prepare_threshold)

    def readiness(self) -> tuple[bool, dict[str, Any]] | None:
        return self.watch.readiness()

    async def _stream(self, dispatcher: Dispatcher, stop: asyncio.Event, observer: RelayObserver | None) -> None:
        try:
            await self._stream_until_stopped(dispatcher, stop, observer)
        finally:
            await self._session.close()

    async def _stream_until_stopped(
        self, dispatcher: Dispatcher, stop: asyncio.Event, observer: RelayObserver | None
    ) -> None:
        failures = 0
        standing_by = False
        while not stop.is_set():
            relay: WalRelay | None = None
            try:
                target = await self._plan()
                self._warn_table_source(dispatcher, target)
                if target is None:
                    self.watch.set_state("off")
                    # Table mode, no slot of ours: nothing to stream until a switch to wal.
                    await _sleep(stop, SOURCE_POLL_S)
                    continue
                relay = self._relay(dispatcher, observer)
                drained = await self._run(relay, stop, target if target > 0 else None)
                if drained:
                    await self._drop()
                # Dropped, or kept (switched back to wal meanwhile), or the source
                # changed while streaming: the next plan says what to do.
            except Fenced:
                # Another relay took the slot and registered the transactional id after
                # this one (exactly_once.py logged it): stand by, as for a slot in use.
                standing_by = True
                self.watch.set_state("standby", "fenced by a newer relay of the same slot")
                await _sleep(stop, self._settings.standby_interval)
                continue
            except SlotInUse:
                if not standing_by:
                    log.info("wal_slot_in_use", slot=self._slot, retry_every_s=self._settings.standby_interval)
                    standing_by = True
                self.watch.set_state("standby", f"another relay streams the slot {self._slot!r}")
                await _sleep(stop, self._settings.standby_interval)
                continue
            except SlotMissing:
                if await self._source() == "table":
                    continue  # another relay drained it and dropped it
                raise
            except (ReplicationError, psycopg.Error) as exc:
                if _not_in_prerequisite_state(exc):
                    # What START_REPLICATION says of an invalidated slot ("can no longer
                    # get changes"): lost for good, so no restart; stop as for a lost slot.
                    await self._raise_if_lost()
                if relay is not None and relay.started.is_set():
                    failures, standing_by = 1, False
                else:
                    failures += 1
                delay = self._backoff.delay(failures)
                log.warning(
                    "wal_relay_restarting",
                    slot=self._slot,
                    error_type=type(exc).__name__,
                    error=first_line(exc),
                    retry_in_s=round(delay, 2),
                )
                self.watch.set_state("restarting", first_line(exc))
                await _sleep(stop, delay)
                continue
            standing_by = False
        await stop.wait()

    async def check_start(self, conn: psycopg.AsyncConnection[Any], brokers: Mapping[str, Adapter]) -> None:
        """An exactly-once broker with the outbox in table mode is refused at start, in
        one line (docs/how-to/kafka.md, "Exactly once into Kafka"): the table source cannot commit its
        position inside a Kafka transaction. A switch to table later is followed, with a
        warning (_warn_table_source)."""
        self._feed_dead = await feeds_dead_letters(conn, self._config, report=False)  # the table's start says it
        if self._settings.receipts:
            await _check_receipts_granted(conn, self._schema)
        names = ", ".join(exactly_once_brokers(brokers))
        if not names or await _source_on(conn, self._schema) == "wal":
            return
        draining, recorded = await _row(conn, slot.outbox_query("switch_state", self._schema))
        if draining and recorded == self._slot:
            return  # the slot a switch to table left: drained exactly once, then the warning
        raise ConfigError(
            f"brokers.{names}.exactly_once needs the WAL source, and the outbox {self._schema!r} is in table"
            " mode: the table source cannot commit its position inside a Kafka transaction (a relay"
            " killed between the ack and marking its rows sends them again); switch with"
            f" `outbox-relay schema source wal --schema {self._schema}`, or remove exactly_once"
        )

    def _warn_table_source(self, dispatcher: Dispatcher, target: int | None) -> None:
        """Once the outbox is in table mode (nothing left to drain) with an exactly-once
        broker: its messages now go at least once."""
        if target is not None:  # streaming (again): warn again after the next switch
            self._table_warned = False
            return
        names = ", ".join(exactly_once_brokers(dispatcher.adapters))
        if names and not self._table_warned:
            log.warning("exactly_once_table_source", brokers=names, delivery="at least once until a switch to wal")
            self._table_warned = True

    def _feeds_delivered(self) -> Callable[[str], bool] | None:
        outcomes = self._config.outcomes
        if not outcomes.delivered:
            return None
        cache: dict[str, bool] = {}

        def feeds(topic: str) -> bool:
            wanted = cache.get(topic)
            if wanted is None:
                if len(cache) >= 10_000:  # a topic per tenant: bounded
                    cache.clear()
                wanted = cache[topic] = outcomes.feeds_delivered(topic)
            return wanted

        return feeds

    def _relay(self, dispatcher: Dispatcher, observer: RelayObserver | None) -> WalRelay:
        brokers = exactly_once_brokers(dispatcher.adapters)
        transactions = None
        if brokers:
            name = brokers[0]
            factory = transactions_of(_unwrapped(dispatcher.adapters[name]))
            assert factory is not None
            transactions = (name, factory)
        return WalRelay(
            self._dsn,
            schema=self._schema,
            slot_name=self._slot,
            # Streamed messages have no row to keep a receipt in: receipts are built only
            # for wal_receipts (relay.wal.receipts) and delivered outcome rows.
            dispatcher=dispatcher
            if self._settings.receipts or self._config.outcomes.delivered
            else dispatcher.without_receipts(),
            receipts=self._settings.receipts,
            # outcomes.delivered: written per batch (the grant is checked at the relay's start).
            feeds_delivered=self._feeds_delivered(),
            observer=observer,
            watch=self.watch,
            hold_dead_letters=self._config.relay.dead_letter_policy == "hold",
            park_after=self._settings.park_after,
            status_interval=self._settings.status_interval,
            prepare_threshold=self._config.database.prepare_threshold,
            exactly_once=transactions,
            backoff=self._backoff,
            feed_dead_letters=self._feed_dead,
        )

    async def _run(self, relay: WalRelay, stop: asyncio.Event, target: int | None) -> bool:
        """Run `relay` until `stop`, or (with a `target`) until the slot is confirmed
        that far; True when drained to it. Raises what ended the relay otherwise."""
        task = asyncio.create_task(relay.run(), name="wal-relay")
        waits: set[asyncio.Future[Any]] = {task, asyncio.create_task(stop.wait())}
        drained = None if target is None else asyncio.create_task(self._drained(target))
        if drained is not None:
            waits.add(drained)
        else:
            # Streaming in wal mode: a switch to table ends this run, and the next plan
            # drains the slot to its end (the drain gate keeps the table's newer rows
            # back meanwhile, so streaming on until then keeps every key's order).
            waits.add(asyncio.create_task(self._source_left("wal")))
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            relay.stop()
            others = waits - {task}
            for other in others:
                other.cancel()
            # The watchers share the session: none may still be in a query after this.
            await asyncio.gather(*others, return_exceptions=True)
            # Also when cancelled: the relay finishes its dispatch and sends its position.
            await asyncio.shield(_settle(task))
        if task.done() and not task.cancelled() and (error := task.exception()) is not None:
            raise error
        return drained is not None and drained.done() and not drained.cancelled() and drained.result()

    async def _source_left(self, source: str) -> None:
        """Return once the outbox's source is no longer `source`."""
        while True:
            await asyncio.sleep(SOURCE_POLL_S)
            with contextlib.suppress(psycopg.Error):  # the relay's own errors end the run
                if await self._source() != source:
                    log.info("wal_source_switched", slot=self._slot, was=source)
                    return

    async def _plan(self) -> int | None:
        """0: stream (wal mode, settled); a position: drain the slot to it (table mode, a
        slot of ours left); None: nothing to do."""
        async with self._session() as conn:
            source = await _source_on(conn, self._schema)
            cursor = await conn.execute(slot.query("slot_identity", slot=self._slot))
            identity = await cursor.fetchone()
            ours = identity is not None and identity[0] == "pgoutput" and identity[1] == identity[2]
            if source == "wal":
                if identity is None:
                    raise SlotMissing(
                        f"the outbox {self._schema!r} is in WAL mode but its replication slot {self._slot!r} does not "
                        "exist (dropped, invalidated and removed, or not carried to a promoted standby): messages "
                        "enqueued since its last confirmed position may not have been published, and every one "
                        "enqueued until there is a slot again is lost: switch enqueue to the table at once "
                        f"(`outbox-relay schema source table --schema {self._schema}`), account for them, then create "
                        f"it with `outbox-relay schema source wal --schema {self._schema} --slot {self._slot}`"
                    )
                if not ours:
                    raise WalSourceError(
                        f"the replication slot {self._slot!r} is not this outbox's (plugin {identity[0]!r}, database "
                        f"{identity[1]!r}): set relay.wal.slot to the slot `schema source wal` created"
                    )
                _raise_if_lost(self._schema, self._slot, await slot.read_state_async(conn, self._slot))
                return 0
            draining, recorded = await _row(conn, slot.outbox_query("switch_state", self._schema))
            if draining and recorded is not None and recorded != self._slot:
                # Another slot's drain: this relay cannot stream it, and must not lift
                # the gate that drain needs.
                if not self._foreign_drain_logged:
                    log.warning(
                        "wal_drain_of_another_slot",
                        slot=self._slot,
                        draining=recorded,
                        reason="the outbox was switched to table from that slot: set relay.wal.slot to it so a "
                        "relay drains it (keyed rows enqueued since the switch wait for that)",
                    )
                    self._foreign_drain_logged = True
                return None
            state = await slot.read_state_async(conn, self._slot) if ours else None
            if state is None or state.wal_status == "lost":
                if draining or state is not None:
                    await self._end_drain_without_slot(conn, lost=state is not None)
                return None
            log.info("wal_slot_draining", slot=self._slot, source=source)
            # The switch waited for every transaction that enqueued (the source fence), so
            # every WAL message of the outbox lies before the WAL inserted so far.
            end = await _one(conn, slot.query("wal_insert_end"), {})
        return pgoutput.parse_lsn(str(end))

    async def _end_drain_without_slot(self, conn: psycopg.AsyncConnection[Any], *, lost: bool) -> None:
        """Table mode, and the slot a switch left is gone or invalidated: nothing of it can
        be streamed, so the drain gate (if set) is closed, with a warning, or the table's
        newer keyed rows would wait for ever. A lost slot is dropped."""
        if lost:
            await asyncio.to_thread(self._drop_now)
        cursor = await conn.execute(slot.outbox_query("close_drain_gate", self._schema))
        if cursor.rowcount:
            log.warning(
                "wal_drain_ended_without_slot",
                slot=self._slot,
                reason="the slot was dropped or invalidated before it was drained: messages enqueued before the "
                "switch to table and not yet published may be lost; rows enqueued since go on",
            )

    async def _drained(self, target: int) -> bool:
        """Wait until the slot is confirmed up to `target` (or is gone)."""
        while True:
            async with self._session() as conn:
                state = await slot.read_state_async(conn, self._slot)
            if state is None or (state.confirmed_flush_lsn or 0) >= target:
                return True
            await asyncio.sleep(DRAIN_POLL_S)

    async def _drop(self) -> bool:
        """Drop the drained slot and its publication, unless the outbox was switched back
        to wal meanwhile (False: the slot is streamed again). The walsender of the stream
        just closed may take a moment to let go of it."""
        for _ in range(20):
            try:
                dropped = await asyncio.to_thread(self._drop_now)
            except SlotInUse:
                await asyncio.sleep(DRAIN_POLL_S)
                continue
            if not dropped:
                log.info("wal_slot_kept", slot=self._slot, reason="the outbox was switched back to wal")
                return False
            log.info("wal_slot_dropped", slot=self._slot, reason="the outbox's source is table and the slot is drained")
            return True
        log.warning("wal_slot_not_dropped", slot=self._slot, reason="still in use; tried again at the next start")
        return True

    def _drop_now(self) -> bool:
        """Drop the slot if the source is still table, in one transaction under the
        schema's lock: set_source(wal) takes it before checking the slot, so a switch
        back either commits first (seen here: kept) or finds the slot gone (refused)."""
        with psycopg.connect(self._dsn, application_name="outbox-relay") as conn, conn.transaction():
            outbox_source.lock_schema(conn, self._schema)
            if outbox_source.read_source(conn, self._schema).source != "table":
                return False
            slot.drop_in_transaction(conn, self._slot, self._slot)
            conn.execute(slot.outbox_query("close_drain_gate", self._schema))
            return True

    async def _raise_if_lost(self) -> None:
        async with self._session() as conn:
            if await _source_on(conn, self._schema) != "wal":
                return  # a lost slot left after a switch to table: nothing of it can be streamed
            state = await slot.read_state_async(conn, self._slot)
        _raise_if_lost(self._schema, self._slot, state)

    async def _source(self) -> str:
        async with self._session() as conn:
            return await _source_on(conn, self._schema)


def _raise_if_lost(schema: str, slot_name: str, state: slot.SlotState | None) -> None:
    """SlotLost when PostgreSQL invalidated the slot: it keeps it, with wal_status 'lost',
    but it can never stream again (the WAL it needs is gone)."""
    if state is None or state.wal_status != "lost":
        return
    start = (
        "its last confirmed position"
        if state.confirmed_flush_lsn is None
        else pgoutput.format_lsn(state.confirmed_flush_lsn)
    )
    raise SlotLost(
        f"the outbox {schema!r} is in WAL mode but PostgreSQL invalidated its replication slot {slot_name!r} "
        f"(wal_status lost: it fell behind by more than max_slot_wal_keep_size): messages enqueued between WAL "
        f"{start} and {pgoutput.format_lsn(state.current_lsn)} may not have been published, and every one enqueued "
        f"until there is a slot again is lost: switch enqueue to the table at once (`outbox-relay schema source "
        f"table --schema {schema}`), account for them, then drop the slot (a relay in table mode does; or SELECT "
        f"pg_drop_replication_slot('{slot_name}')) and create it with `outbox-relay schema source wal --schema "
        f"{schema} --slot {slot_name}`"
    )


def _not_in_prerequisite_state(exc: BaseException) -> bool:
    """Whether `exc` or its cause is SQLSTATE 55000, which START_REPLICATION returns for
    an invalidated slot."""
    return any(getattr(e, "sqlstate", None) == "55000" for e in (exc, exc.__cause__))


async def _source_on(conn: psycopg.AsyncConnection[Any], schema: str) -> str:
    source = await _one(conn, Queries(schema)["outbox_source"], {})
    return str(source or "table")


class _Session:
    """One autocommit connection for the source's own reads, opened when first needed and
    again after an error: a relay in table mode reads the source every SOURCE_POLL_S, and
    a query is cheaper than a connection (a server process) each time. Used by one task
    at a time (the runner's, or the watcher it waits on)."""

    def __init__(self, dsn: str):
        self._dsn = dsn
        self._conn: psycopg.AsyncConnection[Any] | None = None

    @contextlib.asynccontextmanager
    async def __call__(self) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
        if self._conn is None or self._conn.closed:
            self._conn = await connect_once(self._dsn, autocommit=True)
        try:
            yield self._conn
        except BaseException:
            # A database error, or a cancellation mid-query (a watcher stopped): whatever
            # state the connection is in, the next use starts on a new one.
            await self.close()
            raise

    async def close(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(psycopg.Error):
                await self._conn.close()
            self._conn = None


async def _row(conn: psycopg.AsyncConnection[Any], query: Any) -> tuple[Any, ...]:
    cursor = await conn.execute(query)
    row = await cursor.fetchone()
    if row is None:
        raise WalSourceError("the outbox's settings row is missing: run `outbox-relay schema install`")
    return tuple(row)


async def _one(conn: psycopg.AsyncConnection[Any], query: Any, params: dict[str, Any]) -> Any:
    cursor = await conn.execute(query, params)
    row = await cursor.fetchone()
    return None if row is None else row[0]


async def _sleep(stop: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), timeout=seconds)


async def _settle(task: asyncio.Task[None]) -> None:
    with contextlib.suppress(BaseException):
        await task


async def _check_receipts_granted(conn: psycopg.AsyncConnection[Any], schema: str) -> None:
    """relay.wal.receipts needs INSERT on wal_receipts (schema version 13's grants): one
    line at start, not a stream that fails at its first batch."""
    # quote_ident: the schema's name as a table name takes it; %% keeps psycopg off it.
    cur = await conn.execute(
        "SELECT has_table_privilege(current_user, quote_ident(%s::text) || '.wal_receipts', 'INSERT')", (schema,)
    )
    row = await cur.fetchone()
    if conn.info.transaction_status == psycopg.pq.TransactionStatus.INTRANS:
        await conn.rollback()
    if not row or not row[0]:
        raise ConfigError(
            f"relay.wal.receipts: the relay's role may not write {schema}.wal_receipts; re-run its grants"
            f" (outbox-relay schema sql --grants-only --relay-role ROLE --schema {schema}) or turn it off"
        )
