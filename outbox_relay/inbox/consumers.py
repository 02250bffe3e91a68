"""Read the message id that outbox-relay sent with a message, from a broker client's
own objects: an aiokafka ``ConsumerRecord`` (header ``message-id``), a confluent-kafka
``Message``, or pika's ``BasicProperties`` (property ``message_id``).

No broker client is imported here: the objects are read by their attributes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol
from uuid import UUID

import psycopg

from outbox_relay.inbox import errors
from outbox_relay.inbox.store import DEFAULT_CONSUMER, parse_message_id, process_once
from outbox_relay.sqlfiles import DEFAULT_INBOX_SCHEMA
from outbox_relay.tracing import consumer_span

KAFKA_HEADER = "message-id"
AMQP_PROPERTY = "message_id"


class KafkaRecord(Protocol):
    """aiokafka's ConsumerRecord: headers as (name, value) pairs."""

    @property
    def headers(self) -> Sequence[tuple[str, bytes | None]]: ...


class AmqpProperties(Protocol):
    """pika's BasicProperties (the third argument of an on_message callback)."""

    @property
    def message_id(self) -> str | None: ...


class ConfluentMessage(Protocol):
    """confluent-kafka's Message: headers through a method."""

    def headers(self) -> Sequence[tuple[str, bytes | None]] | None: ...


MessageSource = KafkaRecord | AmqpProperties | ConfluentMessage


def message_id_of(source: MessageSource) -> UUID:
    """The message id of a Kafka record or an AMQP message's properties.

    Raises MessageIdError, one line naming the record, when the header or property is
    missing (the message was not published by outbox-relay, or a bridge dropped it),
    is not a UUID, or appears twice with different values.
    """
    if hasattr(source, AMQP_PROPERTY):
        return _from_amqp_property(getattr(source, AMQP_PROPERTY))
    headers = getattr(source, "headers", None)
    if callable(headers):  # confluent-kafka: Message.headers() -> list | None
        headers = headers()
    if headers is None and not hasattr(source, "headers"):
        raise errors.MessageIdError(
            f"cannot read a message id from a {type(source).__name__}: pass an aiokafka ConsumerRecord, "
            "a confluent-kafka Message or pika's BasicProperties"
        )
    return _from_kafka_headers(headers or (), _where(source))


def _from_amqp_property(value: object) -> UUID:
    where, what = "AMQP message", f"{AMQP_PROPERTY} property"
    if value is None or value == "":
        raise errors.missing_header(where, what)
    return _parse(_decode(value, where, what) if isinstance(value, bytes) else value, where, what)


def _from_kafka_headers(headers: Sequence[tuple[str, bytes | None]], where: str) -> UUID:
    found = {value for name, value in headers if name == KAFKA_HEADER}
    what = f"{KAFKA_HEADER} header"
    if not found or found == {None}:
        raise errors.missing_header(where, what)
    if len(found) > 1:
        raise errors.unreadable_header(where, what, f"{len(found)} different values")
    (raw,) = found
    return _parse(_decode(raw, where, what) if isinstance(raw, bytes) else raw, where, what)


def _parse(value: object, where: str, what: str) -> UUID:
    try:
        return parse_message_id(value)
    except errors.MessageIdError as exc:
        raise errors.unreadable_header(where, what, str(exc)) from None


def _decode(raw: bytes, where: str, what: str) -> str:
    try:
        return raw.decode("ascii")
    except UnicodeDecodeError:
        raise errors.unreadable_header(where, what, "not ASCII text") from None


def _where(record: object) -> str:
    # "Kafka record topic/partition@offset", as far as the record says (aiokafka has
    # attributes, confluent-kafka methods).
    found = {}
    for name in ("topic", "partition", "offset"):
        value = getattr(record, name, None)
        found[name] = value() if callable(value) else value
    where = "Kafka record"
    for name, sep in (("topic", " "), ("partition", "/"), ("offset", "@")):
        if found[name] is None:
            break
        where += f"{sep}{found[name]}"
    return where


def headers_of(source: MessageSource) -> dict[str, str]:
    """A message's headers as text: a Kafka record's (aiokafka or confluent-kafka), or
    an AMQP message's ``properties.headers``. Values that are not text are left out."""
    if hasattr(source, AMQP_PROPERTY):
        raw = getattr(source, "headers", None) or {}
        pairs = list(raw.items()) if isinstance(raw, dict) else []
    else:
        headers = getattr(source, "headers", None)
        pairs = list((headers() if callable(headers) else headers) or ())
    text: dict[str, str] = {}
    for name, value in pairs:
        if isinstance(value, bytes):
            try:
                value = value.decode("utf-8")
            except UnicodeDecodeError:
                continue
        if isinstance(name, str) and isinstance(value, str):
            text[name] = value
    return text


def process_message(
    conn: psycopg.Connection[Any],
    source: MessageSource,
    handler: Callable[[psycopg.Connection[Any]], object],
    *,
    consumer: str = DEFAULT_CONSUMER,
    schema: str = DEFAULT_INBOX_SCHEMA,
    span_name: str = "outbox-relay consume",
) -> bool:
    """:func:`process_once` for a broker client's message: its id read from the record
    (or the AMQP properties), and the handler run in a consumer span that continues the
    trace the message was enqueued in (with OpenTelemetry installed; outbox_relay.tracing).
    Returns whether the handler ran (False for a duplicate)."""
    message_id = message_id_of(source)
    with consumer_span(span_name, headers_of(source), **{"messaging.message.id": str(message_id)}):
        return process_once(conn, message_id, handler, consumer=consumer, schema=schema)
