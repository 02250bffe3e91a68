"""What travels instead of a large payload: a small envelope naming where the payload is.

The relay (or `enqueue_large`) puts the payload in a store and publishes this in its
place: the same message id, key and headers, plus headers with the payload's place,
size, SHA-256 and content type; the envelope's body says the same as JSON, for a
consumer that cannot read headers. `fetch` (consume.py) reads it back and checks it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass

from outbox_relay.errors import OutboxRelayError

CONTENT_TYPE = "application/vnd.outbox-relay.claim-check+json"
URL = "outbox-claim-check-url"
SIZE = "outbox-claim-check-size"
SHA256 = "outbox-claim-check-sha256"
PAYLOAD_CONTENT_TYPE = "outbox-claim-check-content-type"


class ClaimCheckError(OutboxRelayError):
    """A claim check that cannot be honoured: its object is missing, or not the bytes
    the envelope names (size or SHA-256), or the envelope itself is malformed."""


@dataclass(frozen=True, slots=True)
class Reference:
    url: str  # s3://bucket/key or file:///path
    size: int
    sha256: str  # hex
    content_type: str  # the payload's own

    def headers(self) -> dict[str, str]:
        return {URL: self.url, SIZE: str(self.size), SHA256: self.sha256, PAYLOAD_CONTENT_TYPE: self.content_type}

    def body(self) -> bytes:
        return json.dumps({"claim_check": self.headers()}, separators=(",", ":")).encode()


def reference_in(headers: Mapping[str, str]) -> Reference | None:
    """The reference a message's headers carry, or None when it carries its payload."""
    url = headers.get(URL)
    if url is None:
        return None
    try:
        size = int(headers[SIZE])
        sha256 = headers[SHA256]
    except (KeyError, ValueError) as exc:
        raise ClaimCheckError(f"claim-check envelope for {url} lacks a valid {SIZE} or {SHA256} header") from exc
    return Reference(url, size, sha256.lower(), headers.get(PAYLOAD_CONTENT_TYPE, "application/octet-stream"))
