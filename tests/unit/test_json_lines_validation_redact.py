"""json_lines (the JSON-lines form of a message), validation, producer.encode_payload, redact."""

from __future__ import annotations

import base64
import functools
import json
import math
import uuid
from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from outbox_relay.json_lines import as_dict, decode_payload, json_line
from outbox_relay.producer import BINARY, JSON, TEXT, encode_payload
from outbox_relay.redact import MASK, REDACTED, UNPARSEABLE, payload_text, redact_dsn, redact_text, redacted_headers
from outbox_relay.validation import check_headers, check_key, check_topic
from tests.support.factories import outgoing

CREATED = datetime(2024, 5, 6, 7, 8, 9, 123456, tzinfo=UTC)


# Every JSON-lines object of this module is of message 7 (payload and content type aside), so that
# the expected records can spell it out.
out = functools.partial(
    outgoing,
    7,
    message_id=uuid.UUID("12345678-1234-5678-1234-567812345678"),
    key="k1",
    headers={"trace": "t-1"},
    created_at=CREATED,
)


def strict_json(line: str) -> Any:
    def reject(constant: str) -> None:
        raise ValueError(f"not JSON: {constant}")

    return json.loads(line, parse_constant=reject)


# --- records ---------------------------------------------------------------------------


def test_json_payload_inline_with_all_fields() -> None:
    data = as_dict(out(b'{"order": 1, "items": [1, 2]}', "application/json"))
    assert data == {
        "message_id": "12345678-1234-5678-1234-567812345678",
        "topic": "orders.created",
        "key": "k1",
        "headers": {"trace": "t-1"},
        "content_type": "application/json",
        "destination": "dest",
        "created_at": "2024-05-06T07:08:09.123456+00:00",
        "payload": {"order": 1, "items": [1, 2]},
    }
    assert "payload_encoding" not in data


def test_json_with_parameters_is_json() -> None:
    data = as_dict(out(b"[1, 2]", "application/json; charset=utf-8"))
    assert data["payload"] == [1, 2]
    assert "payload_encoding" not in data


def test_null_key() -> None:
    assert as_dict(out(b"1", "application/json", key=None))["key"] is None


def test_text_payload() -> None:
    data = as_dict(out("héllo\nwörld".encode(), "text/plain; charset=utf-8"))
    assert data["payload"] == "héllo\nwörld"
    assert data["payload_encoding"] == "text"


def test_text_that_is_not_utf8_falls_back_to_base64() -> None:
    raw = b"\xff\xfe caf\xe9"
    data = as_dict(out(raw, "text/plain"))
    assert data["payload_encoding"] == "base64"
    assert base64.b64decode(data["payload"]) == raw


def test_binary_payload_base64_with_marker() -> None:
    raw = bytes(range(256))
    data = as_dict(out(raw, "application/octet-stream"))
    assert data["payload_encoding"] == "base64"
    assert data["payload"] == base64.b64encode(raw).decode("ascii")


@pytest.mark.parametrize("raw", [b"{not json", b"", b"\xff\xfe", b"{'a': 1}", b"[1,]"])
def test_invalid_json_labelled_json_falls_back_to_base64(raw: bytes) -> None:
    data = as_dict(out(raw, "application/json"))
    assert data["payload_encoding"] == "base64"
    assert base64.b64decode(data["payload"]) == raw
    assert decode_payload(data) == raw


@pytest.mark.parametrize(
    ("raw", "content_type", "expected"),
    [
        (b'{"a": [1, "x", null, true]}', "application/json", {"a": [1, "x", None, True]}),
        (b"null", "application/json", None),
        (b'"just a string"', "application/json", "just a string"),
        (b"line1\nline2", "text/csv", "line1\nline2"),
        (b"\x00\x01binary", "application/octet-stream", b"\x00\x01binary"),
        (b"\x00\x01binary", "image/png", b"\x00\x01binary"),
        (b"not json", "application/json", b"not json"),
    ],
)
def test_json_line_round_trips_through_decode_payload(raw: bytes, content_type: str, expected: object) -> None:
    line = json_line(out(raw, content_type))
    assert line.endswith("\n")
    assert line.count("\n") == 1  # exactly one line, whatever the payload holds
    data = strict_json(line)
    assert decode_payload(data) == expected


def test_json_line_is_compact_and_keeps_non_ascii() -> None:
    line = json_line(out('{"name": "Zoë"}'.encode(), "application/json"))
    assert "Zoë" in line
    assert ", " not in line and '": ' not in line


@pytest.mark.parametrize("content_type", ["application/json", "text/plain"])
def test_json_line_writes_del_and_c1_controls_escaped(content_type: str) -> None:
    # The stdout adapter's lines reach a terminal: json.dumps escapes C0 only, and
    # \x9b (CSI) starts a sequence a terminal obeys. Escaped, the payload decodes the same.
    text = "a\x9b31m\x7fb\x85"
    raw = json.dumps(text).encode() if content_type == "application/json" else text.encode()
    line = json_line(out(raw, content_type))
    assert not any(0x7F <= ord(c) <= 0x9F for c in line), repr(line)
    assert decode_payload(strict_json(line)) in (text, text.encode())


@given(st.binary(max_size=200), st.sampled_from(["application/json", "text/plain", "x/y"]))
def test_no_payload_is_ever_lost(raw: bytes, content_type: str) -> None:
    data = strict_json(json_line(out(raw, content_type)))
    decoded = decode_payload(data)
    if data.get("payload_encoding") == "base64":
        assert decoded == raw
    elif data.get("payload_encoding") == "text":
        assert decoded.encode("utf-8") == raw
    else:
        assert json.loads(raw) == decoded


@given(
    st.recursive(
        st.one_of(
            st.none(),
            st.booleans(),
            st.integers(),
            st.text(max_size=10),
            st.floats(allow_nan=False, allow_infinity=False),
        ),
        lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=5), inner, max_size=3)),
        max_leaves=10,
    )
)
def test_producer_json_round_trips_through_record(value: Any) -> None:
    body, content_type = encode_payload(value)
    assert decode_payload(strict_json(json_line(out(body, content_type)))) == value


@pytest.mark.parametrize("raw", [b"NaN", b'{"x": Infinity}', b'"\\ud800"'])
def test_json_payload_that_strict_json_rejects_is_still_carried(raw: bytes) -> None:
    line = json_line(out(raw, "application/json"))
    line.encode("utf-8")
    data = strict_json(line)
    assert decode_payload(data) == raw


# --- validation ---------------------------------------------------------------------------


@pytest.mark.parametrize("topic", ["a", "orders.created", "A-Z_0.9:x/y", "x" * 249, "orders/v1:created", "-", "."])
def test_check_topic_accepts(topic: str) -> None:
    assert check_topic(topic) == topic


@pytest.mark.parametrize(
    "topic",
    ["", "x" * 250, "orders created", "orders*", "ordérs", "a\tb", "a,b", "a#b", None, 5, b"ab", "\norders"],
)
def test_check_topic_rejects(topic: object) -> None:
    with pytest.raises(ValueError, match=r"^invalid topic .*: use 1 to 249 letters"):
        check_topic(topic)


def test_check_topic_rejects_trailing_newline() -> None:
    with pytest.raises(ValueError):
        check_topic("orders\n")


# The limit is in UTF-8 bytes (2,048): characters of 1, 2, 3 and 4 bytes.
@pytest.mark.parametrize("key", [None, "k", "x" * 2048, "user:42", "ключ", " ", "ж" * 1024, "界" * 682, "😀" * 512])
def test_check_key_accepts(key: str | None) -> None:
    assert check_key(key) == key


@pytest.mark.parametrize("key", ["", "x" * 2049, "ж" * 1025, "界" * 683, "😀" * 512 + "x", 5, b"k", ["k"]])
def test_check_key_rejects(key: object) -> None:
    with pytest.raises(ValueError, match=r"^invalid key .*1 to 2048 bytes of UTF-8"):
        check_key(key)


@pytest.mark.parametrize(
    "headers",
    [{}, {"trace-id": "abc"}, {"a": "", "b": "x"}, {"x" * 255: "v"}, {"message-id-x": "ok"}, {"x-message-id": "ok"}],
)
def test_check_headers_accepts(headers: dict[str, str]) -> None:
    assert check_headers(headers) == headers


def test_check_headers_none_is_empty() -> None:
    assert check_headers(None) == {}


@pytest.mark.parametrize(
    ("headers", "fragment"),
    [
        ([("a", "b")], "expected a mapping"),
        ("a=b", "expected a mapping"),
        ({"": "v"}, "invalid header name ''"),
        ({"x" * 256: "v"}, "1 to 255 characters"),
        ({1: "v"}, "invalid header name 1"),
        ({"a": 1}, "value must be a str, got int"),
        ({"a": None}, "value must be a str, got NoneType"),
        ({"a": b"x"}, "value must be a str, got bytes"),
        ({"message-id": "x"}, "reserved"),
        ({"Message-ID": "x"}, "reserved"),
        ({"MESSAGE-ID": "x"}, "reserved"),
    ],
)
def test_check_headers_rejects(headers: object, fragment: str) -> None:
    with pytest.raises(ValueError) as info:
        check_headers(headers)
    assert fragment in str(info.value)


# --- producer.encode_payload ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("payload", "body", "content_type"),
    [
        ({"a": 1, "b": [True, None]}, b'{"a":1,"b":[true,null]}', JSON),
        ([1, "two"], b'[1,"two"]', JSON),
        ({"name": "Zoë"}, '{"name":"Zoë"}'.encode(), JSON),
        (42, b"42", JSON),
        (None, b"null", JSON),
        ("héllo", "héllo".encode(), TEXT),
        ("", b"", TEXT),
        (b"\x00\xff", b"\x00\xff", BINARY),
        (bytearray(b"ab"), b"ab", BINARY),
        (memoryview(b"cd"), b"cd", BINARY),
    ],
)
def test_encode_payload(payload: object, body: bytes, content_type: str) -> None:
    assert encode_payload(payload) == (body, content_type)


def test_content_types() -> None:
    assert JSON == "application/json"
    assert TEXT.startswith("text/plain")
    assert BINARY == "application/octet-stream"


@pytest.mark.parametrize(
    "payload",
    [object(), {"a": object()}, {1, 2}, {"when": datetime.now(UTC)}, math.nan, {"x": math.nan}, [math.inf], -math.inf],
)
def test_encode_payload_rejects_non_json(payload: object) -> None:
    with pytest.raises(ValueError, match=r"^invalid payload: not JSON-serialisable"):
        encode_payload(payload)


# --- redact ------------------------------------------------------------------------------------

SECRET = "s3cr3t-Pa55"


@pytest.mark.parametrize(
    "dsn",
    [
        f"postgresql://relay:{SECRET}@db.internal:5432/app?sslmode=require",
        f"postgres://relay:{SECRET}@db.internal/app",
        f"postgresql://relay:{SECRET}@h1:5432,h2:5433/app",
        f"postgresql://:{SECRET}@db/app",
        f"host=db user=relay password={SECRET} dbname=app",
        f"host=db password='{SECRET}' dbname=app",
        f"password = {SECRET} host=db",
        f"host=db password='with space {SECRET}' dbname=app",
        f"postgresql://relay:{SECRET}@db/app?bogus_option=1",  # unparseable: not shown
        f"host=db password={SECRET} 'unterminated",  # unparseable: not shown
        f"PASSWORD={SECRET} host=db '",
    ],
)
def test_redact_dsn_never_contains_password(dsn: str) -> None:
    redacted = redact_dsn(dsn)
    assert SECRET not in redacted
    # Parseable: shown with the password masked. Unparseable: not shown at all.
    assert MASK in redacted or redacted == UNPARSEABLE


def test_redact_dsn_keeps_the_rest() -> None:
    redacted = redact_dsn(f"postgresql://relay:{SECRET}@db.internal:5432/app")
    assert "db.internal" in redacted
    assert "relay" in redacted
    assert "app" in redacted
    assert "5432" in redacted


def test_redact_dsn_percent_encoded_password() -> None:
    redacted = redact_dsn("postgresql://relay:p%40ss%2Fword@db/app")
    assert "p%40ss" not in redacted
    assert "p@ss" not in redacted
    assert "ss/word" not in redacted


def test_redact_dsn_without_password_is_unchanged_in_meaning() -> None:
    redacted = redact_dsn("host=db user=relay dbname=app")
    assert MASK not in redacted
    assert "host=db" in redacted and "user=relay" in redacted and "dbname=app" in redacted


@pytest.mark.parametrize(
    "dsn",
    [
        "host=db password='my s3cr3t-Pa55' 'unterminated",
        "postgresql://relay:pa/s3cr3t-Pa55@db/app?bogus_option=1",
    ],
)
def test_redact_dsn_unparseable_with_awkward_password(dsn: str) -> None:
    assert "s3cr3t-Pa55" not in redact_dsn(dsn)


def test_redact_text_masks_given_secrets_and_uri_passwords() -> None:
    text = (
        f"cannot connect to postgresql://relay:{SECRET}@db/app (password {SECRET}); "
        "also postgresql://other:hunter2@db2/x"
    )
    redacted = redact_text(text, [SECRET])
    assert SECRET not in redacted
    assert "hunter2" not in redacted
    assert "postgresql://relay:***@db/app" in redacted
    assert "postgresql://other:***@db2/x" in redacted


def test_redact_text_ignores_empty_secret() -> None:
    assert redact_text("nothing here", ["", "zzz"]) == "nothing here"


# --- dead-letters --topic: a glob means what it means in routes ---------------------------


@given(pattern=st.text(alphabet="ab.:/[]!*?", max_size=8), topic=st.text(alphabet="ab.:/", min_size=1, max_size=8))
def test_topic_glob_as_regex_matches_what_a_route_glob_matches(pattern: str, topic: str) -> None:
    import fnmatch
    import re

    from outbox_relay.operations.dead_letters import glob_to_regex

    # PostgreSQL's regex and Python's agree on what glob_to_regex emits (., .*, [..], [^..], \x).
    assert (re.search(glob_to_regex(pattern), topic) is not None) == fnmatch.fnmatchcase(topic, pattern)


def test_topic_glob_with_a_character_set() -> None:
    from outbox_relay.operations.dead_letters import glob_to_regex

    assert glob_to_regex("a.[bc]*") == "^a\\.[bc].*$"
    assert glob_to_regex("a.[!bc]?") == "^a\\.[^bc].$"
    assert glob_to_regex("a[") == "^a\\[$"


@pytest.mark.parametrize(
    ("payload", "shown"),
    [
        # A title set, an OSC 8 link, colours, a carriage return that overwrites the line,
        # C1's CSI and DEL: written out, never sent to the terminal as they are.
        (b"\x1b]0;pwned\x07 hi", "\\x1b]0;pwned\\x07 hi"),
        (b"\x1b]8;;http://evil/\x1b\\link", "\\x1b]8;;http://evil/\\x1b\\link"),
        (b"a\x1b[31mred\rb\x7f", "a\\x1b[31mred\\x0db\\x7f"),
        ("x\x9b2J".encode(), "x\\x9b2J"),
        # Lines and tabs as they are; JSON indented, its escapes JSON's own.
        (b"line 1\n\tline 2", "line 1\n\tline 2"),
        (b'{"a": "\\u001b[2J"}', '{\n  "a": "\\u001b[2J"\n}'),
    ],
)
def test_payload_text_writes_control_characters_out(payload: bytes, shown: str) -> None:
    assert payload_text(payload) == shown
    assert not any((ord(c) < 32 and c not in "\n\t") or 0x7F <= ord(c) <= 0x9F for c in payload_text(payload))


def test_redacted_headers_keep_names_and_trace_context_only() -> None:
    headers = {"traceparent": "00-abc-def-01", "TraceState": "k=v", "x-api-key": "k-123", "email": "a@b"}
    assert redacted_headers(headers) == {
        "traceparent": "00-abc-def-01",
        "TraceState": "k=v",
        "x-api-key": REDACTED,
        "email": REDACTED,
    }


@pytest.mark.parametrize(
    "dsn",
    [
        "postgresql://app:Pa/ssw0rd@localhost/shop",  # libpq: host=app port=Pa dbname=ssw0rd@localhost/shop
        "postgresql://app:Pa@ssw0rd@localhost/shop",  # libpq: password=Pa host=ssw0rd@localhost
    ],
)
def test_a_uri_whose_password_libpq_reads_otherwise_is_not_shown_nor_its_answer(dsn: str) -> None:
    # A '/' or '@' left unencoded in a URI's password ends its user information early:
    # the rest of the password became the host, port or database, shown as such (and
    # quoted by libpq's own answer: "failed to resolve host 'ssw0rd@localhost'").
    from outbox_relay.redact import AMBIGUOUS, shown_dsn

    shown, hidden = shown_dsn(dsn)
    assert shown == AMBIGUOUS and "ssw0rd" not in shown
    assert hidden is not None and "%2F" in hidden and "ssw0rd" not in hidden


def test_an_encoded_password_is_told_apart_and_masked() -> None:
    from outbox_relay.redact import shown_dsn

    assert shown_dsn("postgresql://app:p%40x%2Fy@localhost/shop") == (
        "user=app password=*** dbname=shop host=localhost",
        None,
    )
    assert shown_dsn("postgresql://app@localhost/shop") == ("user=app dbname=shop host=localhost", None)


def test_the_clis_connect_error_shows_neither_part_of_an_ambiguous_password() -> None:
    from outbox_relay.connections import connect_sync
    from outbox_relay.errors import DatabaseError

    with pytest.raises(DatabaseError) as raised:
        connect_sync("postgresql://app:Pa@ssw0rd@127.0.0.1:1/shop", application_name="test")
    assert "ssw0rd" not in str(raised.value) and "percent-encode" in str(raised.value)


def test_the_relays_own_replay_and_backfill_numbers_are_shown_and_an_applications_headers_are_not() -> None:
    # What ties a dead copy to its replay or backfill is the relay's own number, no
    # secret; a claim check's URL may carry a signature and stays hidden.
    shown = redacted_headers(
        {"Outbox-Replay-Id": "7", "outbox-backfill-id": "3", "outbox-claim-check-url": "s3://b/k?X-Amz-Signature=s"}
    )
    assert shown == {"Outbox-Replay-Id": "7", "outbox-backfill-id": "3", "outbox-claim-check-url": REDACTED}
