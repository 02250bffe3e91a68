"""What wakes an idle worker: a NOTIFY, the poll timer, or the stop signal.

The LISTEN connection is only an accelerator. The poll is the floor: a lost
notification, a dropped LISTEN connection, NOTIFY disabled, or a pooler that
cannot LISTEN (pgbouncer in transaction mode) delays a message by at most one
poll interval, never strands it.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any, Literal

import psycopg
import structlog
from psycopg import sql

from outbox_relay.connections import PREPARE_THRESHOLD, AnswerDeadline, connect_with_retry
from outbox_relay.errors import first_line

log = structlog.get_logger("outbox_relay.wakeup")

WakeReason = Literal["notify", "poll", "stop"]


class Wakeup:
    """One event per worker, so a single notification wakes every idle worker."""

    def __init__(self, workers: int):
        self._events = [asyncio.Event() for _ in range(workers)]
        self.notified = 0

    def notify_all(self) -> None:
        self.notified += 1
        for event in self._events:
            event.set()

    async def wait(self, worker: int, timeout: float, stop: asyncio.Event) -> WakeReason:
        event = self._events[worker]
        if stop.is_set():
            return "stop"
        waiters = {asyncio.ensure_future(event.wait()), asyncio.ensure_future(stop.wait())}
        try:
            await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waiters:
                waiter.cancel()
        if stop.is_set():
            return "stop"
        if event.is_set():
            event.clear()
            return "notify"
        return "poll"


# How often the listener reads the count of skipped notifications (schema.sql, "Wakes
# the relay"): the longest a skipped NOTIFY delays a message, near enough.
SKIP_WATCH_S = 0.25
# A skip is counted at the committer's trigger, a moment before its commit is visible:
# wake the workers at this many checks in a row after the count moved.
SKIP_WAKES = 2


class Listener:
    """Holds a LISTEN connection open, reconnecting after any failure, and watches the
    count of notifications committers skipped, so no wake-up is lost."""

    def __init__(
        self,
        dsn: str,
        channel: str,
        wakeup: Wakeup,
        *,
        retry_max: float,
        skipped_query: sql.Composed | None = None,
        check_every: float = SKIP_WATCH_S,
        prepare_threshold: int | None = PREPARE_THRESHOLD,
        query_timeout: float = 60.0,
    ):
        self._prepare_threshold = prepare_threshold
        self._query_timeout = query_timeout
        self._dsn = dsn
        self._channel = channel
        self._wakeup = wakeup
        self._retry_max = retry_max
        self._skipped_query = skipped_query
        self._check_every = check_every
        self.connected = False
        self.skip_wakes = 0  # workers woken because a committer skipped its NOTIFY

    async def run(self) -> None:
        while True:
            try:
                await self._listen_once()
            except psycopg.Error as exc:  # any database error: listen again, never end the relay
                self.connected = False
                log.warning("listen_connection_lost", error_type=type(exc).__name__, error=first_line(exc))
                # Rows may have arrived while we were deaf: let the workers look.
                self._wakeup.notify_all()
                await asyncio.sleep(min(1.0, self._retry_max))

    async def _listen_once(self) -> None:
        conn: psycopg.AsyncConnection[Any] = await connect_with_retry(
            self._dsn,
            purpose="listen",
            retry_max=self._retry_max,
            autocommit=True,
            prepare_threshold=self._prepare_threshold,
        )
        # A server that stops answering (hung, or a black-holed network) would leave
        # the check below waiting forever, the workers' NOTIFYs with it: its calls are
        # answered within query_timeout or the connection is given up (connections.py).
        deadline = AnswerDeadline(conn, self._query_timeout, purpose="listen")
        try:
            with deadline:
                await conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(self._channel)))
                # Skips before this point are covered by the wake-up below (the workers claim
                # everything committed so far); the ones after it move the count from here.
                seen = await self._skipped(conn)
            self.connected = True
            log.info("listening", channel=self._channel)
            self._wakeup.notify_all()
            wakes_left = 0
            while True:
                async for _ in conn.notifies(timeout=self._check_every):
                    self._wakeup.notify_all()
                # Also proves the connection alive: a silently dead socket would otherwise
                # leave us listening to nothing.
                with deadline:
                    skipped = await self._skipped(conn)
                if skipped != seen:
                    wakes_left = SKIP_WAKES
                seen = skipped
                if wakes_left:
                    wakes_left -= 1
                    self.skip_wakes += 1
                    self._wakeup.notify_all()
        finally:
            self.connected = False
            with contextlib.suppress(Exception):
                await conn.close()

    async def _skipped(self, conn: psycopg.AsyncConnection[Any]) -> int:
        if self._skipped_query is None:
            await conn.execute("SELECT 1")
            return 0
        cur = await conn.execute(self._skipped_query)
        row = await cur.fetchone()
        return int(row[0]) if row and row[0] is not None else 0
