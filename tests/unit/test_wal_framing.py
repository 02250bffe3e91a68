"""The WAL source's message framing (outbox_relay/sources/wal/framing.py): the bytes,
round trips, versions and broken input. Against SQL: tests/integration/test_wal_framing_sql.py."""

from __future__ import annotations

import json
import struct
import uuid

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from outbox_relay.errors import ConfigError
from outbox_relay.sources.wal import framing
from outbox_relay.sources.wal.errors import FrameError

MESSAGE_ID = uuid.UUID("0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0")


def test_the_bytes_are_the_documented_layout() -> None:
    frame = framing.encode(MESSAGE_ID, "orders", "k", "text/plain", '{"a":"b"}', b"\x00\xff")

    assert frame == (
        b"\x10"  # version 1.0
        + MESSAGE_ID.bytes
        + b"\x00\x06orders"
        + b"\x00\x01k"
        + b"\x00\x00\x00\x0atext/plain"
        + b'\x00\x00\x00\x09{"a":"b"}'
        + b"\x00\x00\x00\x02\x00\xff"
    )


def test_a_null_key_has_length_minus_one_and_an_empty_one_length_zero() -> None:
    null_key = framing.encode(MESSAGE_ID, "t", None, "c", "{}", b"")
    empty_key = framing.encode(MESSAGE_ID, "t", "", "c", "{}", b"")

    assert null_key[20:22] == b"\xff\xff"
    assert empty_key[20:22] == b"\x00\x00"
    assert framing.decode(null_key).key is None
    assert framing.decode(empty_key).key == ""


texts = st.text(max_size=300)  # hypothesis leaves out lone surrogates: encodable as UTF-8


@settings(max_examples=500, deadline=None)
@given(
    message_id=st.uuids(),
    topic=texts,
    key=st.none() | texts,
    content_type=texts,
    headers=st.dictionaries(texts, texts, max_size=5),
    payload=st.binary(max_size=2000),
)
def test_decode_returns_what_encode_was_given(
    message_id: uuid.UUID, topic: str, key: str | None, content_type: str, headers: dict[str, str], payload: bytes
) -> None:
    header_text = json.dumps(headers, ensure_ascii=False)

    frame = framing.decode(framing.encode(message_id, topic, key, content_type, header_text, payload))

    assert frame == framing.Frame(message_id, topic, key, content_type, header_text, payload)
    assert frame.header_map() == headers


@settings(max_examples=200, deadline=None)
@given(payload=st.binary(max_size=200), key=st.none() | texts)
def test_every_truncation_is_refused_as_truncated(payload: bytes, key: str | None) -> None:
    whole = framing.encode(MESSAGE_ID, "orders.created", key, "application/json", "{}", payload)

    for size in range(1, len(whole)):
        with pytest.raises(FrameError, match="truncated frame"):
            framing.decode(whole[:size])


def test_fields_a_later_minor_version_appends_are_ignored() -> None:
    frame = bytearray(framing.encode(MESSAGE_ID, "t", "k", "c", "{}", b"p"))
    frame[0] = 0x13  # version 1.3, with a field 1.0 does not know
    later = bytes(frame) + b"\x00\x00\x00\x05extra"

    assert framing.decode(later) == framing.Frame(MESSAGE_ID, "t", "k", "c", "{}", b"p")


def test_a_higher_major_version_is_refused_saying_so() -> None:
    frame = bytearray(framing.encode(MESSAGE_ID, "t", "k", "c", "{}", b"p"))
    frame[0] = 0x20

    with pytest.raises(FrameError, match=r"frame version 2\.0 is newer than this relay reads \(1\.x\)"):
        framing.decode(bytes(frame))


@pytest.mark.parametrize("data", [b"", b"\x00", b"\x0f" + bytes(40)])
def test_what_is_not_a_frame_is_refused(data: bytes) -> None:
    with pytest.raises(FrameError, match="not an outbox"):
        framing.decode(data)


def test_a_negative_length_is_refused() -> None:
    frame = bytearray(framing.encode(MESSAGE_ID, "t", "k", "c", "{}", b"p"))
    frame[-5:-1] = struct.pack(">i", -3)  # the payload's length

    with pytest.raises(FrameError, match="payload has length -3"):
        framing.decode(bytes(frame))


def test_text_that_is_not_utf8_is_refused() -> None:
    frame = bytearray(framing.encode(MESSAGE_ID, "ab", "k", "c", "{}", b"p"))
    frame[19:21] = b"\xc3\x28"  # the topic's bytes

    with pytest.raises(FrameError, match="topic is not UTF-8"):
        framing.decode(bytes(frame))


def test_what_does_not_fit_its_length_is_refused_at_encode() -> None:
    with pytest.raises(ValueError, match="topic of 32768 bytes does not fit the frame"):
        framing.encode(MESSAGE_ID, "t" * 32768, None, "c", "{}", b"")
    framing.encode(MESSAGE_ID, "t" * 32767, "k" * 32767, "c", "{}", b"")  # the largest that fit
    with pytest.raises(ValueError, match="key is not valid Unicode"):
        framing.encode(MESSAGE_ID, "t", "\udc80", "c", "{}", b"")


def test_headers_that_are_not_an_object_of_strings_are_refused_when_read() -> None:
    for text in ("[1]", '{"a": 1}', "not json"):
        frame = framing.decode(framing.encode(MESSAGE_ID, "t", None, "c", text, b""))
        with pytest.raises(FrameError, match="headers are not"):
            frame.header_map()


def test_the_prefix_names_the_schema() -> None:
    assert framing.PREFIX_FOR("outbox") == "outbox-relay:outbox"
    assert framing.PREFIX_FOR("billing_2") == "outbox-relay:billing_2"
    with pytest.raises(ConfigError):
        framing.PREFIX_FOR("Not A Schema")
