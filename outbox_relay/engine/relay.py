"""The relay process: workers that claim, publish and record; side tasks; shutdown.

Each worker owns one connection and loops: claim a batch in a transaction,
publish it, record the outcomes, commit. A full batch means more is waiting, so it
goes again at once; otherwise it sleeps until a NOTIFY, the poll timer or stop.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import Coroutine, Mapping, Sequence
from typing import Any, Protocol, TypeVar

import psycopg
import structlog

from outbox_relay import tracing
from outbox_relay.adapter import Adapter
from outbox_relay.config import Config
from outbox_relay.connections import connect_with_retry
from outbox_relay.engine.brokers import BrokerHandle
from outbox_relay.engine.dispatch import Dispatcher
from outbox_relay.engine.maintenance import Maintenance
from outbox_relay.engine.retry import Backoff
from outbox_relay.engine.routing import Router
from outbox_relay.engine.store import OutboxStore, Record
from outbox_relay.engine.wakeup import Listener, Wakeup
from outbox_relay.errors import first_line
from outbox_relay.models import Message
from outbox_relay.observability.health import Health
from outbox_relay.observability.http_server import HealthServer
from outbox_relay.observability.metrics import RelayMetrics
from outbox_relay.operations import schema_manager
from outbox_relay.sqlfiles import Queries, notify_channel

log = structlog.get_logger("outbox_relay.relay")

T = TypeVar("T")

BROKER_GRACE_S = 5.0


class RelayObserver(Protocol):
    """Told about every committed batch (the metrics, the demo and tests use it)."""

    def batch_recorded(self, messages: Sequence[Message], records: Sequence[Record]) -> None: ...


class SideSource(Protocol):
    """A source that runs beside the table's workers (the WAL source), with their
    dispatcher. The relay calls ``run`` once, in its own task, after the brokers are
    connected; it returns once `stop` is set, finishing what it has in hand (the relay
    waits for it as for its workers, up to shutdown_timeout). It retries what it can
    itself; raising stops the relay (loudly: the error is the process's exit line). It
    tells `observer` (the relay's observers: metrics, and the caller's) about what it
    is done with, as the workers do about each committed batch, from its own task."""

    name: str

    async def run(self, dispatcher: Dispatcher, stop: asyncio.Event, observer: RelayObserver) -> None: ...

    def readiness(self) -> tuple[bool, dict[str, Any]] | None:
        """Its say in /readyz, from memory (observability/health.py, ReadinessSource)."""
        ...


class Observers:
    """A relay's observers, told in turn: its workers and side sources share one."""

    def __init__(self, observers: Sequence[RelayObserver]):
        self._observers = list(observers)

    def batch_recorded(self, messages: Sequence[Message], records: Sequence[Record]) -> None:
        for observer in self._observers:
            observer.batch_recorded(messages, records)


class Relay:
    def __init__(
        self,
        config: Config,
        adapters: Mapping[str, Adapter],
        *,
        observer: RelayObserver | None = None,
        heartbeat_every: float = 5.0,
        sources: Sequence[SideSource] = (),
    ):
        relay = config.relay
        self.config = config
        self.relay_id = uuid.uuid4()
        self._dsn = config.database.dsn.get_secret_value()
        self._queries = Queries(config.database.schema_name)
        self._backoff = Backoff.from_config(relay)
        self._brokers = {name: BrokerHandle(name, a, self._backoff) for name, a in adapters.items()}
        self._store = OutboxStore(
            self._queries,
            hold_dead_letters=relay.dead_letter_policy == "hold",
            workers=relay.workers,
            max_batch_bytes=relay.max_batch_bytes,
            max_payload_bytes=relay.max_payload_bytes,
            # A relay that hangs mid-batch (not dead, so its connection stays up) would
            # hold its rows forever; Postgres ends such a session, the rows become
            # claimable again. A batch starts no wave after publish_timeout, and a wave
            # lasts at most that long.
            idle_in_transaction_timeout=2 * relay.publish_timeout + 30.0,
        )
        self.metrics = RelayMetrics()
        self._router = Router(config.routes)
        self._dispatcher = Dispatcher(
            self._brokers,
            self._router,
            self._backoff,
            max_attempts=relay.max_attempts,
            publish_timeout=relay.publish_timeout,
            metrics=self.metrics,
            max_payload_bytes=relay.max_payload_bytes,
            hold_dead_letters=relay.dead_letter_policy == "hold",
        )
        self._wakeup = Wakeup(relay.workers)
        self._listener = Listener(
            self._dsn,
            notify_channel(config.database.schema_name),
            self._wakeup,
            retry_max=relay.retry.max,
            skipped_query=self._queries["skipped_wakeups"],
            prepare_threshold=config.database.prepare_threshold,
        )
        self._maintenance = Maintenance(
            self._dsn,
            self._queries,
            relay_id=self.relay_id,
            retention=relay.retention,
            heartbeat_every=heartbeat_every,
            in_flight=lambda: self.in_flight,
            retry_max=relay.retry.max,
            metrics=self.metrics,
            long_transaction_warning=relay.long_transaction_warning,
            on_heartbeat=self._heartbeat,
            prepare_threshold=config.database.prepare_threshold,
        )
        self._observers = Observers([self.metrics] if observer is None else [self.metrics, observer])
        self._sources = list(sources)
        self._stop = asyncio.Event()
        self.started = asyncio.Event()
        self.in_flight = 0
        self._batch_started: dict[int, float] = {}  # worker -> when its current batch began
        self.health = Health(
            config,
            metrics=self.metrics,
            brokers=self._brokers,
            circuits=self._dispatcher.circuits,
            routed=self._router.brokers_in_use(),
            started=self.started,
            batches_started=self._batch_started.values,
            sources=self._sources,
        )

    def stop(self) -> None:
        """Stop claiming; the run finishes its in-flight batches and returns."""
        if not self._stop.is_set():
            log.info("relay_stopping")
            self._stop.set()

    @property
    def brokers(self) -> Mapping[str, BrokerHandle]:
        return self._brokers

    @property
    def http(self) -> HealthServer | None:
        """The health port's server while it listens (its `port`), else None."""
        return self.health.server

    async def run(self) -> None:
        """Run until :meth:`stop`; raise if a task fails unexpectedly."""
        # The port first: a port taken (a second relay on the host) is a configuration
        # error to report before anything is connected that would need closing; and while
        # the database is still away at start, /livez answers (waiting for it is no reason
        # for a restart) and /readyz says not yet.
        await self.health.start()
        try:
            checked = await self._until_stopped(self._check_schema())
        except BaseException:
            await self.health.close()
            raise
        if not checked:
            await self.health.close()
            log.info("relay_stopped", relay_id=str(self.relay_id), published=0)
            return
        for handle in self._brokers.values():
            await handle.connect()
        await self._brokers_connected(BROKER_GRACE_S)
        relay = self.config.relay
        tasks: list[asyncio.Task[Any]] = [
            asyncio.create_task(self._worker(i), name=f"worker-{i}") for i in range(relay.workers)
        ]
        tasks += [
            asyncio.create_task(s.run(self._dispatcher, self._stop, self._observers), name=s.name)
            for s in self._sources
        ]
        side: list[asyncio.Task[Any]] = [asyncio.create_task(self._maintenance.run(), name="maintenance")]
        if relay.notify:
            side.append(asyncio.create_task(self._listener.run(), name="listener"))
        log.info(
            "relay_started",
            relay_id=str(self.relay_id),
            schema=self.config.database.schema_name,
            workers=relay.workers,
            notify=relay.notify,
            brokers=sorted(self._brokers),
        )
        self.started.set()
        stop_waiter = asyncio.create_task(self._stop.wait(), name="stop")
        try:
            done, _ = await asyncio.wait([stop_waiter, *tasks, *side], return_when=asyncio.FIRST_COMPLETED)
            failed = [t for t in done if t is not stop_waiter and not t.cancelled() and t.exception()]
            if failed:
                self._stop.set()
                error = failed[0].exception()
                log.error("relay_task_failed", task=failed[0].get_name(), error=repr(error))
                raise error  # type: ignore[misc]
            await self._drain(tasks, relay.shutdown_timeout)
        finally:
            self._stop.set()
            for task in [stop_waiter, *tasks, *side]:
                task.cancel()
            await asyncio.gather(stop_waiter, *tasks, *side, return_exceptions=True)
            await self.health.close()
            await self._maintenance.forget()
            self._dispatcher.close()
            for handle in self._brokers.values():
                await handle.close()
            log.info("relay_stopped", relay_id=str(self.relay_id), published=self.metrics.published_total())

    def _heartbeat(self) -> None:
        self.health.refresh_broker_gauges()
        self.metrics.in_flight.set(self.in_flight)

    async def _brokers_connected(self, timeout: float) -> None:
        """Give the brokers a moment to connect before the first claim, so a normal start
        does not send its first batch into "not connected yet" and a retry delay. A
        broker still down after `timeout` only delays its own messages."""

        async def all_connected() -> None:
            for handle in self._brokers.values():
                await handle.connected.wait()

        with contextlib.suppress(TimeoutError):
            await self._until_stopped(asyncio.wait_for(all_connected(), timeout))

    async def _drain(self, workers: list[asyncio.Task[Any]], timeout: float) -> None:
        """Let in-flight batches finish; past `timeout`, cancel them (rolled back, rows released)."""
        _, pending = await asyncio.wait(workers, timeout=timeout)
        if pending:
            log.warning("shutdown_timeout", in_flight=self.in_flight, timeout_s=timeout)

    async def _until_stopped(self, coro: Coroutine[Any, Any, T]) -> T | None:
        """Await `coro` unless stop comes first (then cancel it and return None).

        `coro` must not return None itself.

        Connecting retries for as long as the database is away; a SIGTERM meanwhile
        must still end the process promptly.
        """
        task = asyncio.create_task(coro)
        stopper = asyncio.create_task(self._stop.wait())
        try:
            await asyncio.wait({task, stopper}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopper.cancel()
        if task.done():
            return task.result()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        return None

    async def _check_schema(self) -> bool:
        conn = await connect_with_retry(
            self._dsn,
            purpose="startup",
            retry_max=self.config.relay.retry.max,
            prepare_threshold=self.config.database.prepare_threshold,
        )
        async with conn:
            await schema_manager.check(conn, self.config.database.schema_name)
        return True

    async def _worker(self, index: int) -> None:
        relay = self.config.relay
        conn: psycopg.AsyncConnection[Any] | None = None
        failures = 0  # database errors in a row, for the pause before the next try
        try:
            while not self._stop.is_set():
                try:
                    if conn is None:
                        # Inside the try: a connection ended right after it opened (a
                        # failover, pg_terminate_backend) fails at its first statement,
                        # and is handled like any other lost connection below.
                        conn = await self._until_stopped(self._connect_worker())
                        if conn is None:
                            break
                        self.metrics.worker_connected(+1)
                    claimed = await self._batch(conn, index)
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
                        self.metrics.worker_connected(-1)
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
                    self.metrics.wakeups.labels("backlog").inc()
                    continue
                reason = await self._wakeup.wait(index, relay.poll_interval, self._stop)
                self.metrics.wakeups.labels(reason).inc()
        finally:
            if conn is not None:
                self.metrics.worker_connected(-1)
                with contextlib.suppress(Exception):
                    await conn.close()

    async def _connect_worker(self) -> psycopg.AsyncConnection[Any]:
        conn = await connect_with_retry(
            self._dsn,
            purpose="worker",
            retry_max=self.config.relay.retry.max,
            prepare_threshold=self.config.database.prepare_threshold,
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

    async def _batch(self, conn: psycopg.AsyncConnection[Any], worker: int = 0) -> bool:
        """One batch; True when there may be more to claim right away."""
        self._batch_started[worker] = asyncio.get_running_loop().time()
        try:
            async with conn.transaction():
                claim = await self._store.claim(conn, self.config.relay.batch_size)
                messages = claim.messages
                if not messages:
                    return claim.more_keys
                self.in_flight += len(messages)
                self.metrics.in_flight.set(self.in_flight)
                try:
                    with tracing.batch_span(
                        [m.headers for m in messages], attributes={"messaging.batch.message_count": len(messages)}
                    ):
                        records = await self._dispatcher.dispatch(messages)
                    await self._store.record(conn, records)
                finally:
                    self.in_flight -= len(messages)
                    self.metrics.in_flight.set(self.in_flight)
        finally:
            del self._batch_started[worker]
        self._observers.batch_recorded(messages, records)
        return True
