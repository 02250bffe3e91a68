"""How an outbox message becomes an SQS ``SendMessageBatch`` entry (adapters/sqs.py).

- Body: SQS bodies are Unicode text of the XML character set (#x9, #xA, #xD, #x20 to
  #xD7FF, #xE000 to #xFFFD, #x10000 to #x10FFFF). A payload that decodes as UTF-8 into
  those characters travels as it is; any other payload (binary, or text with other
  control characters) travels base64-encoded, with the attribute ``body-encoding:
  base64``. Decided by the bytes, not the content type, so a consumer needs one rule:
  decode base64 when the attribute says so. SQS refuses an empty body, so an empty
  payload cannot be carried (a permanent failure naming why).
- Message attributes: SQS allows 10 per message, and the relay needs a fixed layout
  whatever the number of headers, so every message carries at most six:
  ``message-id``, ``content-type``, ``traceparent`` and ``tracestate`` (each when the
  message has one: OpenTelemetry's SQS instrumentation reads them from message
  attributes), ``headers`` (all of the message's headers as one JSON object, the trace
  headers included) and ``body-encoding`` (only for base64). All of type String.
- FIFO queues: ``MessageDeduplicationId`` is the message id (SQS drops a re-send of it
  for 5 minutes: relay re-sends after a lost answer are not delivered twice);
  ``MessageGroupId`` is the key. A key SQS would refuse as a group id (over 128
  characters, or characters other than ASCII letters, digits and punctuation) becomes
  ``h-`` + its SHA-256 in hex: the same key always gets the same group. A keyless
  message's group is its message id: the relay promises keyless messages no order, and
  one shared group would make each wait behind the one before it at the consumer.
- Size: SQS counts the body and every attribute's name, type and value against its
  limit (256 KiB; ``max_message_bytes``). A message over it is a permanent failure
  naming the limit; the claim check (when configured) keeps payloads below it.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
from dataclasses import dataclass
from typing import Any

from outbox_relay.models import OutgoingMessage
from outbox_relay.tracing import TRACE_HEADERS

# What SQS accepts in a body and in a String attribute: the XML 1.0 character set.
_REFUSED_CHARACTERS = re.compile("[^\x09\x0a\x0d\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")
# A MessageGroupId: 1 to 128 characters, ASCII letters, digits and punctuation.
_GROUP_ID = re.compile(r"[A-Za-z0-9!\"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~]{1,128}")
STRING = "String"


def is_fifo(queue: str) -> bool:
    """A FIFO queue's name (and so its URL) ends in .fifo."""
    return queue.endswith(".fifo")


def group_id(key: str) -> str:
    """`key` as a MessageGroupId: itself when SQS accepts it, else a stable hash of it."""
    if _GROUP_ID.fullmatch(key):
        return key
    return "h-" + hashlib.sha256(key.encode("utf-8")).hexdigest()


def _body(payload: bytes) -> tuple[str, bool]:
    """The body SQS can carry, and whether it is base64."""
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    if text is not None and not _REFUSED_CHARACTERS.search(text):
        return text, False
    return base64.b64encode(payload).decode("ascii"), True


@dataclass(frozen=True, slots=True)
class Entry:
    """One SendMessageBatch entry (without its Id, given per request) and its size as SQS counts it."""

    fields: dict[str, Any]
    size: int


def entry_for(out: OutgoingMessage, fifo: bool, max_bytes: int) -> Entry | str:
    """The entry for `out`, or why SQS cannot carry it (a permanent failure)."""
    message = out.message
    if not message.payload:
        return "SQS refuses an empty message body (the payload is empty)"
    body, encoded = _body(message.payload)
    attributes: dict[str, str] = {"message-id": str(message.message_id)}
    if message.content_type:
        attributes["content-type"] = message.content_type
    lowered = {name.lower(): value for name, value in message.headers.items()}
    for name in TRACE_HEADERS:
        if lowered.get(name):
            attributes[name] = lowered[name]
    if message.headers:
        attributes["headers"] = json.dumps(dict(message.headers), ensure_ascii=False, separators=(",", ":"))
    if encoded:
        attributes["body-encoding"] = "base64"
    for name, value in attributes.items():
        if _REFUSED_CHARACTERS.search(value):
            return f"the {name} attribute holds characters SQS refuses (control characters)"
    size = len(body.encode("utf-8")) + sum(
        len(name.encode("utf-8")) + len(STRING) + len(value.encode("utf-8")) for name, value in attributes.items()
    )
    if size > max_bytes:
        how = " (base64-encoded: the payload is not SQS text)" if encoded else ""
        return (
            f"message too large for SQS: {size} bytes of body{how} and attributes, over the limit of"
            f" {max_bytes} bytes (max_message_bytes); a claim check keeps large payloads out of the queue"
        )
    fields: dict[str, Any] = {
        "MessageBody": body,
        "MessageAttributes": {name: {"DataType": STRING, "StringValue": value} for name, value in attributes.items()},
    }
    if fifo:
        fields["MessageGroupId"] = group_id(message.key) if message.key is not None else str(message.message_id)
        fields["MessageDeduplicationId"] = str(message.message_id)
    return Entry(fields, size)


# A queue name: 1 to 80 characters, letters, digits, hyphens and underscores, a FIFO
# queue's ending in .fifo (counted in the 80).
_QUEUE_NAME = re.compile(r"[A-Za-z0-9_-]{1,75}(\.fifo)?|[A-Za-z0-9_-]{76,80}")


def is_url(destination: str) -> bool:
    return destination.startswith(("https://", "http://"))


def name_problem(name: str) -> str | None:
    """Why SQS would refuse `name` as a queue name, or None."""
    if _QUEUE_NAME.fullmatch(name):
        return None
    return (
        f"SQS queue names are 1 to 80 letters, digits, hyphens and underscores (a FIFO queue's ending"
        f" in .fifo), not {name[:100]!r}"
    )
