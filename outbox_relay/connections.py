"""Database connections for the relay, retried with backoff while the database is away."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from collections.abc import Iterator
from typing import Any

import psycopg
import structlog
from psycopg import capabilities, pq
from tenacity import AsyncRetrying, retry_if_exception_type, wait_exponential, wait_random

from outbox_relay.errors import DatabaseError, InvalidDsn, first_line
from outbox_relay.redact import UNPARSEABLE_REASON, redact_dsn, redact_text, shown_dsn

log = structlog.get_logger("outbox_relay.connect")

# Keepalives make a vanished server (a dead host, a cut network) an error within a
# minute instead of a connection that waits forever, but only while the connection is
# idle. A relay's connections are rarely idle: a worker claims every poll, the LISTEN
# connection checks every few seconds, so once a failover's old primary vanishes each
# has a query on its way that nothing answers, and the kernel retransmits it for about
# 15 minutes (tcp_retries2) before the connection fails and the relay reconnects to the
# new primary. tcp_user_timeout ends a connection whose data has gone unacknowledged
# that long (tests/clusters/test_postgres_failover.py, the primary cut off the network).
_KEEPALIVE: dict[str, Any] = {
    "keepalives": 1,
    "keepalives_idle": 10,
    "keepalives_interval": 5,
    "keepalives_count": 3,
    "tcp_user_timeout": 30_000,  # ms
}
# How long a connection attempt may take, per host of the DSN (libpq tries them in turn).
CONNECT_TIMEOUT_S = 10


def connect_sync(dsn: str, *, application_name: str) -> psycopg.Connection[Any]:
    """A blocking connection for the CLI and the demo; errors are one line, DSN redacted."""
    try:
        return psycopg.connect(dsn, connect_timeout=10, application_name=application_name)
    except psycopg.OperationalError as exc:
        shown, hidden = shown_dsn(dsn)
        raise DatabaseError(f"cannot connect to {shown}: {hidden or redact_text(first_line(exc), [dsn])}") from None
    except psycopg.ProgrammingError:
        # libpq's parse error quotes a piece of the DSN, which may be the password.
        raise InvalidDsn(f"invalid DSN: {UNPARSEABLE_REASON}") from None


# psycopg's default: a statement run this often on a connection is prepared server-side.
PREPARE_THRESHOLD = 5


def tcp_settings() -> dict[str, Any]:
    """Keepalives and tcp_user_timeout (above), for a connection opened elsewhere (the WAL
    source's replication connection)."""
    return dict(_KEEPALIVE)


async def connect_once(
    dsn: str,
    *,
    autocommit: bool = False,
    timeout: float = CONNECT_TIMEOUT_S,
    prepare_threshold: int | None = PREPARE_THRESHOLD,
) -> psycopg.AsyncConnection[Any]:
    try:
        return await psycopg.AsyncConnection.connect(
            dsn,
            autocommit=autocommit,
            application_name="outbox-relay",
            connect_timeout=max(1, int(timeout)),
            prepare_threshold=prepare_threshold,
            **_KEEPALIVE,
        )
    except psycopg.ProgrammingError:
        # libpq's parse error quotes a piece of the DSN, which may be the password.
        raise InvalidDsn(f"invalid DSN: {UNPARSEABLE_REASON}") from None


async def connect_with_retry(
    dsn: str,
    *,
    purpose: str,
    retry_max: float,
    autocommit: bool = False,
    prepare_threshold: int | None = PREPARE_THRESHOLD,
) -> psycopg.AsyncConnection[Any]:
    """Connect, retrying forever with capped backoff and a log line per failure."""

    def before_sleep(state: Any) -> None:
        exc = state.outcome.exception() if state.outcome else None
        log.warning(
            "database_unreachable",
            purpose=purpose,
            dsn=redact_dsn(dsn),
            attempt=state.attempt_number,
            retry_in_s=round(state.next_action.sleep, 2) if state.next_action else None,
            error=(shown_dsn(dsn)[1] or redact_text(first_line(exc), [dsn])) if exc else None,
        )

    async for attempt in AsyncRetrying(
        retry=retry_if_exception_type(psycopg.OperationalError),
        wait=wait_exponential(multiplier=0.2, max=max(0.2, retry_max)) + wait_random(0, 0.2),
        before_sleep=before_sleep,
        reraise=True,
    ):
        with attempt:
            return await connect_once(dsn, autocommit=autocommit, prepare_threshold=prepare_threshold)
    raise AssertionError("unreachable")  # pragma: no cover


class AnswerDeadline:
    """Gives a connection up when its server stops answering for `seconds`.

    A server that hangs (its processes frozen, its host's kernel still acknowledging) or
    a network that swallows data without a reset (a proxy's black hole) leaves a
    connection waiting for an answer forever: keepalives only cover idle connections,
    and `tcp_user_timeout` only data the peer's kernel never acknowledged. So each run
    of database calls is watched (`with deadline:`, with `paused()` around the broker
    calls in between), and one that outlives `seconds` has its socket shut down: every
    call waiting on it fails at once with psycopg.OperationalError, the transaction
    included (no ROLLBACK to wait for), and the caller reconnects as after any lost
    connection, to whichever host of the DSN now accepts writes (a failover).

    A server that is only slow (a lock wait, a COMMIT waiting for a synchronous standby
    that is down) would keep its backend waiting after that, holding the batch's row
    locks, one more each time: it does not read the socket while it waits. So the
    deadline also sends the server a cancel request (a connection of its own, given up
    after CANCEL_TIMEOUT_S: a server that answers nothing gets it in vain). The backend
    then stops waiting, finds its client gone and ends. A COMMIT cancelled while it
    waits for the standby has committed locally: its rows were acked by the brokers, so
    marking them was right; the relay, having lost the answer, simply claims on.
    The batch's statement_timeout (queries.sql) ends lock waits server-side first, but
    not that wait: PostgreSQL turns it off before it commits. The socket goes first, so
    a cancelled COMMIT never reaches the relay as a success."""

    def __init__(self, conn: psycopg.AsyncConnection[Any], seconds: float, *, purpose: str):
        self._conn = conn
        self._seconds = seconds
        self._purpose = purpose
        self._timer: asyncio.TimerHandle | None = None
        self.expired = False

    def __enter__(self) -> AnswerDeadline:
        self._arm()
        return self

    def __exit__(self, *exc: object) -> None:
        self._disarm()

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Not the database's time (a broker's): the deadline starts afresh after it.

        Raises psycopg.OperationalError if the deadline expired already (the timer and
        the last answer came in the same turn of the loop): nothing done in the pause
        could be recorded on the connection given up, so it is not started (a batch
        published for nothing, then claimed and published again)."""
        if self.expired:
            raise psycopg.OperationalError(f"no answer from the database within {self._seconds:g}s")
        self._disarm()
        try:
            yield
        finally:
            self._arm()

    def _arm(self) -> None:
        self._disarm()
        self._timer = asyncio.get_running_loop().call_later(self._seconds, self._expire)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _expire(self) -> None:
        self._timer = None
        self.expired = True
        log.warning("database_no_answer", purpose=self._purpose, waited_s=self._seconds)
        # Taken before the socket goes: the caller closes the connection (and with it
        # the key a cancel needs) as soon as its call has failed.
        try:
            cancel = _cancel_connection(self._conn)
        finally:
            shut_down(self._conn)  # the deadline's first job, whatever the cancel does
        if cancel is not None:
            task = asyncio.get_running_loop().create_task(_send_cancel(cancel, self._purpose))
            _cancels.add(task)  # a reference until it ends: the loop keeps only a weak one
            task.add_done_callback(_cancels.discard)


# How long a cancel request may take (a connection, its one packet, the server's close).
CANCEL_TIMEOUT_S = 10.0
_cancels: set[asyncio.Task[None]] = set()


def _cancel_connection(conn: psycopg.AsyncConnection[Any]) -> pq.abc.PGcancelConn | None:
    """A cancel request for `conn`'s server session, not yet sent; None when libpq is
    older than 17 (its only cancel blocks a thread with no time limit: a server that
    answers nothing would keep it forever) or the connection is already closed. It
    carries that session's address, pid and secret key: it cannot reach another."""
    if not capabilities.has_cancel_safe():
        return None
    with contextlib.suppress(psycopg.Error):
        return conn.pgconn.cancel_conn()
    return None


async def finish_cancels() -> None:
    """Let the cancel requests under way end (each within CANCEL_TIMEOUT_S): at the
    relay's exit, a request not yet sent would leave its backend waiting (a COMMIT for
    a synchronous standby that is down, holding its row locks until it returns)."""
    if _cancels:
        await asyncio.wait(set(_cancels), timeout=CANCEL_TIMEOUT_S)


async def _send_cancel(cancel: pq.abc.PGcancelConn, purpose: str) -> None:
    """Send the cancel request (libpq's non-blocking cancel connection, polled: a rare
    event, not worth a reader on the loop) within CANCEL_TIMEOUT_S, then free it."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + CANCEL_TIMEOUT_S
    sent = False
    error = f"no answer within {CANCEL_TIMEOUT_S:g}s"
    try:
        cancel.start()
        while loop.time() < deadline:
            status = cancel.poll()
            if status == pq.PollingStatus.OK:
                sent = True
                break
            if status == pq.PollingStatus.FAILED:
                error = cancel.get_error_message() or "failed"
                break
            await asyncio.sleep(0.02)
    except Exception as exc:  # never "Task exception was never retrieved"
        error = first_line(exc)
    finally:
        cancel.finish()
    if sent:
        log.info("database_cancel_sent", purpose=purpose)
    else:
        log.info("database_cancel_failed", purpose=purpose, error=error)


def shut_down(conn: psycopg.AsyncConnection[Any]) -> None:
    """Shut the connection's socket down (both ways) without closing its descriptor,
    which psycopg still waits on: the wait ends with an error instead of never."""
    with contextlib.suppress(OSError, psycopg.Error):
        fd = os.dup(conn.pgconn.socket)
        with socket.socket(fileno=fd) as sock:
            sock.shutdown(socket.SHUT_RDWR)
