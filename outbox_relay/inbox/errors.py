"""What the consumer inbox refuses, and every message it explains a refusal with."""

from __future__ import annotations

from outbox_relay.errors import OutboxRelayError, SchemaError


class InboxUsageError(OutboxRelayError, ValueError):
    """The inbox was called in a way that cannot give exactly-once effects: on an
    autocommit connection outside a transaction, or with an invalid consumer name.

    A ValueError too, like the producer's refusals (:func:`outbox_relay.enqueue`).
    """

    exit_code = 2


class MessageIdError(InboxUsageError):
    """A message carries no message id, or one that is not a UUID: it cannot be
    deduplicated. Raised before any SQL runs."""


AUTOCOMMIT_ERROR = (
    "first_time on an autocommit connection outside a transaction would record the message "
    "apart from its business effect: call it inside `with conn.transaction():` (or turn autocommit off)"
)

MAX_CONSUMER_NAME = 200


def invalid_consumer(consumer: object) -> InboxUsageError:
    return InboxUsageError(
        f"invalid consumer name {_short(consumer)}: give a str of 1 to {MAX_CONSUMER_NAME} characters"
    )


def invalid_message_id(value: object) -> MessageIdError:
    if value is None:
        return MessageIdError("no message id: a message without one cannot be deduplicated")
    if isinstance(value, bytes | bytearray | memoryview):
        return MessageIdError("invalid message id: got bytes; decode it, or read it with message_id_of(record)")
    if not isinstance(value, str):
        return MessageIdError(f"invalid message id: expected a str or UUID, got {type(value).__name__}")
    return MessageIdError(f"invalid message id {_short(value)}: not a UUID")


def missing_header(where: str, name: str) -> MessageIdError:
    return MessageIdError(
        f"{where} has no {name}: it was not published by outbox-relay, or its {name} was dropped on the way"
    )


def unreadable_header(where: str, name: str, problem: str) -> MessageIdError:
    return MessageIdError(f"{where} has an unusable {name}: {problem}")


def not_installed(schema: str) -> SchemaError:
    return SchemaError(
        f"inbox schema {schema!r} is not installed in this database: "
        f"run `outbox-relay inbox schema install --schema {schema}`"
    )


def version_problem(version: int | None, known: int, schema: str) -> str | None:
    """Why the inbox in `schema` cannot be used at `version`, or None if it can."""
    if version is None:
        return str(not_installed(schema))
    if version > known:
        return (
            f"inbox schema {schema!r} is at version {version}, newer than this outbox-relay "
            f"knows ({known}): upgrade outbox-relay"
        )
    if version < known:
        return (
            f"inbox schema {schema!r} is at version {version}, older than this outbox-relay "
            f"needs ({known}): run `outbox-relay inbox schema install --schema {schema}`"
        )
    return None


def _short(value: object) -> str:
    # One line whatever the input: repr escapes newlines, and a huge header is cut.
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
