"""Messages as the relay reads them from the outbox, built with keyword defaults: a test
names only the fields it is about."""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from outbox_relay.models import Message, OutgoingMessage

CREATED = datetime(2024, 1, 1, tzinfo=UTC)


def message(
    id: int = 1,
    payload: Any = None,
    content_type: str = "application/json",
    *,
    topic: str = "orders.created",
    key: str | None = None,
    headers: Mapping[str, str] | None = None,
    attempts: int = 0,
    message_id: uuid.UUID | None = None,
    created_at: datetime = CREATED,
) -> Message:
    """Message `id`. `payload`: bytes as they are, None for ``{"n": id}``, anything else
    as compact JSON. A fresh message id unless one is given."""
    if payload is None:
        payload = {"n": id}
    body = payload if isinstance(payload, bytes) else json.dumps(payload, separators=(",", ":")).encode()
    return Message(
        id=id,
        message_id=message_id or uuid.uuid4(),
        topic=topic,
        key=key,
        payload=body,
        content_type=content_type,
        headers=dict(headers or {}),
        attempts=attempts,
        created_at=created_at,
    )


def outgoing(
    id: int = 1,
    payload: Any = None,
    content_type: str = "application/json",
    *,
    destination: str = "dest",
    explicit_destination: bool = False,
    **fields: Any,
) -> OutgoingMessage:
    """`message(id, payload, content_type, **fields)` routed to `destination`."""
    return OutgoingMessage(
        message(id, payload, content_type, **fields), destination, explicit_destination=explicit_destination
    )
