"""A relay in the test's own event loop: `running_relay`, and what it counts."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Mapping
from typing import Any

from outbox_relay.adapter import Adapter
from outbox_relay.config import Config
from outbox_relay.engine.relay import Relay


@contextlib.asynccontextmanager
async def running_relay(config: Config, adapters: Mapping[str, Adapter], **kwargs: Any) -> AsyncIterator[Relay]:
    """Run a Relay in this event loop for the duration of the block."""
    relay = Relay(config, adapters, **kwargs)
    task = asyncio.create_task(relay.run())
    started = asyncio.create_task(relay.started.wait())
    done, _ = await asyncio.wait({task, started}, timeout=30, return_when=asyncio.FIRST_COMPLETED)
    if task in done:
        started.cancel()
        task.result()  # raises the startup error
    assert started in done, "relay did not start within 30s"
    try:
        yield relay
    finally:
        relay.stop()
        await asyncio.wait_for(task, timeout=60)


def wakeups(relay: Relay, reason: str) -> int:
    """How often the relay's idle workers woke for `reason` (notify, poll or backlog)."""
    return int(relay.metrics.registry.get_sample_value("outbox_relay_wakeups_total", {"reason": reason}) or 0)
