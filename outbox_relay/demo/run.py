"""`outbox-relay demo`: a sample application and the relay, side by side, on a real PostgreSQL.

The problem the outbox removes is the *dual write*: an application that saves an order
and then tells a broker about it has two systems to update and no transaction that
spans both. Crash between the two and either the order exists without its event, or
(publish first) the world hears about an order that was rolled back.

With the outbox the application writes the event as a row in the same transaction as
the order; the relay publishes committed rows afterwards. This demo shows that:

* several concurrent writers each insert an order and enqueue its ``orders.created``
  message in one transaction, and every Nth transaction is rolled back: those
  messages are never published, because they never became visible;
* the relay (``type: stdout``) prints every committed message as a JSON line on
  standard output, each key's messages in the order they were enqueued;
* a summary on standard error gives commit-to-ack latency (NOTIFY wakes the relay).

With ``--source wal`` the outbox is installed in WAL mode (docs/how-to/wal-source.md):
each enqueue writes one logical decoding message into the WAL and no row, and
the relay streams them from the outbox's replication slot, in commit order. The summary
then also says how many messages went through the WAL and how many through the table
(none unless a publish failed and was parked there); the embedded PostgreSQL runs with
``wal_level = logical`` for it (``local_postgres.LOGICAL_DECODING``), and a database
given with ``--dsn`` must have it. The slot is dropped when the demo ends.

Every line of the summary is checked, not assumed: against what the relay reported
through its observer hook and against the database. The exit code is 0 only when all
of it holds.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import random
import signal
import sys
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from types import FrameType
from typing import Any
from uuid import UUID

import psycopg
from psycopg import sql

from outbox_relay import config, enqueue_async
from outbox_relay.assembly import build_relay
from outbox_relay.connections import connect_sync
from outbox_relay.demo import local_postgres
from outbox_relay.engine.relay import Relay
from outbox_relay.errors import OutboxRelayError
from outbox_relay.models import Message, Record, RecordKind
from outbox_relay.operations import schema_manager
from outbox_relay.sources.wal import slot as wal_slot
from outbox_relay.sources.wal.errors import SlotInUse

TOPIC = "orders.created"
WRITERS = 4
# Each writer owns its customers, so a key's orders are written one after the other and
# "enqueue order" has one meaning. Two writers racing on one key would commit in an
# order no one chose, and per-key order would only be defined by whichever won.
CUSTOMERS_PER_WRITER = 2
DISPATCH_TIMEOUT = 30.0
STARTUP_TIMEOUT = 30.0
SHUTDOWN_TIMEOUT = 10.0
INTERRUPTED = 130  # the shell's convention for "ended by SIGINT"
SLOT_RELEASE_TIMEOUT = 10.0  # a stopped stream's walsender lets go of the slot a moment later

# The DSN and schema arrive through ${...} substitution, never by formatting them into
# the YAML text, so no character in a password can change the file's structure.
RELAY_YAML = f"""\
database:
  dsn: ${{DEMO_DSN}}
  schema: ${{DEMO_SCHEMA}}
relay:
  workers: 2
  notify: true
  poll_interval: 1s
  shutdown_timeout: {SHUTDOWN_TIMEOUT:g}s
http:
  enabled: false
brokers:
  out:
    type: stdout
routes:
  - topic: "*"
    broker: out
"""


# -- entry point ---------------------------------------------------------------------------


def run_demo(*, orders: int, rollback_every: int, dsn: str | None, source: str = "table") -> int:
    """Run the demo; 0 when every summary line checked out, 1 otherwise."""
    if source not in schema_manager.SOURCES:
        raise OutboxRelayError(f"unknown source {source!r}: use one of {', '.join(schema_manager.SOURCES)}")
    plan = Plan(orders=orders, rollback_every=rollback_every, source=source)
    try:
        with _sigterm_as_interrupt():
            if dsn is None:
                return _run_embedded(plan)
            return _run_in(dsn, plan)
    except KeyboardInterrupt:
        # By now the callees' finally blocks have stopped the relay and cleaned up.
        _say("demo interrupted")
        return INTERRUPTED


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """Treat SIGTERM like Ctrl-C for the demo's duration.

    Unhandled, SIGTERM (kill, timeout, a container stop) would end the process at once
    and leave the embedded PostgreSQL running with its data directory behind.
    """
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be set from the main thread
        return
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        yield
    finally:
        if previous is not None:  # None: a handler set outside Python, cannot be restored
            signal.signal(signal.SIGTERM, previous)


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    # Whoever handles SIGINT right now handles this too: inside asyncio.run that is the
    # runner, which cancels the main task so every finally block runs in order.
    handler = signal.getsignal(signal.SIGINT)
    if callable(handler):
        handler(signal.SIGINT, frame)
        return
    raise KeyboardInterrupt  # SIGINT ignored (a background job): still clean up


@dataclass(frozen=True)
class Plan:
    orders: int
    rollback_every: int
    source: str = "table"  # where enqueue writes: schema_manager.SOURCES

    @property
    def wal(self) -> bool:
        return self.source == "wal"

    def rolls_back(self, number: int) -> bool:
        return number % self.rollback_every == 0


def _say(line: str) -> None:
    # Standard output belongs to the relay's JSON lines; people read standard error.
    print(line, file=sys.stderr, flush=True)


def _run_embedded(plan: Plan) -> int:
    _say("demo: starting an embedded PostgreSQL (removed when the demo ends)")
    cluster: local_postgres.LocalPostgres | None = None
    try:
        with _signals_held():
            cluster = local_postgres.create(local_postgres.LOGICAL_DECODING if plan.wal else None)
        return _run_in(cluster.dsn, plan)
    finally:
        if cluster is not None:
            local_postgres.destroy(cluster)


@contextlib.contextmanager
def _signals_held() -> Iterator[None]:
    """Defer Ctrl-C and SIGTERM until the block is done.

    create() cannot be interrupted halfway without leaving a data directory (or a
    started server) that no one knows about; held, the signal arrives once `cluster`
    is assigned and the caller's finally can remove it.
    """
    signals = {signal.SIGINT, signal.SIGTERM}
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, signals)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


# -- the database objects the demo owns ---------------------------------------------------


@dataclass(frozen=True)
class Names:
    """Fresh schemas, so a demo against a shared database touches nothing that exists."""

    outbox: str
    app: str

    @classmethod
    def fresh(cls) -> Names:
        base = f"outbox_demo_{uuid.uuid4().hex[:12]}"
        return cls(outbox=base, app=f"{base}_app")

    @property
    def orders_table(self) -> sql.Composed:
        return sql.SQL("{}.demo_orders").format(sql.Identifier(self.app))

    @property
    def slot(self) -> str:
        """The WAL source's slot and publication: the default the relay's config derives."""
        return wal_slot.name_for(self.outbox)


def _run_in(dsn: str, plan: Plan) -> int:
    names = Names.fresh()
    # Connect before creating anything: a bad DSN fails in one line with nothing to undo.
    with _connect(dsn) as conn:
        try:
            _setup(conn, names, plan)
            _say(
                f"demo: outbox schema {names.outbox}; {plan.orders} orders from {WRITERS} "
                f"writers, 1 transaction in {plan.rollback_every} rolled back"
            )
            if plan.wal:
                _say(
                    f"demo: WAL mode: each enqueue writes a logical decoding message, no row; the relay "
                    f"streams them from the replication slot {names.slot}"
                )
            result = asyncio.run(_demo(dsn, names, plan))
        finally:
            _teardown(conn, names, plan)
    return _report(result)


def _connect(dsn: str) -> psycopg.Connection[Any]:
    return connect_sync(dsn, application_name="outbox-relay-demo")


def _setup(conn: psycopg.Connection[Any], names: Names, plan: Plan) -> None:
    schema_manager.install(conn, names.outbox)
    if plan.wal:
        _use_wal(conn, names)
    with conn.transaction():
        conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(names.app)))
        conn.execute(
            sql.SQL(
                "CREATE TABLE {} (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, "
                "customer text NOT NULL, total numeric(10, 2) NOT NULL, "
                "created_at timestamptz NOT NULL DEFAULT now())"
            ).format(names.orders_table)
        )


def _use_wal(conn: psycopg.Connection[Any], names: Names) -> None:
    """What `outbox-relay schema source wal` does: the slot first (a message emitted
    before a slot exists is decoded by none), then the switch."""
    conn.autocommit = True  # slot.create's rule: a logical slot needs a transaction that wrote nothing
    try:
        wal_slot.create(conn, names.slot, names.slot)
    finally:
        conn.autocommit = False
    schema_manager.set_source(conn, names.outbox, "wal", warn=_say, slot_name=names.slot)


def _drop_slot(conn: psycopg.Connection[Any], names: Names) -> None:
    """Drop the demo's slot and publication, if made: a slot left behind would keep WAL
    on the server's disk for ever (and, on an embedded cluster, be removed with it)."""
    conn.autocommit = True
    try:
        deadline = time.monotonic() + SLOT_RELEASE_TIMEOUT
        while True:
            try:
                wal_slot.drop(conn, names.slot, names.slot)
                return
            except SlotInUse:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
    finally:
        conn.autocommit = False


def _teardown(conn: psycopg.Connection[Any], names: Names, plan: Plan) -> None:
    conn.rollback()  # an interrupted setup may have left a transaction open
    if plan.wal:
        _drop_slot(conn, names)
    # A session left behind would make DROP wait forever; fail loudly instead.
    conn.execute("SET lock_timeout = '10s'")
    for schema in (names.app, names.outbox):
        conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))
    conn.commit()


# -- what happened, as each side saw it ---------------------------------------------------


@dataclass
class Written:
    """What the sample application did, as it saw it."""

    commit_time: dict[UUID, float] = field(default_factory=dict)
    by_key: dict[str, list[UUID]] = field(default_factory=lambda: defaultdict(list))
    rolled_back: list[UUID] = field(default_factory=list)
    rolled_back_orders: list[int] = field(default_factory=list)


class AckLog:
    """A RelayObserver: the first ack of each message, when and in which order per key."""

    def __init__(self) -> None:
        self.ack_time: dict[UUID, float] = {}
        self.by_key: dict[str, list[UUID]] = defaultdict(list)

    def batch_recorded(self, messages: Sequence[Message], records: Sequence[Record]) -> None:
        now = time.time()
        by_row = {m.id: m for m in messages}
        # Records come in publish order (wave by wave), so appending keeps ack order.
        for record in records:
            message = by_row[record.id]
            # Delivery is at least once: a redelivered message keeps its first ack.
            if record.kind is not RecordKind.ACKED or message.message_id in self.ack_time:
                continue
            self.ack_time[message.message_id] = now
            if message.key is not None:
                self.by_key[message.key].append(message.message_id)


@dataclass(frozen=True)
class DbFacts:
    committed_orders: int
    rolled_back_rows: int  # orders and outbox messages of rolled-back transactions
    committed_rows: int  # committed messages that are rows of the outbox table


@dataclass(frozen=True)
class Result:
    plan: Plan
    written: Written
    acks: AckLog
    db: DbFacts
    all_dispatched: bool


# -- the one event loop: relay and application together ----------------------------------


async def _demo(dsn: str, names: Names, plan: Plan) -> Result:
    acks = AckLog()
    cfg = config.parse(RELAY_YAML, source="demo.yaml", env={"DEMO_DSN": dsn, "DEMO_SCHEMA": names.outbox})
    relay = build_relay(cfg, observer=acks)
    relay_task = asyncio.create_task(relay.run(), name="relay")
    try:
        await _until_started(relay, relay_task)
        written = await _write_orders(dsn, names, plan)
        all_dispatched = await _until_dispatched(acks, written.commit_time.keys(), relay_task)
    finally:
        await _stop(relay, relay_task)
    relay_task.result()  # a relay that failed makes the demo fail, with its error
    db = await _db_facts(dsn, names, written)
    return Result(plan, written, acks, db, all_dispatched)


async def _until_started(relay: Relay, relay_task: asyncio.Task[None]) -> None:
    started = asyncio.create_task(relay.started.wait())
    done, _ = await asyncio.wait({relay_task, started}, timeout=STARTUP_TIMEOUT, return_when=asyncio.FIRST_COMPLETED)
    if started not in done:
        started.cancel()
        if relay_task in done:
            relay_task.result()  # raises the startup error
        raise OutboxRelayError(f"the relay did not start within {STARTUP_TIMEOUT:g}s")


async def _until_dispatched(acks: AckLog, expected: Collection[UUID], relay_task: asyncio.Task[None]) -> bool:
    deadline = time.monotonic() + DISPATCH_TIMEOUT
    remaining = set(expected)
    while True:
        remaining = {mid for mid in remaining if mid not in acks.ack_time}
        if not remaining:
            return True
        if relay_task.done() or time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.02)


async def _stop(relay: Relay, relay_task: asyncio.Task[None]) -> None:
    # Graceful: the relay finishes its in-flight batch, so nothing is left half-recorded.
    relay.stop()
    _, pending = await asyncio.wait({relay_task}, timeout=SHUTDOWN_TIMEOUT + 5)
    if pending:
        relay_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await relay_task


async def _write_orders(dsn: str, names: Names, plan: Plan) -> Written:
    written = Written()
    # One shared iterator: each writer takes the next order number when it is free,
    # so numbers (and which of them roll back) do not depend on writer speed.
    numbers = iter(range(1, plan.orders + 1))
    async with asyncio.TaskGroup() as group:
        for index in range(WRITERS):
            first = index * CUSTOMERS_PER_WRITER + 1
            customers = [f"customer-{first + i}" for i in range(CUSTOMERS_PER_WRITER)]
            group.create_task(_writer(dsn, names, plan, customers, numbers, written))
    return written


async def _writer(
    dsn: str,
    names: Names,
    plan: Plan,
    customers: list[str],
    numbers: Iterator[int],
    written: Written,
) -> None:
    async with await psycopg.AsyncConnection.connect(dsn, application_name="outbox-demo-app") as conn:
        for turn, number in enumerate(numbers):
            customer = customers[turn % len(customers)]
            await _place_order(conn, names, plan, number, customer, written)
            # A short, uneven pause: commits arrive spread out like an application's,
            # so the latency shows NOTIFY wake-ups rather than one burst's backlog.
            await asyncio.sleep(random.uniform(0, 0.004))


async def _place_order(
    conn: psycopg.AsyncConnection[Any],
    names: Names,
    plan: Plan,
    number: int,
    customer: str,
    written: Written,
) -> None:
    """The whole point: the order and its message in one transaction."""
    total = Decimal(random.randint(500, 50_000)) / 100
    cur = await conn.execute(
        sql.SQL("INSERT INTO {} (customer, total) VALUES (%s, %s) RETURNING id").format(names.orders_table),
        (customer, total),
    )
    row = await cur.fetchone()
    assert row is not None
    order_id = int(row[0])
    payload = {"order_no": number, "order_id": order_id, "customer": customer, "total": str(total)}
    message_id = await enqueue_async(conn, TOPIC, payload, key=customer, schema=names.outbox)
    if plan.rolls_back(number):
        await conn.rollback()
        written.rolled_back.append(message_id)
        written.rolled_back_orders.append(order_id)
        return
    await conn.commit()
    committed_at = time.time()
    written.commit_time[message_id] = committed_at
    written.by_key[customer].append(message_id)


async def _db_facts(dsn: str, names: Names, written: Written) -> DbFacts:
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        cur = await conn.execute(sql.SQL("SELECT count(*) FROM {}").format(names.orders_table))
        orders = await cur.fetchone()
        cur = await conn.execute(
            sql.SQL(
                "SELECT (SELECT count(*) FROM {} WHERE id = ANY(%s))"
                " + (SELECT count(*) FROM {}.messages WHERE message_id = ANY(%s))"
            ).format(names.orders_table, sql.Identifier(names.outbox)),
            (written.rolled_back_orders, written.rolled_back),
        )
        leftovers = await cur.fetchone()
        cur = await conn.execute(
            sql.SQL("SELECT count(*) FROM {}.messages WHERE message_id = ANY(%s)").format(sql.Identifier(names.outbox)),
            (list(written.commit_time),),
        )
        rows = await cur.fetchone()
    assert orders is not None and leftovers is not None and rows is not None
    return DbFacts(committed_orders=int(orders[0]), rolled_back_rows=int(leftovers[0]), committed_rows=int(rows[0]))


# -- the summary: every line checked ------------------------------------------------------


def _report(result: Result) -> int:
    _say(_summary(result))
    reason = _failure(result)
    if reason is not None:
        _say(f"demo failed: {reason}")
        return 1
    return 0


def _latencies_ms(result: Result) -> list[float]:
    ack = result.acks.ack_time
    commits = result.written.commit_time
    return sorted((ack[mid] - at) * 1000 for mid, at in commits.items() if mid in ack)


def _percentile(ordered: Sequence[float], pct: float) -> float:
    """Nearest-rank percentile: always one of the measured values."""
    return ordered[max(0, math.ceil(pct / 100 * len(ordered)) - 1)]


def _published(result: Result, ids: Collection[UUID]) -> int:
    return sum(1 for mid in ids if mid in result.acks.ack_time)


def _order_kept(result: Result) -> bool:
    return all(result.acks.by_key.get(key, []) == ids for key, ids in result.written.by_key.items())


def _summary(result: Result) -> str:
    written = result.written
    latencies = _latencies_ms(result)
    latency = (
        f"p50 {_percentile(latencies, 50):.1f} ms   p99 {_percentile(latencies, 99):.1f} ms"
        if latencies
        else "n/a (nothing was published)"
    )
    # The WAL delivers in commit order, the table in enqueue order: for this demo's
    # writers (one at a time per key) the two are the same, and each source names its own.
    order = "commit" if result.plan.wal else "enqueue"
    return "\n".join(
        [
            "demo summary",
            *_source_lines(result),
            f"  orders committed        {len(written.commit_time):>5}   "
            f"(messages published: {_published(result, written.commit_time)})",
            f"  orders rolled back      {len(written.rolled_back):>5}   "
            f"(messages published: {_published(result, written.rolled_back)}"
            " — rolled back with their orders)",
            f"  commit-to-ack latency     {latency}",
            f"  published messages per key kept their {order} order: " + ("yes" if _order_kept(result) else "no"),
        ]
    )


def _source_lines(result: Result) -> list[str]:
    """In WAL mode, where the committed messages went: the WAL, or the table (parked
    there after a failed publish, which the stdout broker never has)."""
    if not result.plan.wal:
        return []
    through_table = result.db.committed_rows
    through_wal = _published(result, result.written.commit_time) - through_table
    return [
        f"  messages through the WAL {through_wal:>5}   (committed messages in the outbox table: {through_table};"
        " only a failed publish parks one there)"
    ]


def _failure(result: Result) -> str | None:
    """Why the demo did not show what it claims, or None when everything held."""
    written, acks, db = result.written, result.acks, result.db
    committed = set(written.commit_time)
    expected_committed = result.plan.orders - result.plan.orders // result.plan.rollback_every
    if not result.all_dispatched:
        missing = len(committed - acks.ack_time.keys())
        return f"{missing} committed message(s) not published within {DISPATCH_TIMEOUT:g}s"
    if len(committed) != expected_committed or db.committed_orders != len(committed):
        return (
            f"expected {expected_committed} committed orders; the writers saw "
            f"{len(committed)}, the database holds {db.committed_orders}"
        )
    if _published(result, written.rolled_back) or db.rolled_back_rows:
        return "a rolled-back transaction left a published message or a row behind"
    unknown = acks.ack_time.keys() - committed
    if unknown:
        return f"{len(unknown)} published message(s) that no committed order enqueued"
    if not _order_kept(result):
        return f"a key's messages were published out of {'commit' if result.plan.wal else 'enqueue'} order"
    return None
