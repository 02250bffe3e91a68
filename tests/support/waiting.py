"""Waiting for a condition instead of sleeping: `wait_until` in a test's event loop,
`wait_for` in blocking code (subprocess relays, threads).

A test never sleeps a fixed time before it asserts: it waits for a positive signal
(the relay recorded the outcome, a later message arrived, a log line appeared), and a
negative assertion ("not delivered") comes after such a signal.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any


async def wait_until(
    predicate: Callable[[], Any], *, timeout: float = 20.0, interval: float = 0.02, what: str = "condition"
) -> None:
    """Poll `predicate` (a function, or one returning a coroutine) until truthy; fail
    naming `what` after `timeout` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        value = predicate()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return
        if loop.time() > deadline:
            raise AssertionError(f"{what} not met within {timeout}s")
        await asyncio.sleep(interval)


def wait_for(
    predicate: Callable[[], Any], timeout: float = 60.0, what: str = "condition", *, interval: float = 0.1
) -> None:
    """Poll `predicate` until truthy, blocking; fail naming `what` after `timeout` seconds.

    Its predicates often open a database connection each (the fault and replica tests):
    every 0.1 s keeps that load small on a 2-core CI machine during an outage."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not met within {timeout}s")
        time.sleep(interval)
