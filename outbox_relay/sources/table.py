"""The table source: rows of the outbox table, claimed by workers.

Each worker owns one connection and loops: claim a batch in a transaction (the keyed
walk and runs, and keyless rows: engine/store.py and schema/queries.sql), dispatch it,
record the outcomes on the rows, commit. A full batch means more is waiting, so it goes
again at once; otherwise it sleeps until a NOTIFY (the relay's listener wakes it), the
poll timer or stop. What a claim, a dispatch and a record mean is sources/base.py's.

Lifecycle: ``run`` starts ``relay.workers`` workers and returns once `stop` is set and
each has finished its batch in hand (cancelled past the relay's shutdown_timeout: the
batch's transaction rolls back and its rows are claimable again). A database error in
a worker is survived (a new connection after a growing pause); anything else stops it,
and ``run`` raises it.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Mapping
from typing import Any

import psycopg
import structlog

from outbox_relay import tracing
from outbox_relay.adapter import Adapter
from outbox_relay.config import Config
from outbox_relay.connections import AnswerDeadline, connect_with_retry
from outbox_relay.engine.dispatch import Dispatcher
from outbox_relay.engine.outcomes import feeds_dead_letters
from outbox_relay.engine.retry import Backoff
from outbox_relay.engine.stopping import until_stopped
from outbox_relay.engine.store import OutboxStore
from outbox_relay.engine.wakeup import Wakeup
from outbox_relay.errors import first_line
from outbox_relay.models import Message
from outbox_relay.observability.metrics import RelayMetrics
from outbox_relay.sources.base import RelayObserver
from outbox_relay.sqlfiles import Queries

log = structlog.get_logger("outbox_relay.relay")


class TableSource:
    """The outbox table's workers; see the module docstring."""

    name = "table-source"

    def __init__(self, config: Config, *, metrics: RelayMetrics, wakeup: Wakeup, backoff: Backoff):
        relay = config.relay
        self._config = config
        self._dsn = config.database.dsn.get_secret_value()
        self._metrics = metrics
        self._wakeup = wakeup
        self._backoff = backoff
        self.store = OutboxStore(
            Queries(config.database.schema_name),
            hold_dead_letters=relay.dead_letter_policy == "hold",
            workers=relay.workers,
            max_batch_bytes=relay.max_batch_bytes,
            max_payload_bytes=relay.max_payload_bytes,
            # A relay that hangs mid-batch (not dead, so its connection stays up) would
            # hold its rows forever; Postgres ends such a session, the rows become
            # claimable again. A batch starts no wave after publish_timeout, and a wave
            # lasts at most that long.
            idle_in_transaction_timeout=2 * relay.publish_timeout + 30.0,
            # A statement the server is slow to finish (a lock wait) is ended by the
            # server a little before the relay's deadline on answers (query_timeout,
            # below) would give the connection up: then the server frees the backend,
            # where a connection given up client-side leaves it waiting (one more each
            # query_timeout). A COMMIT waiting for a synchronous standby is not covered
            # (PostgreSQL turns statement_timeout off before it commits): the deadline's
            # cancel request ends that wait (connections.py).
            statement_timeout=0.9 * config.database.query_timeout,
            keep_dispatched=relay.retention > 0,
            feed_dead_letters=config.outcomes.dead_lettered,
        )
        # outcomes.delivered: whether a topic's deliveries are written for the application,
        # decided once per topic (None: no topic is, and a batch pays nothing for it).
        self._feeds: dict[str, bool] | None = {} if config.outcomes.delivered else None
        self.in_flight = 0  # messages claimed and not yet recorded, over all workers
        self.batches_started: dict[int, float] = {}  # worker -> when its current batch began
        self._stop = asyncio.Event()

    async def check_start(self, conn: psycopg.AsyncConnection[Any], brokers: Mapping[str, Adapter]) -> None:
        """Whether dead letters can get their outcome row (engine/outcomes.py)."""
        self.store.feed_dead_letters = await feeds_dead_letters(conn, self._config)

    def readiness(self) -> tuple[bool, dict[str, Any]] | None:
        return None  # the relay's own probes (database, brokers, batch age) are the table's

    async def run(self, dispatcher: Dispatcher, stop: asyncio.Event, observer: RelayObserver) -> None:
        self._stop = stop
        workers = [
            asyncio.create_task(self._worker(i, dispatcher, observer), name=f"worker-{i}")
            for i in range(self._config.relay.workers)
        ]
        try:
            done, _ = await asyncio.wait(workers, return_when=asyncio.FIRST_EXCEPTION)
            for task in done:
                if not task.cancelled() and (error := task.exception()) is not None:
                    raise error
        finally:
            for task in workers:
                task.cancel()
            await asyncio.gather(*workers, return_exceptions=True)

    async def _worker(self, index: int, dispatcher: Dispatcher, observer: RelayObserver) -> None:
        relay = self._config.relay
        conn: psycopg.AsyncConnection[Any] | None = None
        failures = 0  # database errors in a row, for the pause before the next try
        try:
            while not self._stop.is_set():
                try:
                    if conn is None:
                        # Inside the try: a connection ended right after it opened (a
                        # failover, pg_terminate_backend) fails at its first statement,
                        # and is handled like any other lost connection below.
                        conn = await until_stopped(self._connect_worker(), self._stop)
                        if conn is None:
                            break
                        self._metrics.worker_connected(+1)
                    claimed = await self.batch(conn, dispatcher, observer, index)
                    failures = 0
                except psycopg.Error as exc:
                    # Connection lost, the server ended the session or the transaction
                    # (idle-in-transaction or transaction timeout, a failover to a read-only
                    # standby), or any other database error (a pooler without prepared
                    # statements, a value the driver cannot load): the batch was rolled
                    # back, its rows are claimable again. Start over on a new connection,
                    # with a growing pause, rather than let the process die and restart
                    # into the same error (a crash loop that stalls every key).
                    failures += 1
                    log.warning(
                        "database_connection_lost", worker=index, error_type=type(exc).__name__, error=first_line(exc)
                    )
                    if conn is not None:
                        self._metrics.worker_connected(-1)
                        with contextlib.suppress(Exception):
                            await conn.close()
                    conn = None
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._stop.wait(), timeout=self._backoff.delay(failures))
                    continue
                if claimed:
                    # Claim until nothing is left: more may have committed meanwhile, and
                    # a committer that skipped its NOTIFY counts on this (schema.sql). A
                    # claim that found nothing but stopped its key walk early (most keys
                    # waiting) goes on too: it ends once the walk has been all the way round.
                    self._metrics.wakeups.labels("backlog").inc()
                    continue
                reason = await self._wakeup.wait(index, relay.poll_interval, self._stop)
                self._metrics.wakeups.labels(reason).inc()
        finally:
            if conn is not None:
                self._metrics.worker_connected(-1)
                with contextlib.suppress(Exception):
                    await conn.close()

    async def _connect_worker(self) -> psycopg.AsyncConnection[Any]:
        conn = await connect_with_retry(
            self._dsn,
            purpose="worker",
            retry_max=self._config.relay.retry.max,
            prepare_threshold=self._config.database.prepare_threshold,
        )
        # The claim relies on READ COMMITTED: each statement sees what committed before
        # it, and a row lock that waited re-checks the row (store.py, claim_runs). A
        # database or role default of repeatable read or serializable would make claims
        # fail with serialization errors instead; psycopg sets this level at every BEGIN.
        # Nothing else is set for the session: each batch sets what it needs for its own
        # transaction (OutboxStore.claim), so a pooler in transaction mode can hand the
        # server session to another client in between.
        try:
            await conn.set_isolation_level(psycopg.IsolationLevel.READ_COMMITTED)
        except BaseException:
            # Cancelled by a stop that came meanwhile: the caller never gets this
            # connection, so close it here rather than leave it to the collector.
            await conn.close()
            raise
        return conn

    def _delivered_feed(self, messages: list[Message]) -> list[int]:
        """Ids of the batch's messages whose delivery is written to the outcomes table."""
        feeds = self._feeds
        if feeds is None:
            return []
        fed = []
        for message in messages:
            wanted = feeds.get(message.topic)
            if wanted is None:
                if len(feeds) >= 10_000:  # a topic per tenant: bounded, decided again
                    feeds.clear()
                wanted = feeds[message.topic] = self._config.outcomes.feeds_delivered(message.topic)
            if wanted:
                fed.append(message.id)
        return fed

    async def batch(
        self, conn: psycopg.AsyncConnection[Any], dispatcher: Dispatcher, observer: RelayObserver, worker: int = 0
    ) -> bool:
        """One batch; True when there may be more to claim right away."""
        self.batches_started[worker] = asyncio.get_running_loop().time()
        # The database's part of the batch (BEGIN and the claim; the marks and COMMIT) must
        # be answered within query_timeout; the publish has its own (publish_timeout).
        deadline = AnswerDeadline(conn, self._config.database.query_timeout, purpose="worker")
        try:
            with deadline:
                # Not in psycopg's pipeline mode: until its Sync the server sends no
                # ReadyForQuery, so during the publish the session would be "active", not
                # "idle in transaction", and idle_in_transaction_session_timeout (set by the
                # claim for a relay that hangs mid-batch) would never run.
                async with conn.transaction():
                    claim = await self.store.claim(conn, self._config.relay.batch_size)
                    messages = claim.messages
                    if not messages:
                        return claim.more_keys
                    self.in_flight += len(messages)
                    self._metrics.in_flight.set(self.in_flight)
                    try:
                        with (
                            deadline.paused(),
                            tracing.batch_span(
                                [m.headers for m in messages],
                                attributes={"messaging.batch.message_count": len(messages)},
                            ),
                        ):
                            records = await dispatcher.dispatch(messages)
                        await self.store.record(conn, records, self._delivered_feed(messages))
                    finally:
                        self.in_flight -= len(messages)
                        self._metrics.in_flight.set(self.in_flight)
        finally:
            del self.batches_started[worker]
        observer.batch_recorded(messages, records)
        return True
