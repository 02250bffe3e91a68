"""Awaiting something that may take forever (a connection retried while the database
is away, the next part of a WAL stream) unless the relay is told to stop first: a
SIGTERM must end the process promptly whatever it waits for."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable
from typing import TypeVar

T = TypeVar("T")


async def until_stopped(coro: Awaitable[T], stop: asyncio.Event) -> T | None:
    """Await `coro` unless `stop` is set first: then cancel it and return None (so
    `coro` must not return None itself). Cancelled while waiting, it cancels `coro`
    too: nothing it started outlives the caller."""
    task = asyncio.ensure_future(coro)
    stopper = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({task, stopper}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:
        task.cancel()
        raise
    finally:
        stopper.cancel()
    if task.done():
        return task.result()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    return None
