"""The consumer's half of exactly-once effects: an inbox in the consumer's database.

The relay delivers at least once; the inbox turns that into one business effect per
message by recording each message id in the same transaction as the effect::

    from outbox_relay import inbox

    with conn.transaction():
        if inbox.first_time(conn, inbox.message_id_of(record), consumer="billing"):
            credit_account(conn, ...)   # runs once per message, whatever the redeliveries

Install it with ``outbox-relay inbox schema install``; see docs/how-to/inbox.md
("End to end: exactly-once effects").
"""

from __future__ import annotations

from outbox_relay.inbox.consumers import headers_of, message_id_of, process_message
from outbox_relay.inbox.errors import InboxUsageError, MessageIdError
from outbox_relay.inbox.schema_manager import install, prune
from outbox_relay.inbox.store import (
    DEFAULT_CONSUMER,
    first_time,
    first_time_async,
    parse_message_id,
    process_once,
    process_once_async,
)

__all__ = [
    "DEFAULT_CONSUMER",
    "InboxUsageError",
    "MessageIdError",
    "first_time",
    "first_time_async",
    "headers_of",
    "install",
    "message_id_of",
    "parse_message_id",
    "process_message",
    "process_once",
    "process_once_async",
    "prune",
]
