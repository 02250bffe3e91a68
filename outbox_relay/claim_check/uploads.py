"""The relay's side of the claim check: a large payload goes to its store before the
broker call, and the broker gets an envelope naming it (envelope.py).

The message is marked dispatched only after both the upload and the broker's ack: the
upload comes first, and a message whose upload failed is not handed to the broker. A
store that is down is treated like a broker that is down: the message waits without
spending an attempt (and, of an ordered broker, so do the later messages of its key in
that call), the wait grows with the outage, and /readyz says which store is down.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Sequence
from typing import Any

import structlog

from outbox_relay.claim_check.envelope import CONTENT_TYPE, Reference
from outbox_relay.claim_check.stores import Store, open_store
from outbox_relay.config import ClaimCheckConfig, FileStoreConfig, S3StoreConfig
from outbox_relay.engine.retry import Backoff
from outbox_relay.errors import first_line
from outbox_relay.models import Message, OutgoingMessage, PublishResult

log = structlog.get_logger("outbox_relay.claim_check")

# Uploads in flight at once per relay (each a thread: boto3 is synchronous).
CONCURRENCY = 4


def envelope_message(message: Message, reference: Reference) -> Message:
    """The message as published in place of its payload."""
    return Message(
        message.id,
        message.message_id,
        message.topic,
        message.key,
        reference.body(),
        CONTENT_TYPE,
        {**message.headers, **reference.headers()},
        message.attempts,
        message.created_at,
    )


def _upload(store: Store, message: Message) -> Reference:
    payload = message.payload
    digest = hashlib.sha256(payload).hexdigest()
    url = store.put(str(message.message_id), payload, digest, message.content_type)
    return Reference(url, len(payload), digest, message.content_type)


class ClaimChecks:
    def __init__(self, stores: Sequence[FileStoreConfig | S3StoreConfig], backoff: Backoff, timeout: float):
        self._backoff = backoff
        self._timeout = timeout
        # Opened at start: a store the relay cannot use (boto3 missing) stops it there.
        self._stores: dict[FileStoreConfig | S3StoreConfig, Store] = {}
        for config in stores:
            self.store(config)
        self._limit = asyncio.Semaphore(CONCURRENCY)
        self._down: dict[str, str] = {}  # store -> why, while its last upload failed
        self._outage: dict[str, int] = {}
        self.uploaded = 0

    def store(self, config: FileStoreConfig | S3StoreConfig) -> Store:
        store = self._stores.get(config)
        if store is None:
            store = self._stores[config] = open_store(config)
        return store

    @staticmethod
    def wanted(message: Message, config: ClaimCheckConfig | None) -> bool:
        return config is not None and message.size > config.over and message.content_type != CONTENT_TYPE

    async def prepare(
        self,
        items: Sequence[tuple[int, OutgoingMessage, ClaimCheckConfig | None]],
        *,
        ordered: bool,
    ) -> tuple[list[tuple[int, OutgoingMessage]], dict[int, PublishResult]]:
        """The items of one broker call with each large payload uploaded and replaced by
        its envelope, and the answers of those that cannot go now (their upload failed;
        of an ordered broker, the later messages of their key)."""
        if not any(self.wanted(out.message, config) for _, out, config in items):
            return [(index, out) for index, out, _ in items], {}
        wanted = [(index, out, config) for index, out, config in items if self.wanted(out.message, config)]
        answers = await asyncio.gather(
            *(self._guarded(self.store(config.store), out.message) for _, out, config in wanted if config),
            return_exceptions=True,
        )
        uploads = {index: answer for (index, _, _), answer in zip(wanted, answers, strict=True)}
        ready: list[tuple[int, OutgoingMessage]] = []
        held: dict[int, PublishResult] = {}
        stopped: set[str] = set()
        for index, out, config in items:
            key = out.message.key
            if ordered and key is not None and key in stopped:
                held[index] = PublishResult.not_sent("an earlier message of its key could not be uploaded")
                continue
            if index not in uploads or config is None:
                ready.append((index, out))
                continue
            answer = uploads[index]
            where = self.store(config.store).where
            if isinstance(answer, Reference):
                self._up(where)
                message = envelope_message(out.message, answer)
                ready.append((index, OutgoingMessage(message, out.destination, out.explicit_destination)))
                continue
            if isinstance(answer, asyncio.CancelledError):
                raise answer
            held[index] = self._failed(where, answer)
            if key is not None:
                stopped.add(key)
        return ready, held

    async def _guarded(self, store: Store, message: Message) -> Reference:
        async with self._limit:
            # A thread cannot be cancelled: past the timeout the answer is ignored (and
            # the upload, if it ends, is reused by the next try: same name, same hash).
            async with asyncio.timeout(self._timeout):
                reference = await asyncio.to_thread(_upload, store, message)
        self.uploaded += 1
        return reference

    def _up(self, where: str) -> None:
        if self._down.pop(where, None) is not None:
            log.info("claim_check_store_back", store=where)
        self._outage.pop(where, None)

    def _failed(self, where: str, error: BaseException) -> PublishResult:
        reason = "no answer within publish_timeout" if isinstance(error, TimeoutError) else first_line(error)
        text = f"claim-check store {where} unavailable: {reason}"
        if where not in self._down:
            log.warning("claim_check_store_unavailable", store=where, error=reason)
        self._down[where] = reason
        self._outage[where] = self._outage.get(where, 0) + 1
        return PublishResult.unavailable(text, retry_after=self._backoff.delay(self._outage[where]))

    def readiness(self) -> tuple[bool, dict[str, Any]] | None:
        """For /readyz: not ready while a store's last upload failed."""
        if not self._stores:
            return None
        down = dict(self._down)
        return not down, {
            "claim_check_stores": {store.where: store.where not in down for store in self._stores.values()}
        }
