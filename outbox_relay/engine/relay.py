"""The relay process: its sources, side tasks and shutdown.

A relay runs its sources (sources/base.py says what one is): the outbox table's
workers (sources/table.py) always, and the WAL source (sources/wal/runner.py) where
assembly.py adds it, all with one dispatcher (engine/dispatch.py: adapters, routes,
circuits, retry and dead-letter policy), beside the NOTIFY listener that wakes the
table's workers, the maintenance task (heartbeat, retention) and the health port.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

import psycopg
import structlog

from outbox_relay import schema_version
from outbox_relay.adapter import Adapter
from outbox_relay.claim_check.uploads import ClaimChecks
from outbox_relay.config import Config
from outbox_relay.connections import connect_once, connect_with_retry, finish_cancels
from outbox_relay.engine.brokers import BrokerHandle
from outbox_relay.engine.dead_letter_topic import DeadLetterTopic
from outbox_relay.engine.dispatch import Dispatcher
from outbox_relay.engine.maintenance import Maintenance
from outbox_relay.engine.retry import Backoff
from outbox_relay.engine.routing import Router
from outbox_relay.engine.stopping import until_stopped
from outbox_relay.engine.wakeup import Listener, Wakeup
from outbox_relay.models import Message, Record
from outbox_relay.observability.health import Health, Mount
from outbox_relay.observability.http_server import HealthServer
from outbox_relay.observability.metrics import RelayMetrics
from outbox_relay.sources.base import RelayObserver, Source
from outbox_relay.sources.table import TableSource
from outbox_relay.sqlfiles import Queries, notify_channel

__all__ = ["Relay", "RelayObserver", "SideSource"]

log = structlog.get_logger("outbox_relay.relay")


BROKER_GRACE_S = 5.0


# The interface of a source and of an observer live with the sources; the names stay
# importable from here for code written against them.
SideSource = Source


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
        sources: Sequence[Source] = (),
        mount: Mount | None = None,
    ):
        """`mount`: an app the health port serves too (the console: console/mount.py)."""
        relay = config.relay
        self.config = config
        self.relay_id = uuid.uuid4()
        self._dsn = config.database.dsn.get_secret_value()
        self._queries = Queries(config.database.schema_name)
        self._backoff = Backoff.from_config(relay)
        self._brokers = {name: BrokerHandle(name, a, self._backoff) for name, a in adapters.items()}
        self.metrics = RelayMetrics()
        self._router = Router(config.routes, config.claim_check)
        stores = [claim.store for claim in self._router.claim_check_stores()]
        self.claim_checks = ClaimChecks(stores, self._backoff, relay.publish_timeout) if stores else None
        self._dispatcher = Dispatcher(
            self._brokers,
            self._router,
            self._backoff,
            max_attempts=relay.max_attempts,
            publish_timeout=relay.publish_timeout,
            metrics=self.metrics,
            max_payload_bytes=relay.max_payload_bytes,
            hold_dead_letters=relay.dead_letter_policy == "hold",
            # Kept with dispatched rows only: retention 0s deletes them as it marks them.
            receipts=relay.receipts and relay.retention > 0,
            claim_checks=self.claim_checks,
        )
        self._wakeup = Wakeup(relay.workers)
        self.table = TableSource(config, metrics=self.metrics, wakeup=self._wakeup, backoff=self._backoff)
        self._listener = Listener(
            self._dsn,
            notify_channel(config.database.schema_name),
            self._wakeup,
            retry_max=relay.retry.max,
            skipped_query=self._queries["skipped_wakeups"],
            prepare_threshold=config.database.prepare_threshold,
            query_timeout=config.database.query_timeout,
        )
        self._maintenance = Maintenance(
            self._dsn,
            self._queries,
            relay_id=self.relay_id,
            retention=relay.retention,
            outcomes_retention=config.outcomes.retention,
            wal_receipts=relay.wal.receipts,
            # The WAL source's state where it has one (streaming, paused, standby,
            # restarting, ...): "table" would hide a WAL relay that cannot stream.
            source=lambda: _source_name(self.metrics.wal_state_now),
            brokers=lambda: self.health.broker_states(),
            heartbeat_every=heartbeat_every,
            in_flight=lambda: self.table.in_flight,
            retry_max=relay.retry.max,
            metrics=self.metrics,
            long_transaction_warning=relay.long_transaction_warning,
            on_heartbeat=self._heartbeat,
            prepare_threshold=config.database.prepare_threshold,
            query_timeout=config.database.query_timeout,
        )
        self._dead_letter_topic: DeadLetterTopic | None = None
        if config.dead_letters.publish_to is not None:
            self._dead_letter_topic = DeadLetterTopic(
                self._dsn,
                self._queries,
                config.dead_letters.publish_to,
                self._dispatcher.publish_to,
                self._dispatcher.keeps_order,
                schema=config.database.schema_name,
                backoff=self._backoff,
                poll_interval=relay.poll_interval,
                publish_timeout=relay.publish_timeout,
                max_payload_bytes=relay.max_payload_bytes,
                max_batch_bytes=relay.max_batch_bytes,
                retry_max=relay.retry.max,
                metrics=self.metrics,
                prepare_threshold=config.database.prepare_threshold,
                query_timeout=config.database.query_timeout,
            )
        watching: list[RelayObserver] = [self.metrics]
        if self._dead_letter_topic is not None:
            watching.append(self._dead_letter_topic)
        if observer is not None:
            watching.append(observer)
        self._observers = Observers(watching)
        self._sources: list[Source] = [self.table, *sources]
        self._stop = asyncio.Event()
        self.started = asyncio.Event()
        self.health = Health(
            config,
            metrics=self.metrics,
            brokers=self._brokers,
            circuits=self._dispatcher.circuits,
            # Not the dead-letter topic's broker: its being away costs only the copies' wait.
            routed=self._router.brokers_in_use(),
            started=self.started,
            batches_started=self.table.batches_started.values,
            sources=[*self._sources, self.claim_checks] if self.claim_checks else self._sources,
            mount=mount,
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
        # A database that answers at once says first whether its schema will do: a
        # missing or old schema is then the one thing said, where after http_listening it
        # read as a relay that had started. A database still away is waited for with the
        # port open: a port taken (a second relay on the host) is a configuration error to
        # report before anything is connected that would need closing, and meanwhile
        # /livez answers (waiting for the database is no reason for a restart) and
        # /readyz says not yet.
        checked = await until_stopped(self._check_schema(retry=False), self._stop)
        if checked is not None:
            await self.health.start()
            try:
                checked = checked or await until_stopped(self._check_schema(retry=True), self._stop)
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
            asyncio.create_task(s.run(self._dispatcher, self._stop, self._observers), name=s.name)
            for s in self._sources
        ]
        side: list[asyncio.Task[Any]] = [asyncio.create_task(self._maintenance.run(), name="maintenance")]
        if relay.notify:
            side.append(asyncio.create_task(self._listener.run(), name="listener"))
        if self._dead_letter_topic is not None:
            side.append(asyncio.create_task(self._dead_letter_topic.run(), name="dead_letter_topic"))
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
            if self.claim_checks is not None:
                self.claim_checks.close()
            for handle in self._brokers.values():
                await handle.close()
            await finish_cancels()
            log.info("relay_stopped", relay_id=str(self.relay_id), published=self.metrics.published_total())

    @property
    def in_flight(self) -> int:
        """Messages the table's workers claimed and have not recorded yet."""
        return self.table.in_flight

    def _heartbeat(self) -> None:
        self.health.refresh_broker_gauges()
        self.metrics.in_flight.set(self.table.in_flight)

    async def _brokers_connected(self, timeout: float) -> None:
        """Give the brokers a moment to connect before the first claim, so a normal start
        does not send its first batch into "not connected yet" and a retry delay. A
        broker still down after `timeout` only delays its own messages."""

        async def all_connected() -> None:
            for handle in self._brokers.values():
                await handle.connected.wait()

        with contextlib.suppress(TimeoutError):
            await until_stopped(asyncio.wait_for(all_connected(), timeout), self._stop)

    async def _drain(self, workers: list[asyncio.Task[Any]], timeout: float) -> None:
        """Let in-flight batches finish; past `timeout`, cancel them (rolled back, rows released)."""
        _, pending = await asyncio.wait(workers, timeout=timeout)
        if pending:
            log.warning("shutdown_timeout", in_flight=self.in_flight, timeout_s=timeout)

    async def _check_schema(self, *, retry: bool) -> bool:
        """The schema and each source's start conditions (SchemaError, ConfigError).
        Without `retry`, on one connection attempt: False if the database did not answer."""
        prepare_threshold = self.config.database.prepare_threshold
        if retry:
            conn = await connect_with_retry(
                self._dsn, purpose="startup", retry_max=self.config.relay.retry.max, prepare_threshold=prepare_threshold
            )
        else:
            try:
                conn = await connect_once(self._dsn, prepare_threshold=prepare_threshold)
            except psycopg.OperationalError:
                return False
        async with conn:
            await schema_version.check(conn, self.config.database.schema_name)
            for source in self._sources:  # sources/base.py: check_start
                check_start = getattr(source, "check_start", None)
                if check_start is not None:
                    await check_start(conn, self._brokers)
        return True


def _source_name(wal_state: str) -> str:
    """What the heartbeat row says the relay publishes from (the console shows it)."""
    if wal_state == "off":
        return "table"
    if wal_state == "starting":
        return "starting"  # the WAL source has not yet read which source is on
    return f"wal ({wal_state})"
