"""Side tasks on their own connection: retention (of dispatched rows and of outcomes the
application left) and the relay heartbeat.

A database outage only pauses them (they reconnect); a bug in them stops the relay,
loudly, through the relay's task group. Each statement must be answered within
database.query_timeout (connections.AnswerDeadline): a server that hangs, a network
that swallows data, or a COMMIT waiting for a synchronous standby that is down would
otherwise stall the heartbeat and the gauges for good, and the relay's shutdown with them.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.metadata
import os
import socket
from collections.abc import Callable
from typing import Any
from uuid import UUID

import psycopg
import structlog
from psycopg.types.json import Jsonb

from outbox_relay.connections import PREPARE_THRESHOLD, AnswerDeadline, connect_with_retry
from outbox_relay.engine.store import milliseconds
from outbox_relay.errors import first_line
from outbox_relay.observability.metrics import RelayMetrics
from outbox_relay.sqlfiles import Queries

log = structlog.get_logger("outbox_relay.maintenance")


def _package_version() -> str | None:
    try:
        return importlib.metadata.version("outbox-relay")
    except importlib.metadata.PackageNotFoundError:  # run from a source tree not installed
        return None


RETENTION_CHUNK = 1000
STALE_RELAY_S = 600.0
FORGET_TIMEOUT_S = 5.0  # the shutdown's last write waits no longer than this
# The share of query_timeout the pending count may take before the server ends it: well
# inside the deadline on the whole step, so the server, not the deadline, ends it.
GAUGE_SHARE = 0.5


def retention_interval(retention: float) -> float:
    """How often to look for expired rows: often enough to keep the table near its bound."""
    return min(60.0, max(0.5, retention / 4))


class Maintenance:
    def __init__(
        self,
        dsn: str,
        queries: Queries,
        *,
        relay_id: UUID,
        retention: float,
        heartbeat_every: float,
        in_flight: Callable[[], int],
        retry_max: float,
        metrics: RelayMetrics,
        long_transaction_warning: float,
        on_heartbeat: Callable[[], None] = lambda: None,
        prepare_threshold: int | None = PREPARE_THRESHOLD,
        query_timeout: float = 60.0,
        outcomes_retention: float = 7 * 24 * 3600.0,
        wal_receipts: bool = False,
        source: Callable[[], str] = lambda: "table",
        brokers: Callable[[], dict[str, Any]] = dict,
    ):
        """`source`: which source the relay publishes from now (table, or wal while the
        WAL source streams), and `brokers` each broker's state, for its heartbeat row."""
        self._dsn = dsn
        self._query_timeout = query_timeout
        self._prepare_threshold = prepare_threshold
        self._q = queries
        self._relay_id = relay_id
        self._retention = retention
        self._outcomes_retention = outcomes_retention
        self._wal_receipts = wal_receipts  # relay.wal.receipts: theirs expire with relay.retention
        self._heartbeat_every = heartbeat_every
        self._in_flight = in_flight
        self._retry_max = retry_max
        self._metrics = metrics
        self._long_tx = long_transaction_warning
        self._on_heartbeat = on_heartbeat
        self._warned: dict[int, float] = {}  # pid -> when we last warned about it
        self._source = source
        self._brokers = brokers
        self._version = _package_version()
        self._sampled = metrics.totals()  # the totals at the previous sample
        self._samples_granted = True
        self._oldest_pending_age: float | None = None
        self.deleted = 0
        self._outcomes_warned = float("-inf")

    async def run(self) -> None:
        next_retention = 0.0
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn = await connect_with_retry(
                    self._dsn,
                    purpose="maintenance",
                    retry_max=self._retry_max,
                    autocommit=True,
                    prepare_threshold=self._prepare_threshold,
                )
                async with conn:
                    while True:
                        with self._deadline(conn):
                            await self.heartbeat(conn)
                        with self._deadline(conn):
                            await self.observe(conn)
                        with self._deadline(conn):
                            await self.sample(conn)
                        self._on_heartbeat()
                        if loop.time() >= next_retention:
                            await self.delete_expired(conn)
                            await self.delete_expired_outcomes(conn)
                            if self._wal_receipts:
                                await self.delete_expired_wal_receipts(conn)
                            next_retention = loop.time() + retention_interval(
                                min(self._retention, self._outcomes_retention)
                            )
                        await asyncio.sleep(self._heartbeat_every)
            except psycopg.Error as exc:  # any database error: reconnect, never end the relay
                log.warning("maintenance_connection_lost", error_type=type(exc).__name__, error=first_line(exc))
                await asyncio.sleep(min(1.0, self._retry_max))

    def _deadline(self, conn: psycopg.AsyncConnection[Any], seconds: float | None = None) -> AnswerDeadline:
        return AnswerDeadline(conn, seconds or self._query_timeout, purpose="maintenance")

    async def heartbeat(self, conn: psycopg.AsyncConnection[Any]) -> None:
        await conn.execute(
            self._q["heartbeat"],
            {
                "relay_id": self._relay_id,
                "hostname": socket.gethostname(),
                "pid": os.getpid(),
                "in_flight": self._in_flight(),
                "version": self._version,
                "source": self._source(),
                "brokers": Jsonb(self._brokers()),
            },
        )
        await conn.execute(self._q["forget_stale_relays"], {"stale_s": STALE_RELAY_S})

    async def sample(self, conn: psycopg.AsyncConnection[Any]) -> None:
        """What this relay did since its previous sample (the console's chart)."""
        regranted = False
        if not self._samples_granted:
            cur = await conn.execute(self._q["relay_samples_granted"], {"schema": self._q.schema})
            row = await cur.fetchone()
            if not (row and row[0]):
                return
            regranted = True  # said once the sample is written (the counts since the refusal in it)
        lag = self._lag()
        totals = self._metrics.totals()
        published, failed, dead = (now - before for now, before in zip(totals, self._sampled, strict=True))
        try:
            await conn.execute(
                self._q["relay_sample"],
                {
                    "relay_id": self._relay_id,
                    "published": published,
                    "failed": failed,
                    "dead_lettered": dead,
                    "oldest_pending_age_s": lag,
                },
            )
        except psycopg.errors.InsufficientPrivilege as exc:
            if regranted:
                return  # still refused, whatever the catalog said: warned already
            # A relay role granted before schema version 14: the relay goes on, the
            # console's chart stays empty until the grant (docs/how-to/console.md),
            # which the next heartbeats look for.
            self._samples_granted = False
            log.warning(
                "relay_samples_not_granted",
                error=first_line(exc),
                hint="grant the relay role again: outbox-relay schema sql --relay-role ROLE --grants-only",
            )
            return
        except psycopg.Error as exc:
            if isinstance(exc, psycopg.OperationalError):
                raise  # the connection: the loop reconnects
            # A sample is for a chart: a failed one (a deadlock between replicas deleting
            # the same old samples, say) must not cost the heartbeat or retention. Its
            # counts go into the next sample.
            log.warning("relay_sample_failed", error_type=type(exc).__name__, error=first_line(exc))
            return
        self._sampled = totals
        if regranted:
            self._samples_granted = True
            log.info("relay_samples_granted")

    def _lag(self) -> float | None:
        """The sample's lag: the oldest pending row's age and, while the relay streams
        from the WAL, the WAL source's own lag (the oldest committed transaction it read
        and has not confirmed), whichever is larger. In WAL mode the table holds only
        what was parked or enqueued before the switch, so its age alone would chart a
        stalled stream as no lag at all."""
        if self._metrics.wal_state_now == "off":  # table mode
            return self._oldest_pending_age
        try:
            wal = self._metrics.wal_lag_seconds()
        except Exception as exc:  # a chart's number must never stop the heartbeat
            log.warning("relay_sample_lag_unread", error_type=type(exc).__name__, error=first_line(exc))
            return self._oldest_pending_age
        if self._oldest_pending_age is None:
            return wal
        return max(self._oldest_pending_age, wal)

    async def observe(self, conn: psycopg.AsyncConnection[Any]) -> None:
        """Lag gauges, and the watchdog for the oldest open transaction."""
        row = None
        try:
            async with conn.transaction():
                # The gauge counts a large backlog: JIT compiling it costs more than the
                # count (OutboxStore.claim), and a count slower than the deadline is ended
                # by the server (gauge_settings in queries.sql). For this transaction only:
                # behind a pooler in transaction mode, the server session goes to other
                # clients afterwards.
                await conn.execute(
                    self._q["gauge_settings"], {"statement_ms": milliseconds(GAUGE_SHARE * self._query_timeout)}
                )
                cur = await conn.execute(self._q["pending_gauge"])
                row = await cur.fetchone()
        except psycopg.errors.QueryCanceled:
            self._oldest_pending_age = None  # not read this time: the sample says so
            log.warning("pending_gauge_skipped", reason="the count took longer than half of database.query_timeout")
        if row:
            self._metrics.pending.set(row[0] or 0)
            self._metrics.oldest_pending_age.set(float(row[1] or 0.0))
            self._oldest_pending_age = None if row[1] is None else float(row[1])
        cur = await conn.execute(self._q["oldest_transaction"])
        oldest = await cur.fetchone()
        age = float(oldest[2]) if oldest else 0.0
        self._metrics.oldest_transaction_age.set(age)
        if oldest and age >= self._long_tx:
            pid = int(oldest[0])
            now = asyncio.get_running_loop().time()
            if now - self._warned.get(pid, -1e9) >= 60.0:
                self._warned[pid] = now
                log.warning(
                    "long_transaction",
                    pid=pid,
                    state=oldest[1],
                    age_s=round(age, 1),
                    hint="it holds back vacuum of the outbox table and slows claims",
                )

    async def delete_expired(self, conn: psycopg.AsyncConnection[Any]) -> int:
        """Dispatched rows older than relay.retention."""
        total = await self._delete_in_chunks(conn, "delete_expired", self._retention)
        if total:
            self.deleted += total
            log.info("retention_deleted", rows=total)
        return total

    async def delete_expired_wal_receipts(self, conn: psycopg.AsyncConnection[Any]) -> int:
        """Receipts of streamed messages older than relay.retention (relay.wal.receipts)."""
        total = await self._delete_in_chunks(conn, "delete_expired_wal_receipts", self._retention)
        if total:
            log.info("wal_receipts_retention_deleted", rows=total)
        return total

    async def delete_expired_outcomes(self, conn: psycopg.AsyncConnection[Any]) -> int:
        """Outcome rows older than outcomes.retention that the application left. Dead
        letters among them are warned about: their compensation will never run."""
        total = dead = 0
        while True:
            try:
                with self._deadline(conn):
                    cur = await conn.execute(
                        self._q["delete_expired_outcomes"],
                        {"retention_s": self._outcomes_retention, "limit": RETENTION_CHUNK},
                    )
                    row = await cur.fetchone()
            except psycopg.errors.InsufficientPrivilege as exc:
                # A relay role granted before schema version 10: everything else goes on.
                self._warn_outcomes_not_granted(exc)
                return total
            deleted, dead_deleted = row if row else (0, 0)
            total += deleted
            dead += dead_deleted
            if deleted < RETENTION_CHUNK:
                break
        if dead:
            log.warning(
                "outcomes_expired_untaken",
                dead_lettered=dead,
                rows=total,
                hint="the application never took these dead letters' outcomes (outbox.take_outcomes)",
            )
        elif total:
            log.info("outcomes_retention_deleted", rows=total)
        return total

    def _warn_outcomes_not_granted(self, exc: psycopg.Error) -> None:
        now = asyncio.get_running_loop().time()
        if now - self._outcomes_warned >= 3600.0:
            self._outcomes_warned = now
            log.warning(
                "outcomes_retention_not_granted",
                error=first_line(exc),
                hint="run the relay role's GRANTs again: outbox-relay schema sql --grants-only --relay-role ROLE",
            )

    async def _delete_in_chunks(self, conn: psycopg.AsyncConnection[Any], query: str, retention: float) -> int:
        total = 0
        while True:
            with self._deadline(conn):  # per chunk: a large expiry takes many, each quick
                cur = await conn.execute(self._q[query], {"retention_s": retention, "limit": RETENTION_CHUNK})
            total += cur.rowcount
            if cur.rowcount < RETENTION_CHUNK:
                break
        return total

    async def forget(self) -> None:
        """Remove this relay's heartbeat row at shutdown (best effort)."""
        with contextlib.suppress(Exception):
            conn = await psycopg.AsyncConnection.connect(
                self._dsn, autocommit=True, connect_timeout=int(FORGET_TIMEOUT_S)
            )
            async with conn:
                with self._deadline(conn, FORGET_TIMEOUT_S):
                    await conn.execute(self._q["forget_relay"], {"relay_id": self._relay_id})
