"""From walsender messages to transaction parts and positions
(outbox_relay/sources/wal/transactions.py), on messages built byte by byte."""

from __future__ import annotations

import struct

import pytest

from outbox_relay.sources.wal.errors import ProtocolError
from outbox_relay.sources.wal.pgoutput import Keepalive
from outbox_relay.sources.wal.transactions import TransactionPart, Transactions

PREFIX = "outbox-relay:outbox"


def xlog(payload: bytes) -> bytes:
    return b"w" + struct.pack(">QQq", 0, 0, 0) + payload


def begin(final_lsn: int, xid: int = 7) -> bytes:
    return xlog(b"B" + struct.pack(">QqI", final_lsn, 1000, xid))


def commit(commit_lsn: int, end_lsn: int) -> bytes:
    return xlog(b"C" + struct.pack(">BQQq", 0, commit_lsn, end_lsn, 1000))


def message(content: bytes, *, prefix: str = PREFIX, transactional: bool = True, lsn: int = 1) -> bytes:
    head = struct.pack(">BQ", int(transactional), lsn) + prefix.encode() + b"\0"
    return xlog(b"M" + head + struct.pack(">i", len(content)) + content)


def keepalive(wal_end: int, *, reply: bool = False) -> bytes:
    return b"k" + struct.pack(">QqB", wal_end, 0, int(reply))


def contents(part: TransactionPart | Keepalive | None) -> list[bytes]:
    assert isinstance(part, TransactionPart)
    return [m.content for m in part.messages]


def feed(transactions: Transactions, *messages: bytes) -> list[TransactionPart | Keepalive | None]:
    return [transactions.take_in(m) for m in messages]


def test_a_transactions_messages_come_out_at_its_commit_with_the_commit_end() -> None:
    transactions = Transactions(PREFIX, 1000, 1 << 20)

    out = feed(transactions, begin(500), message(b"a"), message(b"b"), commit(500, 548))

    assert out[:3] == [None, None, None]
    part = out[3]
    assert isinstance(part, TransactionPart)
    assert (part.xid, part.commit_lsn, part.commit_time, part.end_lsn, part.last) == (7, 500, 1000, 548, True)
    assert contents(part) == [b"a", b"b"]


def test_other_prefixes_and_non_transactional_messages_are_dropped() -> None:
    transactions = Transactions(PREFIX, 1000, 1 << 20)

    out = feed(
        transactions,
        message(b"before any transaction", transactional=False),
        begin(500),
        message(b"other", prefix="outbox-relay:billing"),
        message(b"longer", prefix=PREFIX + "2"),
        message(b"shorter", prefix=PREFIX[:-1]),
        message(b"ours"),
        commit(500, 548),
    )

    assert contents(out[-1]) == [b"ours"]


def test_a_large_transaction_comes_out_in_bounded_parts() -> None:
    transactions = Transactions(PREFIX, 2, 1 << 20)

    out = feed(transactions, begin(500), *(message(b"%d" % i) for i in range(5)), commit(500, 548))
    parts = [part for part in out if part is not None]

    assert [contents(part) for part in parts] == [[b"0", b"1"], [b"2", b"3"], [b"4"]]
    assert [part.end_lsn for part in parts if isinstance(part, TransactionPart)] == [None, None, 548]


def test_parts_are_bounded_by_bytes_too() -> None:
    transactions = Transactions(PREFIX, 1000, 10)

    out = feed(transactions, begin(500), message(b"x" * 6), message(b"y" * 6), message(b"z"), commit(500, 548))

    assert [contents(part) for part in out if part is not None] == [[b"x" * 6, b"y" * 6], [b"z"]]


def test_what_was_read_goes_out_before_the_commit_arrives() -> None:
    transactions = Transactions(PREFIX, 1000, 1 << 20)
    assert transactions.pending_part() is None

    feed(transactions, begin(500), message(b"a"))
    early = transactions.pending_part()
    last = transactions.take_in(commit(500, 548))

    assert isinstance(early, TransactionPart) and not early.last
    assert contents(early) == [b"a"]
    assert isinstance(last, TransactionPart) and last.messages == [] and last.end_lsn == 548
    assert transactions.pending_part() is None


def test_a_transaction_without_messages_of_ours_yields_nothing_but_is_passed() -> None:
    transactions = Transactions(PREFIX, 1000, 1 << 20)
    transactions.start_at(100)

    out = feed(transactions, begin(500), message(b"other", prefix="other"), commit(500, 548))

    assert out == [None, None, None]
    assert transactions.flush_position == 548  # nothing of ours before it


def test_the_flushed_position_waits_for_the_callers_confirmation() -> None:
    transactions = Transactions(PREFIX, 1000, 1 << 20)
    transactions.start_at(100)
    feed(transactions, begin(200), message(b"a"), commit(200, 248))
    feed(transactions, keepalive(300))
    assert transactions.flush_position == 100  # a was handed out, not confirmed

    transactions.confirm(248)
    assert transactions.flush_position == 300  # the keepalive between transactions

    feed(transactions, begin(400), message(b"b"), keepalive(420))
    assert transactions.pending_part() is not None
    assert transactions.flush_position == 300  # a keepalive inside a transaction moves nothing
    assert transactions.received == 420


def test_confirm_ignores_the_past_and_refuses_the_future() -> None:
    transactions = Transactions(PREFIX, 1000, 1 << 20)
    transactions.start_at(100)
    feed(transactions, begin(200), message(b"a"), commit(200, 248))

    transactions.confirm(248)
    transactions.confirm(150)
    assert transactions.flush_position == 248
    with pytest.raises(ValueError, match=r"confirm\(0/F9\) is beyond the last transaction delivered \(0/F8\)"):
        transactions.confirm(249)


def test_the_floor_is_the_slots_position_at_start() -> None:
    transactions = Transactions(PREFIX, 1000, 1 << 20)
    transactions.start_at(1000)
    feed(transactions, keepalive(600))  # the server rereads WAL from the slot's restart position

    assert transactions.flush_position == 1000


def test_keepalives_come_out_to_be_answered() -> None:
    transactions = Transactions(PREFIX, 1000, 1 << 20)

    assert transactions.take_in(keepalive(5, reply=True)) == Keepalive(5, 0, True)
    assert transactions.take_in(keepalive(6)) == Keepalive(6, 0, False)


def test_xlog_data_without_a_message_is_a_protocol_error() -> None:
    with pytest.raises(ProtocolError, match="no pgoutput message"):
        Transactions(PREFIX, 1000, 1 << 20).take_in(xlog(b""))
