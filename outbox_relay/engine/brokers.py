"""Connects each broker's adapter without holding back the others.

A broker that is down at start (or whose adapter fails to connect) answers
"unavailable" for its messages until it connects, so its outage delays only the
messages routed to it and spends none of their attempts. Once connected, the adapter
keeps its connection itself (outbox_relay/adapter.py: reconnecting is its job).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence

import structlog

from outbox_relay.adapter import Adapter, keeps_key_order
from outbox_relay.engine.retry import Backoff
from outbox_relay.errors import first_line
from outbox_relay.models import OutgoingMessage, PublishResult

log = structlog.get_logger("outbox_relay.brokers")


class BrokerHandle:
    """An :class:`Adapter` in front of another one, connecting it in the background."""

    def __init__(self, name: str, adapter: Adapter, backoff: Backoff):
        self.name = name
        self.adapter = adapter
        self._backoff = backoff
        # Set when the adapter's first connect() returned; never cleared. Not "the
        # connection is up now": that fact lives in one place, the adapter (its client),
        # which repairs it itself and tells it through ready() and "unavailable" answers;
        # the engine keeps no copy of it. This flag only says the handover is done. Until
        # then publish and ready() stay here, so they cannot start a second connection
        # beside the loop's connect() (the Kafka and RabbitMQ adapters connect from
        # publish and ready() when they have no client).
        self.connected = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    @property
    def keeps_key_order(self) -> bool:
        return keeps_key_order(self.adapter)

    async def connect(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._connect_loop(), name=f"connect-{self.name}")

    async def _connect_loop(self) -> None:
        attempt = 0
        while True:
            attempt += 1
            try:
                await self.adapter.connect()
            except Exception as exc:
                delay = self._backoff.delay(attempt)
                log.warning(
                    "broker_unreachable",
                    broker=self.name,
                    attempt=attempt,
                    retry_in_s=round(delay, 2),
                    error=first_line(exc),
                )
                await asyncio.sleep(delay)
                continue
            log.info("broker_connected", broker=self.name)
            self.connected.set()
            return

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        if self.connected.is_set():
            try:
                await self.adapter.close()
            except Exception as exc:
                log.warning("broker_close_failed", broker=self.name, error=repr(exc))

    async def ready(self) -> bool:
        return self.connected.is_set() and await self.adapter.ready()

    async def publish(self, batch: Sequence[OutgoingMessage]) -> Sequence[PublishResult]:
        if not self.connected.is_set():
            return [PublishResult.unavailable(f"broker {self.name!r} not connected yet")] * len(batch)
        return await self.adapter.publish(batch)
