"""A consumer's side: the payload of a message, fetched from its store when the message
is a claim-check envelope, checked against the size and SHA-256 the envelope names."""

from __future__ import annotations

import functools
import hashlib
import json
import os
import urllib.parse
from collections.abc import Mapping
from typing import Any

from outbox_relay.claim_check.envelope import ClaimCheckError, Reference, reference_in
from outbox_relay.claim_check.stores import FileStore, S3Store, Store
from outbox_relay.config import S3StoreConfig
from outbox_relay.json_lines import decode_payload


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes | bytearray) else str(value)


def headers_and_body(source: Any, body: bytes | None = None) -> tuple[dict[str, str], Any]:
    """A message's headers and body from a broker client's object: an aiokafka
    ConsumerRecord, a confluent-kafka Message, pika's BasicProperties with the body
    given apart, or a JSON-lines record as a dict (the file and webhook adapters')."""
    if isinstance(source, Mapping):
        return {k: _text(v) for k, v in (source.get("headers") or {}).items()}, source
    headers = getattr(source, "headers", None)
    if callable(headers):  # confluent-kafka: Message.headers() and .value()
        headers = headers()
    if isinstance(headers, Mapping):  # pika: properties.headers
        pairs = dict(headers)
    else:
        pairs = {name: value for name, value in (headers or []) if value is not None}
    if body is None:
        value = getattr(source, "value", None)
        body = value() if callable(value) else value
    return {k: _text(v) for k, v in pairs.items()}, body


def _payload_of(body: Any) -> bytes:
    if isinstance(body, Mapping):  # a JSON-lines record: its payload as the producer gave it
        value = decode_payload(dict(body))
        if isinstance(value, bytes):
            return value
        if isinstance(value, str) and body.get("payload_encoding") == "text":
            return value.encode()
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()
    return b"" if body is None else bytes(body)


@functools.lru_cache(maxsize=64)
def _s3_store(bucket: str, endpoint: str | None) -> S3Store:
    # One client per bucket and endpoint: a client resolves credentials and opens its
    # connections once, not per message.
    return S3Store(S3StoreConfig(type="s3", bucket=bucket, endpoint_url=endpoint))


def store_for(url: str) -> Store:
    """The store an envelope's URL names, opened from the environment: file URLs
    directly; s3 URLs with boto3's own settings (AWS_ENDPOINT_URL, AWS_CA_BUNDLE,
    AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, AWS_REGION...)."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme == "file":
        return FileStore("/")
    if parts.scheme == "s3":
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        return _s3_store(parts.netloc, endpoint)
    raise ClaimCheckError(f"unknown claim-check URL scheme: {url}")


def verified(reference: Reference, data: bytes) -> bytes:
    if len(data) != reference.size:
        raise ClaimCheckError(
            f"claim-check object {reference.url} has {len(data)} bytes, the envelope says {reference.size}"
        )
    if hashlib.sha256(data).hexdigest() != reference.sha256:
        raise ClaimCheckError(f"claim-check object {reference.url} does not match the envelope's SHA-256")
    return data


def fetch(source: Any, body: bytes | None = None, *, store: Store | None = None) -> bytes:
    """The payload of a message as the producer enqueued it.

    `source`: an aiokafka ConsumerRecord, a confluent-kafka Message, pika's
    BasicProperties (with `body`), or a JSON-lines record (dict). A message that is a
    claim-check envelope is fetched from its store (`store`, or one opened from the
    environment: store_for) and checked: raises ClaimCheckError when the object is
    missing or is not the bytes the envelope names. Any other message's own payload
    is returned as it is, so a consumer may call this on every message. Synchronous
    (boto3 is): from asyncio, `await asyncio.to_thread(fetch, record)`.
    """
    headers, content = headers_and_body(source, body)
    reference = reference_in(headers)
    if reference is None:
        return _payload_of(content)
    data = (store or store_for(reference.url)).get(reference.url, max_size=reference.size)
    return verified(reference, data)
