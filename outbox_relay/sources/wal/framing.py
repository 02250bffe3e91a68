"""The bytes of one outbox message inside ``pg_logical_emit_message(true, prefix, content)``.

Version 1.0, every integer big-endian and signed::

    offset  width        field
    0       1            version: major in the high 4 bits, minor in the low 4 (0x10 = 1.0)
    1       16           message_id, the UUID's 16 bytes in RFC 4122 order (uuid_send)
    17      2 + n        topic: int16 length, then n bytes of UTF-8
    ..      2 + n        key: int16 length, then n bytes of UTF-8; length -1 means NULL
    ..      4 + n        content_type: int32 length, then n bytes of UTF-8
    ..      4 + n        headers: int32 length, then a JSON object as UTF-8 text
    ..      4 + n        payload: int32 length, then n bytes

Why this shape:

- Big-endian and signed, because that is what PostgreSQL writes: ``uuid_send``,
  ``int2send`` and ``int4send`` produce these fields exactly, so a producer in SQL (or in
  any language) builds a frame without byte swapping, and the wire protocol's own
  convention of length -1 for NULL carries over.
- int16 for topic and key: the validation rules keep them far below 32,767 bytes
  (topic at most 249 bytes, key at most 2,048); two bytes each instead of four.
- int32 for content type, headers and payload: the schema sets no limit on the first two,
  and a bytea holds at most 1 GB, which fits in a signed int32.
- Lengths, not terminators: the payload is binary, and a decoder can step over a field.
- Minor versions only append fields: a decoder reads the fields it knows and ignores what
  follows them, so producers can be upgraded before relays. A new major version means a
  layout an older relay would misread: it is refused with an error that says so.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from typing import Final, NoReturn
from uuid import UUID

from outbox_relay.sources.wal.errors import FrameError
from outbox_relay.sqlfiles import validate_schema_name

MAJOR: Final = 1
MINOR: Final = 0
VERSION_BYTE: Final = MAJOR << 4 | MINOR
PREFIX_BASE: Final = "outbox-relay:"

_INT16_MAX = 2**15 - 1
_INT32_MAX = 2**31 - 1
_NULL = -1

_HEAD = struct.Struct(">B16s")  # version, message_id
_INT16 = struct.Struct(">h")
_INT32 = struct.Struct(">i")


def PREFIX_FOR(schema: str) -> str:
    """The logical message prefix of the outbox in `schema`: a relay reads only its own
    outbox's messages, so two outboxes in one database never read each other's."""
    return PREFIX_BASE + validate_schema_name(schema)


@dataclass(frozen=True, slots=True)
class Frame:
    """One outbox message as framed in the WAL."""

    message_id: UUID
    topic: str
    key: str | None
    content_type: str
    headers: str  # a JSON object as text: kept as framed, parsed on demand (header_map)
    payload: bytes

    def header_map(self) -> dict[str, str]:
        """The headers as a dict; FrameError if they are not a JSON object of strings."""
        try:
            parsed = json.loads(self.headers)
        except ValueError as exc:
            raise FrameError(f"message {self.message_id}: headers are not JSON ({exc})") from exc
        if not isinstance(parsed, dict) or not all(isinstance(v, str) for v in parsed.values()):
            raise FrameError(f"message {self.message_id}: headers are not a JSON object of strings")
        return parsed


def encode(message_id: UUID, topic: str, key: str | None, content_type: str, headers: str, payload: bytes) -> bytes:
    """The version 1.0 frame of one message.

    Checks only what the framing itself needs (each field fits its length); the message
    rules (topic, key, headers) are validation.py's. ValueError names the field that
    does not fit or is not encodable as UTF-8.
    """
    parts = [_HEAD.pack(VERSION_BYTE, message_id.bytes)]
    _add(parts, "topic", _utf8("topic", topic), _INT16, _INT16_MAX)
    if key is None:
        parts.append(_INT16.pack(_NULL))
    else:
        _add(parts, "key", _utf8("key", key), _INT16, _INT16_MAX)
    _add(parts, "content_type", _utf8("content_type", content_type), _INT32, _INT32_MAX)
    _add(parts, "headers", _utf8("headers", headers), _INT32, _INT32_MAX)
    _add(parts, "payload", bytes(payload), _INT32, _INT32_MAX)
    return b"".join(parts)


def _utf8(field: str, text: str) -> bytes:
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"{field} is not valid Unicode text (a lone surrogate?): {exc}") from exc


def _add(parts: list[bytes], field: str, value: bytes, width: struct.Struct, limit: int) -> None:
    if len(value) > limit:
        raise ValueError(f"{field} of {len(value)} bytes does not fit the frame (at most {limit})")
    parts.append(width.pack(len(value)))
    parts.append(value)


def decode(data: bytes) -> Frame:
    """The frame in `data`; FrameError if it is truncated, of another major version, or
    malformed. Bytes after the last field this version knows are ignored (a later minor
    version's fields)."""
    if not data or data[0] >> 4 != MAJOR:
        _refuse_version(data)
    try:
        return _decode_unchecked(data)
    except (struct.error, ValueError):  # UnicodeDecodeError is a ValueError
        return _decode_checked(data)  # raises the FrameError that says what is wrong


def _refuse_version(data: bytes) -> NoReturn:
    if not data:
        raise FrameError("empty frame: not an outbox message")
    major, minor = data[0] >> 4, data[0] & 0xF
    if major > MAJOR:
        raise FrameError(
            f"frame version {major}.{minor} is newer than this relay reads ({MAJOR}.x): upgrade the relay "
            "before producers write it"
        )
    raise FrameError(f"not an outbox frame: version byte {data[0]:#04x} names no version this relay knows")


_UNPACK16 = _INT16.unpack_from
_UNPACK32 = _INT32.unpack_from


def _decode_unchecked(data: bytes) -> Frame:
    # The hot path, a few times faster than _decode_checked: one pass over the lengths,
    # one check at the end. Anything odd raises, and _decode_checked says what it is.
    (topic,) = _UNPACK16(data, 17)
    topic_at = 19
    (key,) = _UNPACK16(data, topic_at + topic)
    key_at = topic_at + topic + 2
    (content_type,) = _UNPACK32(data, key_at + max(key, 0))
    content_type_at = key_at + max(key, 0) + 4
    (headers,) = _UNPACK32(data, content_type_at + content_type)
    headers_at = content_type_at + content_type + 4
    (payload,) = _UNPACK32(data, headers_at + headers)
    payload_at = headers_at + headers + 4
    end = payload_at + payload
    if end > len(data) or min(topic, content_type, headers, payload) < 0 or key < _NULL:
        raise ValueError("lengths do not add up")
    return Frame(
        UUID(bytes=data[1:17]),
        data[topic_at : topic_at + topic].decode("utf-8"),
        None if key == _NULL else data[key_at : key_at + key].decode("utf-8"),
        data[content_type_at : content_type_at + content_type].decode("utf-8"),
        data[headers_at : headers_at + headers].decode("utf-8"),
        data[payload_at:end],
    )


def _decode_checked(data: bytes) -> Frame:
    _need(data, 0, _HEAD.size, "message_id")
    reader = _Reader(data, _HEAD.size)
    return Frame(
        message_id=UUID(bytes=data[1 : _HEAD.size]),
        topic=reader.text("topic", _INT16),
        key=reader.optional_text("key", _INT16),
        content_type=reader.text("content_type", _INT32),
        headers=reader.text("headers", _INT32),
        payload=reader.binary("payload", _INT32),
    )


def _need(data: bytes, offset: int, size: int, field: str) -> None:
    if offset + size > len(data):
        raise FrameError(
            f"truncated frame: {field} needs {size} bytes at offset {offset}, {max(len(data) - offset, 0)} left"
        )


class _Reader:
    """Reads length-prefixed fields one after the other, checking every length."""

    __slots__ = ("data", "offset")

    def __init__(self, data: bytes, offset: int):
        self.data = data
        self.offset = offset

    def binary(self, name: str, width: struct.Struct) -> bytes:
        raw = self._field(name, width)
        if raw is None:
            raise FrameError(f"malformed frame: {name} has length {_NULL}")
        return raw

    def text(self, name: str, width: struct.Struct) -> str:
        return _text(name, self.binary(name, width))

    def optional_text(self, name: str, width: struct.Struct) -> str | None:
        raw = self._field(name, width)
        return None if raw is None else _text(name, raw)

    def _field(self, name: str, width: struct.Struct) -> bytes | None:
        """The field's bytes, or None for length -1 (NULL)."""
        data, offset = self.data, self.offset
        _need(data, offset, width.size, f"{name}'s length")
        (size,) = width.unpack_from(data, offset)
        offset += width.size
        if size == _NULL:
            self.offset = offset
            return None
        if size < 0:
            raise FrameError(f"malformed frame: {name} has length {size}")
        _need(data, offset, size, name)
        self.offset = offset + size
        return data[offset : offset + size]


def _text(name: str, raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise FrameError(f"malformed frame: {name} is not UTF-8 ({exc.reason} at byte {exc.start})") from exc
