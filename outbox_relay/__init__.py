"""outbox-relay: a transactional outbox relay for PostgreSQL.

Applications enqueue inside their own transaction::

    from outbox_relay import enqueue

    with conn.transaction():
        conn.execute("UPDATE accounts SET balance = balance + 10 WHERE id = %s", (42,))
        enqueue(conn, "accounts.credited", {"account": 42, "amount": 10}, key="account-42")

and the relay daemon (`outbox-relay run`) publishes the message after commit.
"""

from __future__ import annotations

from outbox_relay.models import Message, Outcome, OutgoingMessage, PublishResult
from outbox_relay.producer import enqueue, enqueue_async

__all__ = [
    "Message",
    "Outcome",
    "OutgoingMessage",
    "PublishResult",
    "enqueue",
    "enqueue_async",
]
