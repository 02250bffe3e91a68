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
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import structlog

from outbox_relay.claim_check.envelope import CONTENT_TYPE, Reference
from outbox_relay.claim_check.stores import Store, open_store
from outbox_relay.config import ClaimCheckConfig, FileStoreConfig, S3StoreConfig
from outbox_relay.engine.retry import Backoff
from outbox_relay.errors import first_line
from outbox_relay.models import Message, OutgoingMessage, PublishResult

log = structlog.get_logger("outbox_relay.claim_check")

# Uploads in flight at once per store (each a thread: boto3 is synchronous).
CONCURRENCY = 4
# How long an upload's failure keeps /readyz at 503 without a new one (readiness).
READY_MEMORY_S = 30.0


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


class _StoreDown(Exception):
    """The store failed within its backoff window: not tried again until it ends."""

    def __init__(self, reason: str, until: float):
        super().__init__(reason)
        self.until = until


class _Busy(Exception):
    """The upload started late in the call's deadline, or not at all: it queued for a
    thread behind the store's other uploads (a burst of large payloads), which says
    nothing against the store."""


def _store_level(error: BaseException) -> bool:
    """Whether an upload's failure is the store's (away, refusing the relay, slow: every
    message would fail alike; no attempt is spent) rather than this message's (one it
    cannot take: an attempt is spent, as for a broker's transient error)."""
    if isinstance(error, TimeoutError | OSError | _StoreDown | _Busy):
        return True
    module = type(error).__module__
    # botocore's connection, timeout and service errors (ClientError: access denied, no
    # such bucket, 5xx) are the store's; its parameter validation is the message's.
    return module.startswith(("botocore", "urllib3")) and type(error).__name__ != "ParamValidationError"


class _Submission:
    """One upload handed to a pool: when a thread took it (None: still queued). One per
    submission, so two uploads of one message id (a retry beside one that timed out)
    are told apart."""

    __slots__ = ("started_at",)

    def __init__(self) -> None:
        self.started_at: float | None = None


class _Running:
    """When each upload in a thread started, per store: a store whose uploads hang keeps
    every thread, and the uploads queued behind them must count against it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._since: dict[str, dict[_Submission, float]] = {}

    def run(self, store: Store, message: Message, submission: _Submission) -> Reference:
        # In a pool thread: the time it was taken, so the deadline tells the store's
        # slowness from a queue for a thread (ClaimChecks.prepare).
        now = time.monotonic()
        submission.started_at = now
        with self._lock:
            self._since.setdefault(store.where, {})[submission] = now
        try:
            return _upload(store, message)
        finally:
            with self._lock:
                self._since.get(store.where, {}).pop(submission, None)

    def hung(self, where: str, longer_than: float) -> bool:
        """Whether an upload to `where` has been running for longer than that."""
        cut = time.monotonic() - longer_than
        with self._lock:
            return any(started < cut for started in self._since.get(where, {}).values())


class ClaimChecks:
    def __init__(self, stores: Sequence[FileStoreConfig | S3StoreConfig], backoff: Backoff, timeout: float):
        self._backoff = backoff
        self._timeout = timeout
        # Threads of their own per store (boto3 is synchronous): an upload that outlives
        # its deadline keeps its thread, and must take neither the ones the rest of the
        # relay uses (the default executor: the file adapter's writes, librdkafka's
        # commits) nor another store's (a store that never answers, a hung NFS mount,
        # would hold every thread and starve the healthy ones).
        self._pools: dict[str, ThreadPoolExecutor] = {}
        # Opened at start: a store the relay cannot use (boto3 missing) stops it there.
        self._stores: dict[FileStoreConfig | S3StoreConfig, Store] = {}
        for config in stores:
            self.store(config)
        self._running = _Running()
        # Per store: why and until when it is taken for down (a circuit: within the
        # window its uploads fail at once, so a batch does not wait out a timeout per
        # message while the claim's transaction is open), and how long the outage is.
        self._down: dict[str, tuple[str, float]] = {}
        self._failed_at: dict[str, float] = {}  # store -> when an upload to it last failed
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
        of an ordered broker, the later messages of their key).

        All of a call's uploads share one deadline (publish_timeout, the queue for a
        thread included), so a call's uploads and its publish stay within the claim's
        transaction timeout whatever the store does."""
        if not any(self.wanted(out.message, config) for _, out, config in items):
            return [(index, out) for index, out, _ in items], {}
        wanted = [(index, out, config) for index, out, config in items if self.wanted(out.message, config)]
        loop = asyncio.get_running_loop()
        submissions = [_Submission() for _ in wanted]
        started = [
            self._start(loop, self.store(config.store), out.message, submission)
            for (_, out, config), submission in zip(wanted, submissions, strict=True)
            if config is not None
        ]
        done, late = await asyncio.wait(started, timeout=self._timeout) if started else (set(), set())
        for future in late:
            future.cancel()  # not started yet: never runs; running: its answer is ignored
        # An upload without an answer is the store's failure when the store has had it,
        # or the ones it waited behind, for at least half the deadline (not all of it:
        # those this very call started ran a hair less than the deadline); otherwise
        # it only queued for a thread (a burst of large payloads) and waits without a
        # word against the store.
        patience = self._timeout / 2
        now = time.monotonic()
        uploads: dict[int, Reference | BaseException] = {}
        for (index, _, config), future, submission in zip(wanted, started, submissions, strict=True):
            if future in done and not future.cancelled():
                uploads[index] = future.exception() or future.result()
            elif submission.started_at is not None and now - submission.started_at >= patience:
                uploads[index] = TimeoutError()  # the store took the upload and did not answer
            elif (
                submission.started_at is None
                and config is not None
                and self._running.hung(self.store(config.store).where, patience)
            ):
                uploads[index] = TimeoutError()  # queued behind uploads the store does not answer
            else:
                uploads[index] = _Busy("queued behind other uploads to the store past the call's deadline")
        ready: list[tuple[int, OutgoingMessage]] = []
        held: dict[int, PublishResult] = {}
        stopped: set[str] = set()
        counted: set[str] = set()  # what this call already counted or logged, per store
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
            held[index] = self._failed(where, answer, counted)
            if key is not None:
                stopped.add(key)
        return ready, held

    def _start(
        self, loop: asyncio.AbstractEventLoop, store: Store, message: Message, submission: _Submission
    ) -> asyncio.Future[Reference]:
        down = self._down.get(store.where)
        if down is not None and loop.time() < down[1]:
            failed: asyncio.Future[Reference] = loop.create_future()
            failed.set_exception(_StoreDown(*down))
            return failed
        pool = self._pools.get(store.where)
        if pool is None:
            pool = self._pools[store.where] = ThreadPoolExecutor(CONCURRENCY, thread_name_prefix="claim-check")
        future = loop.run_in_executor(pool, self._running.run, store, message, submission)
        future.add_done_callback(self._count)
        return future

    def _count(self, future: asyncio.Future[Reference]) -> None:
        if not future.cancelled() and future.exception() is None:
            self.uploaded += 1

    def _up(self, where: str) -> None:
        if self._down.pop(where, None) is not None:
            log.info("claim_check_store_back", store=where)
        self._outage.pop(where, None)
        self._failed_at.pop(where, None)

    def _failed(self, where: str, error: BaseException, counted: set[str]) -> PublishResult:
        """The answer for a message whose upload to `where` failed. A store's failure
        counts once per call towards its outage (a call of many large messages is one
        sign of it, not many: the window would otherwise jump to retry.max at once)."""
        if not _store_level(error):
            # This message's own problem: an attempt is spent, the store stays up.
            return PublishResult.transient(f"claim-check upload to {where} failed: {first_line(error)}")
        now = asyncio.get_running_loop().time()
        if isinstance(error, _Busy):  # no attempt spent, and no word against the store
            if f"queued:{where}" not in counted:
                counted.add(f"queued:{where}")
                log.info("claim_check_uploads_queued", store=where, threads=CONCURRENCY)
            return PublishResult.unavailable(f"claim-check store {where}: {error}", retry_after=self._backoff.delay(1))
        if isinstance(error, _StoreDown):
            # Its window as it was when the upload was refused (an upload that ended well
            # since may have closed it).
            return PublishResult.unavailable(
                f"claim-check store {where} unavailable: {error}", retry_after=max(0.0, error.until - now)
            )
        reason = "no answer within publish_timeout" if isinstance(error, TimeoutError) else first_line(error)
        if where not in counted:
            counted.add(where)
            if where not in self._down:
                log.warning("claim_check_store_unavailable", store=where, error=reason)
            self._outage[where] = self._outage.get(where, 0) + 1
            self._down[where] = (reason, now + self._backoff.delay(self._outage[where]))
            self._failed_at[where] = now
        until = self._down[where][1]
        return PublishResult.unavailable(
            f"claim-check store {where} unavailable: {reason}", retry_after=max(0.0, until - now)
        )

    def readiness(self) -> tuple[bool, dict[str, Any]] | None:
        """For /readyz: not ready while a store is taken for down: its last upload failed,
        within its backoff window or the last READY_MEMORY_S (messages that wait for it
        try again within retry.max; a replica that has no large message to send any more
        is not held unready for good by an old failure)."""
        if not self._stores:
            return None
        now = asyncio.get_running_loop().time()
        down = {
            where
            for where, (_, until) in self._down.items()
            if now < until or now - self._failed_at.get(where, float("-inf")) < READY_MEMORY_S
        }
        return not down, {
            "claim_check_stores": {store.where: store.where not in down for store in self._stores.values()}
        }

    def close(self) -> None:
        for pool in self._pools.values():
            pool.shutdown(wait=False, cancel_futures=True)
