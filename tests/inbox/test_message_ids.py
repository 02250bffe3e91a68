"""Reading and validating message ids, without a database or a broker."""

from __future__ import annotations

import uuid
from dataclasses import dataclass

import pika
import pytest
from aiokafka.structs import ConsumerRecord
from psycopg import sql

from outbox_relay import sqlfiles
from outbox_relay.errors import ConfigError, OutboxRelayError
from outbox_relay.inbox import MessageIdError, message_id_of, parse_message_id

MID = uuid.UUID("6b0c3b0e-8a0b-4a6b-9f2e-1a1a1a1a1a1a")


def record(headers: list[tuple[str, bytes | None]]) -> ConsumerRecord[bytes, bytes]:
    return ConsumerRecord(
        topic="credits",
        partition=2,
        offset=15,
        timestamp=0,
        timestamp_type=0,
        key=b"k",
        value=b"{}",
        checksum=None,
        serialized_key_size=1,
        serialized_value_size=2,
        headers=headers,
    )


def test_kafka_record_header_is_read() -> None:
    assert message_id_of(record([("content-type", b"x"), ("message-id", str(MID).encode())])) == MID


def test_amqp_property_is_read() -> None:
    assert message_id_of(pika.BasicProperties(message_id=str(MID), content_type="application/json")) == MID


def test_confluent_kafka_message_headers_method_is_read() -> None:
    @dataclass
    class Message:  # confluent-kafka's Message reads everything through methods
        _headers: list[tuple[str, bytes]] | None

        def headers(self) -> list[tuple[str, bytes]] | None:
            return self._headers

        def topic(self) -> str:
            return "credits"

    assert message_id_of(Message([("message-id", str(MID).encode())])) == MID
    with pytest.raises(MessageIdError, match=r"^Kafka record credits has no message-id header"):
        message_id_of(Message(None))


@pytest.mark.parametrize(
    ("source", "message"),
    [
        (record([]), "Kafka record credits/2@15 has no message-id header: it was not published by outbox-relay"),
        (record([("message-id", None)]), "Kafka record credits/2@15 has no message-id header"),
        (
            record([("message-id", b"nope")]),
            "Kafka record credits/2@15 has an unusable message-id header: invalid message id 'nope': not a UUID",
        ),
        (
            record([("message-id", b"\xff\xfe")]),
            "Kafka record credits/2@15 has an unusable message-id header: not ASCII",
        ),
        (
            record([("message-id", str(MID).encode()), ("message-id", str(uuid.uuid4()).encode())]),
            "Kafka record credits/2@15 has an unusable message-id header: 2 different values",
        ),
        (pika.BasicProperties(), "AMQP message has no message_id property"),
        (pika.BasicProperties(message_id=""), "AMQP message has no message_id property"),
        (
            pika.BasicProperties(message_id="42"),
            "AMQP message has an unusable message_id property: invalid message id '42': not a UUID",
        ),
        (object(), "cannot read a message id from a object: pass an aiokafka ConsumerRecord"),
    ],
)
def test_a_missing_or_invalid_message_id_is_one_clear_line(source: object, message: str) -> None:
    with pytest.raises(MessageIdError) as info:
        message_id_of(source)  # type: ignore[arg-type]
    text = str(info.value)
    assert text.startswith(message) and "\n" not in text
    assert isinstance(info.value, ValueError) and isinstance(info.value, OutboxRelayError)


def test_the_same_header_twice_with_one_value_is_fine() -> None:
    assert message_id_of(record([("message-id", str(MID).encode())] * 2)) == MID


@pytest.mark.parametrize("form", [str(MID), str(MID).upper(), "{" + str(MID) + "}", MID.hex, f"urn:uuid:{MID}", MID])
def test_every_spelling_of_one_uuid_is_one_message(form: object) -> None:
    assert parse_message_id(form) == MID


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (None, "no message id: a message without one cannot be deduplicated"),
        (str(MID).encode(), "invalid message id: got bytes; decode it, or read it with message_id_of"),
        (42, "invalid message id: expected a str or UUID, got int"),
        ("x\ny" * 100, "invalid message id 'x\\ny"),
    ],
)
def test_invalid_message_ids_are_refused_in_one_line(value: object, message: str) -> None:
    with pytest.raises(MessageIdError) as info:
        parse_message_id(value)
    assert str(info.value).startswith(message) and "\n" not in str(info.value)
    assert len(str(info.value)) < 200


@pytest.mark.parametrize("name", ["", "Inbox", "1inbox", "in box", 'in"box', "inbox; DROP TABLE x", "i" * 51])
def test_invalid_schema_names_never_reach_sql(name: str) -> None:
    for render in (
        sqlfiles.inbox_ddl,
        sqlfiles.record_inbox_version,
        lambda s: sqlfiles.inbox_grants(s, "app"),
        lambda s: sqlfiles.inbox_query("first_time", s),
    ):
        with pytest.raises(ConfigError, match=r"^invalid inbox schema name"):
            render(name)


def test_the_sql_names_the_schema_as_a_quoted_identifier() -> None:
    ddl = sqlfiles.inbox_ddl("billing_inbox").as_string()
    assert 'CREATE TABLE "billing_inbox".processed' in ddl
    assert 'CREATE FUNCTION "billing_inbox".first_time(message_id uuid' in ddl
    grants = sqlfiles.inbox_grants("billing_inbox", 'we"ird').as_string()
    assert 'GRANT EXECUTE ON FUNCTION "billing_inbox".first_time(uuid, text) TO "we""ird";' in grants
    assert isinstance(sqlfiles.inbox_query("first_time", "billing_inbox"), sql.Composed)
