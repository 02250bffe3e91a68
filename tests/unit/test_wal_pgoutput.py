"""The replication stream decoder (outbox_relay/sources/wal/pgoutput.py) on byte fixtures.

The fixtures are CopyData messages a PostgreSQL 15.18 walsender sent (pgoutput,
proto_version 1, messages true, a publication of one table with an enum column): a
transaction with one message of ours, a non-transactional message, and a replicated
transaction (an origin set) that inserted a row."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from outbox_relay.sources.wal import pgoutput
from outbox_relay.sources.wal.errors import ProtocolError
from outbox_relay.sources.wal.pgoutput import Begin, Commit, Keepalive, Message, XLogData

HEADER = "0000000001525c500000000001525c50000304eef4ed5fc9"  # an XLogData header's 24 bytes

KEEPALIVE = "6b00000000015259a0000304eef4ed5f5400"
BEGIN = "770000000001525c500000000001525c50000304eef4ed5fc2420000000001525c50000304eef4ed36f1000002d8"
MESSAGE = "77" + HEADER + "4d010000000001525c506f7574626f782d72656c61793a6f7574626f78000000000210ab"
COMMIT = "770000000001525c800000000001525c80000304eef4ed5fcf43000000000001525c500000000001525c80000304eef4ed36f1"
NON_TRANSACTIONAL = "77" + HEADER + "4d000000000001525cc06f7468657200000000026869"
IGNORED = {
    "origin": "77" + HEADER + "4f00000000000000ab656c7365776865726500",
    "type": "77" + HEADER + "59000040017075626c6963006d6f6f6400",
    "relation": "77" + HEADER + "52000040037075626c69630074006400020169640000000017ffffffff006d0000004001ffffffff",
    "insert": "77" + HEADER + "49000040034e000274000000013174000000026f6b",
    "update": "77" + HEADER + "55000040034e0000",  # the kinds matter, not their bodies
    "delete": "77" + HEADER + "44000040034b0000",
    "truncate": "77" + HEADER + "5400000001000000004003",
}
COMMIT_TIME = 0x000304EEF4ED36F1


def pgoutput_message(fixture: str) -> Begin | Commit | Message | None:
    copied = pgoutput.decode_copy_data(bytes.fromhex(fixture))
    assert isinstance(copied, XLogData)
    return pgoutput.decode(copied.payload)


def test_a_keepalive() -> None:
    assert pgoutput.decode_copy_data(bytes.fromhex(KEEPALIVE)) == Keepalive(0x15259A0, 0x304EEF4ED5F54, False)
    asking = bytes.fromhex(KEEPALIVE[:-2] + "01")
    assert pgoutput.decode_copy_data(memoryview(asking)) == Keepalive(0x15259A0, 0x304EEF4ED5F54, True)


def test_xlog_data_and_its_header() -> None:
    copied = pgoutput.decode_copy_data(memoryview(bytes.fromhex(BEGIN)))

    assert copied == XLogData(0x1525C50, 0x1525C50, 0x304EEF4ED5FC2, bytes.fromhex(BEGIN)[25:])
    assert pgoutput.xlog_payload(memoryview(bytes.fromhex(BEGIN))) == copied.payload
    assert pgoutput.xlog_payload(bytes.fromhex(KEEPALIVE)) is None


def test_a_transaction_with_a_message() -> None:
    assert pgoutput_message(BEGIN) == Begin(final_lsn=0x1525C50, commit_time=COMMIT_TIME, xid=728)
    assert pgoutput_message(MESSAGE) == Message(True, 0x1525C50, "outbox-relay:outbox", b"\x10\xab")
    assert pgoutput_message(COMMIT) == Commit(flags=0, commit_lsn=0x1525C50, end_lsn=0x1525C80, commit_time=COMMIT_TIME)


def test_a_non_transactional_message_says_so() -> None:
    assert pgoutput_message(NON_TRANSACTIONAL) == Message(False, 0x1525CC0, "other", b"hi")


@pytest.mark.parametrize("kind", sorted(IGNORED))
def test_the_kinds_the_relay_does_not_need_decode_to_none(kind: str) -> None:
    assert pgoutput_message(IGNORED[kind]) is None


@pytest.mark.parametrize("fixture", [BEGIN, MESSAGE, COMMIT])
def test_a_truncated_message_is_a_protocol_error(fixture: str) -> None:
    data = bytes.fromhex(fixture)
    for size in range(26, len(data)):
        with pytest.raises(ProtocolError, match="malformed pgoutput"):
            pgoutput.decode(data[25:size])


def test_a_message_whose_content_is_longer_than_its_bytes_is_a_protocol_error() -> None:
    with pytest.raises(ProtocolError, match="content of 2 bytes, 1 present"):
        pgoutput.decode(bytes.fromhex(MESSAGE)[25:-1])


@pytest.mark.parametrize(
    ("data", "problem"),
    [
        (b"", "empty CopyData"),
        (b"x123", "unexpected CopyData message"),
        (bytes.fromhex(KEEPALIVE)[:-1], "truncated 'k' message"),
        (bytes.fromhex(BEGIN)[:20], "truncated 'w' message"),
    ],
)
def test_what_the_walsender_does_not_send_is_a_protocol_error(data: bytes, problem: str) -> None:
    with pytest.raises(ProtocolError, match=problem):
        pgoutput.decode_copy_data(data)


def test_the_standby_status_update() -> None:
    update = pgoutput.standby_status_update(0x30, 0x20, 0x10, now=0x0102, reply_requested=True)

    assert update == (
        b"r"
        + (0x30).to_bytes(8, "big")
        + (0x20).to_bytes(8, "big")
        + (0x10).to_bytes(8, "big")
        + (0x0102).to_bytes(8, "big")
        + b"\x01"
    )
    assert pgoutput.standby_status_update(1, 1, 1, now=0)[-1:] == b"\x00"


def test_times_count_from_2000() -> None:
    assert pgoutput.to_datetime(COMMIT_TIME) == datetime(2026, 12, 6, 5, 14, 48, 46321, tzinfo=UTC)
    assert pgoutput.to_datetime(0) == datetime(2000, 1, 1, tzinfo=UTC)
    now = datetime.now(UTC)
    assert abs((pgoutput.to_datetime(pgoutput.pg_now()) - now).total_seconds()) < 5


@pytest.mark.parametrize(
    ("text", "value"),
    [("0/0", 0), ("16/B374D848", 0x16_B374D848), ("0/1525C80", 0x1525C80), ("FFFFFFFF/FFFFFFFF", 2**64 - 1)],
)
def test_lsns_as_postgresql_writes_them(text: str, value: int) -> None:
    assert pgoutput.parse_lsn(text) == value
    assert pgoutput.format_lsn(value) == text
    assert pgoutput.parse_lsn(text.lower()) == value


@pytest.mark.parametrize("text", ["", "16", "16/", "/1", "16/B374D848/1", "G/0", "123456789/0", " 0/0"])
def test_what_is_not_an_lsn_is_refused(text: str) -> None:
    with pytest.raises(ValueError, match="invalid LSN"):
        pgoutput.parse_lsn(text)


@pytest.mark.parametrize("value", [-1, 2**64])
def test_what_is_not_a_64_bit_position_cannot_be_formatted(value: int) -> None:
    with pytest.raises(ValueError, match="invalid LSN"):
        pgoutput.format_lsn(value)
