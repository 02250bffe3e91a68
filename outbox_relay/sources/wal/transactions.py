"""From the walsender's messages to parts of committed transactions, and the positions
the stream may report: the stream's logic without its connection.

Parts: the transactional logical messages with our prefix of one committed transaction,
in commit order, at most ``max_messages`` of them or ``max_bytes`` of content a part
(a transaction can hold a million messages: it is never held whole). The last part of a
transaction carries its commit's end LSN, the position to confirm. A transaction without
a message of ours yields nothing.

Positions, the flushed LSN a status update reports:
- the position the caller confirmed (a commit's end LSN), never less than the slot's
  confirmed position when streaming started (PostgreSQL 15 would move the slot back, and
  confirmed transactions would come again);
- once every transaction handed out is confirmed, how far the server has read with
  nothing of ours left before it: the end of a transaction without our messages, or a
  keepalive's position between transactions (the walsender sends everything it decoded
  before such a keepalive). So an idle outbox lets the slot advance past other WAL.
"""

from __future__ import annotations

from dataclasses import dataclass

from outbox_relay.sources.wal import pgoutput
from outbox_relay.sources.wal.errors import ProtocolError
from outbox_relay.sources.wal.pgoutput import Begin, Commit, Keepalive, Message


@dataclass(frozen=True, slots=True)
class TransactionPart:
    """A run of one committed transaction's messages with our prefix, in commit order."""

    xid: int
    commit_lsn: int  # Begin's final LSN: the commit record's start, the same in every part
    commit_time: int  # microseconds since 2000-01-01 UTC (pgoutput.to_datetime)
    messages: list[Message]  # may be empty on the last part only
    end_lsn: int | None  # the commit's end LSN on the transaction's last part; None: more parts follow

    @property
    def last(self) -> bool:
        return self.end_lsn is not None


class Transactions:
    """Takes in CopyData messages one at a time (one reader; not thread-safe)."""

    def __init__(self, prefix: str, max_messages: int, max_bytes: int):
        self._prefix = prefix
        self._max_messages = max_messages
        self._max_bytes = max_bytes
        # The transaction being read: its Begin, the messages not yet handed out, and
        # whether a part of it already was.
        self._begin: Begin | None = None
        self._buffer: list[Message] = []
        self._buffer_bytes = 0
        self._parts_out = False
        self._confirmed = 0  # by the caller, and never below the slot's position at start
        self._last_out = 0  # the end LSN of the last transaction handed out whole
        self._passed = 0  # read by the server with nothing of ours before it
        self.received = 0  # the highest position heard of (the status update's "written")

    def start_at(self, confirmed: int) -> None:
        """The slot's confirmed position when streaming starts: the floor of every report."""
        self._confirmed = max(self._confirmed, confirmed)

    def take_in(self, data: bytes | memoryview) -> TransactionPart | Keepalive | None:
        """One CopyData message: a part when one is complete, a keepalive (to answer if
        it asks for a reply), else None."""
        payload = pgoutput.xlog_payload(data)
        if payload is None:
            return self._keepalive(data)
        event = pgoutput.decode(payload)
        if isinstance(event, Message):
            if self._begin is not None and event.transactional and event.prefix == self._prefix:
                self._buffer.append(event)
                self._buffer_bytes += len(event.content)
                if len(self._buffer) >= self._max_messages or self._buffer_bytes >= self._max_bytes:
                    return self._take(None)
        elif isinstance(event, Begin):
            self._begin, self._buffer, self._buffer_bytes, self._parts_out = event, [], 0, False
        elif isinstance(event, Commit) and self._begin is not None:
            return self._commit(event)
        return None

    def pending_part(self) -> TransactionPart | None:
        """The messages read so far of the transaction in progress, if any, as a part: the
        reader hands them out rather than wait for the network with them."""
        return self._take(None) if self._buffer else None

    def confirm(self, lsn: int) -> None:
        if lsn > max(self._last_out, self._confirmed):
            raise ValueError(
                f"confirm({pgoutput.format_lsn(lsn)}) is beyond the last transaction delivered "
                f"({pgoutput.format_lsn(self._last_out)})"
            )
        self._confirmed = max(self._confirmed, lsn)

    @property
    def flush_position(self) -> int:
        if self._confirmed < self._last_out:
            return self._confirmed
        return max(self._confirmed, self._passed)

    def _commit(self, commit: Commit) -> TransactionPart | None:
        delivered = bool(self._buffer) or self._parts_out
        part = self._take(commit.end_lsn)
        # Before the caller holds the part: a status update must not report the end of a
        # transaction the caller has not confirmed.
        if delivered:
            self._last_out = commit.end_lsn
        self._passed = max(self._passed, commit.end_lsn)
        self.received = max(self.received, commit.end_lsn)
        return part if delivered else None

    def _keepalive(self, data: bytes | memoryview) -> Keepalive:
        keepalive = pgoutput.decode_copy_data(data)
        if not isinstance(keepalive, Keepalive):
            raise ProtocolError(f"XLogData of {len(data)} bytes with no pgoutput message in it")
        self.received = max(self.received, keepalive.wal_end)
        if self._begin is None:
            self._passed = max(self._passed, keepalive.wal_end)
        return keepalive

    def _take(self, end_lsn: int | None) -> TransactionPart:
        """The buffered messages as a part (the transaction's last when `end_lsn` is given)."""
        begin = self._begin
        assert begin is not None
        part = TransactionPart(begin.xid, begin.final_lsn, begin.commit_time, self._buffer, end_lsn)
        self._buffer, self._buffer_bytes = [], 0
        if end_lsn is None:
            self._parts_out = True
        else:
            self._begin, self._parts_out = None, False
        return part
