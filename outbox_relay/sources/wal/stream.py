"""An async reader of a logical replication slot (pgoutput) over psycopg 3.

psycopg has no replication API, but since 3.3 it sends START_REPLICATION on a
``replication="database"`` connection and leaves the connection in COPY BOTH mode. The
stream is then driven at the libpq level: ``pgconn.get_copy_data(1)`` (non-blocking)
until it would block, then the event loop's reader callback on the socket;
``put_copy_data`` and ``flush`` for the status updates.

What it yields, and which positions it reports, is transactions.py's: for each
committed transaction with messages of ours, those messages in parts of bounded size,
the last part carrying the commit's end LSN; the caller confirms that LSN once every
message of the transaction and of those before it is done, never a message's own LSN
(the end of its WAL record: Debezium's duplicates and losses, dbz#2004 and dbz#2058).

Lifecycle and concurrency:
- ``async with WalStream(...) as stream`` connects and starts streaming; leaving sends
  the confirmed position a last time, waits (at most FINAL_STATUS_TIMEOUT) for the
  server to end the stream, which shows it took the position, and disconnects.
- One task iterates (``async for part in stream``), one iteration at a time, and
  closes the stream (or closes it after that task stopped).
- ``confirm`` may be called from any task of the same event loop; it records the
  position, which goes out with the next status update.
- A side task sends a status update every ``status_interval`` seconds whether or not
  the caller iterates, so a caller that stops reading (a broker outage) keeps its
  connection: the walsender ends one that has not answered for wal_sender_timeout
  (60 s by default; keep status_interval well below it). Keepalives that ask for a reply
  are answered when read.
- A server silent for 3 status intervals (each update asks it to answer) is taken for
  a dead connection: the iteration raises ReplicationError. Reconnecting is the
  caller's job: a new WalStream resumes after the slot's confirmed position.

A confirmed position lives in the walsender's memory: PostgreSQL writes the slot to
disk only when its restart position or xmin moves (once the running-transactions
records it logs, about every 15 s under load, are confirmed); a confirm alone does not
mark it for a checkpoint, and only from PostgreSQL 17 is it written at a clean
shutdown. After a server crash, and before 17 after any restart, the slot may start
earlier again (on 15, a slot younger than that went back to its creation), so a
restart can deliver confirmed transactions once more (at least once), never skip one
(tests/faults/test_outages.py::test_postgres_restarted_fast_and_immediate).
"""

from __future__ import annotations

import asyncio
import contextlib
from types import TracebackType
from typing import Any, Self

import psycopg
from psycopg import errors as pg_errors
from psycopg import pq

from outbox_relay.connections import CONNECT_TIMEOUT_S, tcp_settings
from outbox_relay.errors import first_line
from outbox_relay.sources.wal import pgoutput, slot
from outbox_relay.sources.wal.errors import ReplicationError, SlotInUse, SlotMissing
from outbox_relay.sources.wal.transactions import TransactionPart, Transactions

__all__ = ["TransactionPart", "WalStream"]

SILENCE_INTERVALS = 3  # status intervals without a word from the server: a dead connection
FINAL_STATUS_TIMEOUT = 5.0  # seconds for the server to take the last confirmed position on close
# A confirmed position is reported this soon, not at the next status interval: what a
# killed relay sends again is then what was in flight, not status_interval's worth of
# acked transactions. At most this many updates a second follow a stream of confirms.
CONFIRM_REPORT_S = 0.05


class WalStream:
    """Streams one slot; see the module docstring for its rules."""

    def __init__(
        self,
        dsn: str,
        *,
        slot_name: str,
        publication: str,
        prefix: str,
        start_lsn: int = 0,
        status_interval: float = 10.0,
        max_part_messages: int = 1000,
        max_part_bytes: int = 1 << 20,
    ):
        self._dsn = dsn
        self._slot = slot.validate_name(slot_name)
        self._publication = slot.validate_name(publication)
        self._start_lsn = start_lsn
        self._status_interval = status_interval
        self._conn: psycopg.AsyncConnection[Any] | None = None
        self._status_task: asyncio.Task[None] | None = None
        self._send_lock = asyncio.Lock()
        self._confirmed = asyncio.Event()  # a confirm moved the position: report it soon
        self._reading = False
        self._last_heard = 0.0
        self._transactions = Transactions(prefix, max_part_messages, max_part_bytes)
        # IDENTIFY_SYSTEM's answer at start: the cluster's identifier (the same on its
        # physical standbys) and the end of its WAL flushed then.
        self.system_id = ""
        self.wal_end = 0

    # -- lifecycle ------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        await self.open()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def open(self) -> None:
        """Connect and start streaming; SlotMissing, SlotInUse or ReplicationError if not."""
        try:
            # The relay's other connections' timeouts (connections.py): a DSN's vanished
            # first host (a failover's old primary) costs one connect_timeout, not the
            # kernel's minutes of SYN retries, before the next host is tried.
            self._conn = await psycopg.AsyncConnection.connect(
                self._dsn, replication="database", autocommit=True, connect_timeout=CONNECT_TIMEOUT_S, **tcp_settings()
            )
        except psycopg.Error as exc:
            raise ReplicationError(f"cannot open a replication connection: {first_line(exc)}") from exc
        try:
            await self._start()
        except BaseException:
            await self._conn.close()
            raise
        self._last_heard = asyncio.get_running_loop().time()
        self._status_task = asyncio.create_task(self._send_periodically(), name=f"wal-status-{self._slot}")

    async def _start(self) -> None:
        assert self._conn is not None
        try:
            state = await slot.read_state_async(self._conn, self._slot)
            if state is None:
                raise SlotMissing(f"the replication slot {self._slot!r} does not exist")
            self._transactions.start_at(max(self._start_lsn, state.confirmed_flush_lsn or 0))
            cursor = await self._conn.execute("IDENTIFY_SYSTEM")
            row = await cursor.fetchone()
            if row is not None:
                self.system_id, self.wal_end = str(row[0]), pgoutput.parse_lsn(str(row[2]))
            start = slot.query(
                "start_replication",
                slot=self._slot,
                publication=self._publication,
                start=pgoutput.format_lsn(self._start_lsn),
            )
            cursor = await self._conn.execute(start)
        except pg_errors.ObjectInUse as exc:
            raise SlotInUse(f"the replication slot {self._slot!r} is in use: {first_line(exc)}") from exc
        except pg_errors.UndefinedObject as exc:
            raise SlotMissing(f"cannot stream the slot {self._slot!r}: {first_line(exc)}") from exc
        except psycopg.Error as exc:
            raise ReplicationError(f"cannot stream the slot {self._slot!r}: {first_line(exc)}") from exc
        result = cursor.pgresult
        if result is None or result.status != pq.ExecStatus.COPY_BOTH:
            raise ReplicationError(f"START_REPLICATION on {self._slot!r} did not start a replication stream")

    async def close(self) -> None:
        """Send the confirmed position a last time (best effort) and disconnect."""
        if self._status_task is not None:
            self._status_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, ReplicationError):
                await self._status_task
            self._status_task = None
        if self._conn is None or self._conn.closed:
            return
        with contextlib.suppress(ReplicationError, psycopg.Error, TimeoutError):
            async with asyncio.timeout(FINAL_STATUS_TIMEOUT):
                await self._end_copy()
        await self._conn.close()

    async def _end_copy(self) -> None:
        """Send the confirmed position, end the COPY, and read (dropping it) what the
        server still sends until its own CopyDone: the walsender handles what we send in
        order, so its CopyDone shows it took the position. Disconnecting at once can lose
        the position: a socket closed with unread data resets the connection, and a
        walsender with output pending tries to send before it reads, and dies."""
        await self.send_status()
        pgconn = self._connection().pgconn
        while pgconn.put_copy_end() == 0:
            await self._wait(writer=True)
        while pgconn.flush() == 1:
            await self._wait(writer=True)
        while (nbytes := pgconn.get_copy_data(1)[0]) >= 0:
            if nbytes == 0:
                await self._wait(reader=True, timeout=FINAL_STATUS_TIMEOUT)
                pgconn.consume_input()

    # -- positions ------------------------------------------------------------------

    @property
    def walsender_pid(self) -> int:
        """The server process streaming the slot for this stream (pg_replication_slots.active_pid)."""
        return int(self._connection().pgconn.backend_pid)

    def confirm(self, lsn: int) -> None:
        """Every message up to the transaction whose commit ends at `lsn` is done: the
        slot may let that WAL go (reported within CONFIRM_REPORT_S). Lower positions than
        one confirmed before are ignored; ValueError for a position beyond what was yielded
        (a caller's bug: it would skip messages)."""
        before = self._transactions.flush_position
        self._transactions.confirm(lsn)
        if self._transactions.flush_position != before:
            self._confirmed.set()

    @property
    def flush_position(self) -> int:
        """What the next status update reports as flushed (Transactions.flush_position)."""
        return self._transactions.flush_position

    async def send_status(self, *, reply_requested: bool = False) -> None:
        """Send a standby status update now."""
        pgconn = self._connection().pgconn
        async with self._send_lock:
            flushed = self._transactions.flush_position
            update = pgoutput.standby_status_update(
                max(self._transactions.received, flushed), flushed, flushed, reply_requested=reply_requested
            )
            try:
                while pgconn.put_copy_data(update) == 0:
                    await self._wait(writer=True)
                while pgconn.flush() == 1:
                    await self._wait(writer=True)
            except psycopg.Error as exc:
                raise ReplicationError(f"cannot send a status update on {self._slot!r}: {first_line(exc)}") from exc

    async def _send_periodically(self) -> None:
        while True:
            try:
                # asyncio.timeout, not wait_for: on Python 3.11 wait_for can swallow the
                # cancellation close() sends when the event is set at the same moment.
                async with asyncio.timeout(self._status_interval):
                    await self._confirmed.wait()
            except TimeoutError:
                # Asking for a reply makes a live server answer: the reader's proof of life.
                await self.send_status(reply_requested=True)
                continue
            self._confirmed.clear()
            await self.send_status()
            await asyncio.sleep(CONFIRM_REPORT_S)

    # -- reading --------------------------------------------------------------------

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> TransactionPart:
        # The transaction being read lives on the stream, not in a generator: a caller
        # may stop iterating and start again without losing a transaction's start.
        if self._reading:
            raise RuntimeError("a WalStream is read by one task at a time")
        self._reading = True
        try:
            return await self._next_part()
        finally:
            self._reading = False

    async def ready_part(self) -> TransactionPart | None:
        """The next part if one can be formed from what has arrived, without waiting for
        the network (None otherwise): a caller that batches takes what is there."""
        if self._reading:
            raise RuntimeError("a WalStream is read by one task at a time")
        self._reading = True
        try:
            pgconn = self._connection().pgconn
            consumed = False
            while True:
                try:
                    nbytes, data = pgconn.get_copy_data(1)
                except psycopg.Error as exc:
                    raise ReplicationError(
                        f"the replication stream of {self._slot!r} failed: {first_line(exc)}"
                    ) from exc
                if nbytes > 0:
                    found = self._transactions.take_in(data)
                    if isinstance(found, TransactionPart):
                        return found
                    if found is not None and found.reply_requested:
                        await self.send_status()
                elif nbytes == 0:
                    if not consumed:
                        # What the socket holds already, read without blocking.
                        try:
                            pgconn.consume_input()
                        except psycopg.Error as exc:
                            raise ReplicationError(
                                f"the replication stream of {self._slot!r} failed: {first_line(exc)}"
                            ) from exc
                        consumed = True
                        continue
                    return self._transactions.pending_part()
                else:
                    raise await self._ended()
        finally:
            self._reading = False

    async def _next_part(self) -> TransactionPart:
        pgconn = self._connection().pgconn
        while True:
            try:
                nbytes, data = pgconn.get_copy_data(1)
            except psycopg.Error as exc:  # psycopg raises for libpq's -2: the connection failed
                raise ReplicationError(f"the replication stream of {self._slot!r} failed: {first_line(exc)}") from exc
            if nbytes > 0:
                found = self._transactions.take_in(data)
                if isinstance(found, TransactionPart):
                    return found
                if found is not None and found.reply_requested:
                    await self.send_status()
            elif nbytes == 0:
                # Never sit on a part while waiting for the network.
                if (part := self._transactions.pending_part()) is not None:
                    return part
                await self._receive()
            else:
                raise await self._ended()

    async def _receive(self) -> None:
        """Wait for the socket to have data and read it into libpq's buffer; raise if the
        server stays silent or the connection or the status task failed."""
        loop = asyncio.get_running_loop()
        while not await self._wait(reader=True, timeout=self._status_interval):
            self._raise_if_status_task_failed()
            silent = loop.time() - self._last_heard
            if silent > SILENCE_INTERVALS * self._status_interval:
                raise ReplicationError(
                    f"no word from the server streaming {self._slot!r} for {silent:.1f} s: connection lost"
                )
        self._last_heard = loop.time()
        try:
            self._connection().pgconn.consume_input()
        except psycopg.Error as exc:
            raise ReplicationError(f"the replication connection of {self._slot!r} failed: {first_line(exc)}") from exc

    def _raise_if_status_task_failed(self) -> None:
        task = self._status_task
        if task is not None and task.done() and not task.cancelled() and (failure := task.exception()) is not None:
            raise ReplicationError(f"the status updates of {self._slot!r} stopped: {first_line(failure)}") from failure

    async def _ended(self) -> ReplicationError:
        """Why the server ended the COPY, in its own words when it sent any."""
        reason = await self._final_error()
        return ReplicationError(
            f"the server ended the replication stream of {self._slot!r}: {reason or 'no reason given'}"
        )

    async def _final_error(self) -> str:
        pgconn = self._connection().pgconn
        reason = ""
        # A server that ends the stream with an error (terminated, shut down) sends it
        # as a result, then closes: reading on fails, and the error read stands.
        with contextlib.suppress(psycopg.Error, TimeoutError):
            async with asyncio.timeout(self._status_interval):
                while True:
                    while pgconn.is_busy():
                        await self._wait(reader=True, timeout=self._status_interval)
                        pgconn.consume_input()
                    result = pgconn.get_result()
                    if result is None:
                        break
                    if result.status == pq.ExecStatus.FATAL_ERROR:
                        reason = first_line(result.get_error_message())
        return reason or first_line(pgconn.get_error_message())

    async def _wait(self, *, reader: bool = False, writer: bool = False, timeout: float | None = None) -> bool:
        """True once the socket is ready, False after `timeout` seconds (None: the
        status interval times the silence limit, as a bound on a stuck send)."""
        loop = asyncio.get_running_loop()
        fileno = self._connection().pgconn.socket
        ready: asyncio.Future[bool] = loop.create_future()

        def settle(value: bool) -> None:
            if not ready.done():
                ready.set_result(value)

        if reader:
            loop.add_reader(fileno, settle, True)
        if writer:
            loop.add_writer(fileno, settle, True)
        limit = timeout if timeout is not None else SILENCE_INTERVALS * self._status_interval
        timer = loop.call_later(limit, settle, False)
        try:
            done = await ready
        finally:
            timer.cancel()
            if reader:
                loop.remove_reader(fileno)
            if writer:
                loop.remove_writer(fileno)
        if writer and not done and timeout is None:
            raise ReplicationError(f"the replication connection of {self._slot!r} accepts no data: connection lost")
        return done

    def _connection(self) -> psycopg.AsyncConnection[Any]:
        if self._conn is None or self._conn.closed:
            raise ReplicationError(f"the stream of {self._slot!r} is not open")
        return self._conn
