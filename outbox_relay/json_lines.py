"""The JSON-lines form of a message: how it looks to tools that read files, stdout or webhooks.

    {"message_id": "...", "topic": "...", "key": "..." | null, "headers": {...},
     "content_type": "...", "destination": "...", "created_at": "...",
     "payload": <the JSON value>}

A payload that is not JSON is carried as base64 and marked with
``"payload_encoding": "base64"``; a text payload is carried as a string with
``"payload_encoding": "text"``.
"""

from __future__ import annotations

import base64
import json
import re
from typing import Any

from outbox_relay.models import OutgoingMessage


def as_dict(out: OutgoingMessage) -> dict[str, Any]:
    message = out.message
    data: dict[str, Any] = {
        "message_id": str(message.message_id),
        "topic": message.topic,
        "key": message.key,
        "headers": dict(message.headers),
        "content_type": message.content_type,
        "destination": out.destination,
        "created_at": message.created_at.isoformat(),
    }
    if message.content_type.startswith("application/json"):
        value = _strict_json(message.payload)
        if value is not _NOT_JSON:
            data["payload"] = value
            return data
        # Labelled JSON but is not strict JSON: carried as base64, never lost.
    if message.content_type.startswith("text/"):
        try:
            data["payload"] = message.payload.decode("utf-8")
            data["payload_encoding"] = "text"
            return data
        except UnicodeDecodeError:
            pass
    data["payload"] = base64.b64encode(message.payload).decode("ascii")
    data["payload_encoding"] = "base64"
    return data


_NOT_JSON = object()


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _strict_json(raw: bytes) -> Any:
    """The JSON value, or _NOT_JSON if re-encoding it would not give valid UTF-8 JSON
    (NaN/Infinity, lone surrogates, invalid bytes)."""
    try:
        value = json.loads(raw, parse_constant=_reject_constant)
        json.dumps(value, ensure_ascii=False, allow_nan=False).encode("utf-8")
    except (ValueError, UnicodeError, RecursionError):
        return _NOT_JSON
    return value


# json.dumps escapes C0 controls only; DEL and C1 (\x9b is CSI, which terminals obey)
# would reach a terminal reading the stdout adapter raw. Escaped, they decode the same.
_C1 = re.compile("[\x7f-\x9f]")


def json_line(out: OutgoingMessage) -> str:
    line = json.dumps(as_dict(out), ensure_ascii=False, separators=(",", ":"))
    return _C1.sub(lambda c: f"\\u{ord(c[0]):04x}", line) + "\n"


def decode_payload(data: dict[str, Any]) -> Any:
    """The payload of a JSON-lines object as the producer gave it: JSON value, str or bytes."""
    encoding = data.get("payload_encoding")
    if encoding == "base64":
        return base64.b64decode(data["payload"])
    return data["payload"]
