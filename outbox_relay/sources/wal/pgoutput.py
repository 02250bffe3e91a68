"""The replication stream's messages that the WAL source needs, and nothing more.

Two layers, as PostgreSQL sends them (protocol docs: "Streaming Replication Protocol"
and "Logical Streaming Replication Protocol"):

- CopyData messages of the walsender: 'w' XLogData (a piece of the output plugin's
  output) and 'k' primary keepalive; and the one we send, 'r' standby status update;
- inside XLogData, pgoutput version 1: 'B' Begin, 'C' Commit, 'M' logical decoding
  message. Everything else pgoutput may send ('R' relation, 'Y' type, 'O' origin, row
  changes of a publication's tables) decodes to None: the relay publishes messages, not
  rows, and its publication holds no table.

Every integer is big-endian. Times are microseconds since 2000-01-01 00:00 UTC (the
PostgreSQL epoch); positions are 64-bit LSNs, written "16/B374D848" by PostgreSQL.

The decoded messages are NamedTuples, not dataclasses: they are built once per message
in the hot loop, and a frozen dataclass's __init__ costs several times more.
"""

from __future__ import annotations

import re
import struct
import time
from datetime import UTC, datetime, timedelta
from typing import Final, NamedTuple

from outbox_relay.sources.wal.errors import ProtocolError

PG_EPOCH: Final = datetime(2000, 1, 1, tzinfo=UTC)
_UNIX_TO_PG_US: Final = 946_684_800_000_000  # microseconds from 1970-01-01 to 2000-01-01

XLOG_DATA: Final = ord("w")
KEEPALIVE: Final = ord("k")
BEGIN: Final = ord("B")
COMMIT: Final = ord("C")
MESSAGE: Final = ord("M")

_XLOG_HEADER = struct.Struct(">QQq")  # after 'w': wal start, wal end, send time
_KEEPALIVE = struct.Struct(">QqB")  # after 'k': wal end, send time, reply requested
_STATUS = struct.Struct(">cQQQqB")  # 'r', written, flushed, applied, send time, reply requested
_BEGIN = struct.Struct(">QqI")  # after 'B': final LSN, commit time, xid
_COMMIT = struct.Struct(">BQQq")  # after 'C': flags, commit LSN, end LSN, commit time
_MESSAGE_HEAD = struct.Struct(">BQ")  # after 'M': flags, LSN; then prefix\0, int32 length, content
_INT32 = struct.Struct(">i")
_XLOG_PAYLOAD = 1 + _XLOG_HEADER.size
_TRANSACTIONAL: Final = 1


class XLogData(NamedTuple):
    wal_start: int
    wal_end: int
    send_time: int
    payload: bytes  # one pgoutput message


class Keepalive(NamedTuple):
    wal_end: int  # how far the walsender has read and sent
    send_time: int
    reply_requested: bool  # answer at once, or the walsender ends the connection at wal_sender_timeout


class Begin(NamedTuple):
    final_lsn: int  # where the commit record starts: identifies the transaction in the slot
    commit_time: int
    xid: int


class Commit(NamedTuple):
    flags: int
    commit_lsn: int  # the commit record's start, as Begin's final_lsn
    end_lsn: int  # the commit record's end: the position to confirm once the transaction is done
    commit_time: int


class Message(NamedTuple):
    transactional: bool
    lsn: int  # the END of the message's WAL record, not its start: never a position to confirm
    prefix: str
    content: bytes


def decode_copy_data(data: bytes | memoryview) -> XLogData | Keepalive:
    """One CopyData message of the walsender; ProtocolError for anything else."""
    if not len(data):
        raise ProtocolError("empty CopyData message from the walsender")
    kind = data[0]
    try:
        if kind == XLOG_DATA:
            wal_start, wal_end, send_time = _XLOG_HEADER.unpack_from(data, 1)
            return XLogData(wal_start, wal_end, send_time, bytes(data[_XLOG_PAYLOAD:]))
        if kind == KEEPALIVE:
            wal_end, send_time, reply = _KEEPALIVE.unpack_from(data, 1)
            return Keepalive(wal_end, send_time, reply == 1)
    except struct.error as exc:
        raise ProtocolError(f"truncated {chr(kind)!r} message from the walsender ({len(data)} bytes)") from exc
    raise ProtocolError(f"unexpected CopyData message from the walsender: {bytes(data[:1])!r}")


def xlog_payload(data: bytes | memoryview) -> bytes | None:
    """The pgoutput message in an XLogData message, None for any other CopyData message:
    the hot path's shortcut past decode_copy_data (the relay needs no XLogData header)."""
    if len(data) > _XLOG_PAYLOAD and data[0] == XLOG_DATA:
        return bytes(data[_XLOG_PAYLOAD:])
    return None


def decode(payload: bytes) -> Begin | Commit | Message | None:
    """One pgoutput (version 1) message: Begin, Commit, Message, or None for the kinds
    the relay does not need. ProtocolError when a needed kind is truncated."""
    if not payload:
        raise ProtocolError("empty XLogData from the walsender: no pgoutput message in it")
    kind = payload[0]
    try:
        if kind == MESSAGE:
            return _message(payload)
        if kind == BEGIN:
            return Begin(*_BEGIN.unpack_from(payload, 1))
        if kind == COMMIT:
            return Commit(*_COMMIT.unpack_from(payload, 1))
    except (struct.error, ValueError) as exc:
        raise ProtocolError(f"malformed pgoutput {chr(kind)!r} message ({len(payload)} bytes): {exc}") from exc
    return None


def _message(payload: bytes) -> Message:
    flags, lsn = _MESSAGE_HEAD.unpack_from(payload, 1)
    start = 1 + _MESSAGE_HEAD.size
    end = payload.index(0, start)  # ValueError when the prefix has no terminator
    (size,) = _INT32.unpack_from(payload, end + 1)
    content_start = end + 1 + _INT32.size
    if size < 0 or content_start + size > len(payload):
        raise ValueError(f"content of {size} bytes, {len(payload) - content_start} present")
    prefix = payload[start:end].decode("utf-8")
    return Message(flags & _TRANSACTIONAL == _TRANSACTIONAL, lsn, prefix, payload[content_start : content_start + size])


def standby_status_update(
    written: int, flushed: int, applied: int, *, now: int | None = None, reply_requested: bool = False
) -> bytes:
    """The 'r' message: the positions we have written, flushed (for a logical slot: the
    position PostgreSQL may discard WAL up to, confirmed_flush_lsn) and applied."""
    return _STATUS.pack(b"r", written, flushed, applied, pg_now() if now is None else now, int(reply_requested))


def pg_now() -> int:
    """Now, in microseconds since the PostgreSQL epoch."""
    return time.time_ns() // 1000 - _UNIX_TO_PG_US


def to_datetime(pg_time: int) -> datetime:
    """A PostgreSQL timestamp (microseconds since 2000-01-01 UTC) as an aware datetime."""
    return PG_EPOCH + timedelta(microseconds=pg_time)


_LSN = re.compile(r"([0-9A-Fa-f]{1,8})/([0-9A-Fa-f]{1,8})")


def parse_lsn(text: str) -> int:
    """ "16/B374D848" as an integer; ValueError for anything PostgreSQL would not print."""
    match = _LSN.fullmatch(text)
    if not match:
        raise ValueError(f"invalid LSN {text!r}: expected two hexadecimal numbers like 16/B374D848")
    return int(match.group(1), 16) << 32 | int(match.group(2), 16)


def format_lsn(lsn: int) -> str:
    """An LSN as PostgreSQL prints it: "16/B374D848"."""
    if not 0 <= lsn < 1 << 64:
        raise ValueError(f"invalid LSN {lsn}: not a 64-bit unsigned integer")
    return f"{lsn >> 32:X}/{lsn & 0xFFFFFFFF:X}"
