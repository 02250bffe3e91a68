"""The WAL source's relay in the test's event loop: frames committed with known ids and
keys, a dispatcher built as the table engine builds its own, and `running_wal_relay`."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import psycopg

from outbox_relay.adapter import Adapter
from outbox_relay.config import Config
from outbox_relay.engine.dispatch import Dispatcher
from outbox_relay.engine.retry import Backoff
from outbox_relay.engine.routing import Router
from outbox_relay.sources.wal import framing, pgoutput
from outbox_relay.sources.wal.relay import WalRelay
from tests.support.wal import PREFIX, WalSlot


@dataclass(frozen=True)
class Emitted:
    message_id: uuid.UUID
    key: str | None
    payload: bytes


def commit_frames(
    dsn: str, items: Sequence[tuple[str | None, bytes]], *, topic: str = "orders.created", rollback: bool = False
) -> list[Emitted]:
    """One transaction of a logical message per (key, payload), in order, committed
    (or rolled back); what it emitted. One statement for all: a 100,000-message
    transaction takes a second, not a round trip per message."""
    emitted = [Emitted(uuid.uuid4(), key, payload) for key, payload in items]
    frames = [framing.encode(e.message_id, topic, e.key, "application/octet-stream", "{}", e.payload) for e in emitted]
    with psycopg.connect(dsn) as conn:
        conn.execute(
            "SELECT count(pg_logical_emit_message(true, %s, f)) FROM unnest(%s::bytea[]) AS f",
            (PREFIX, frames),
        )
        if rollback:
            conn.rollback()
    return emitted


def commit_frames_in(conn: psycopg.Connection[Any], key: str | None, payload: bytes) -> uuid.UUID:
    """One transaction of one logical message on `conn`, committed: its message id."""
    message_id = uuid.uuid4()
    frame = framing.encode(message_id, "orders.created", key, "application/octet-stream", "{}", payload)
    conn.execute("SELECT pg_logical_emit_message(true, %s, %s::bytea)", (PREFIX, frame))
    conn.commit()
    return message_id


def dispatcher_for(config: Config, adapters: Mapping[str, Adapter]) -> Dispatcher:
    """The dispatcher the table engine would build from `config` (engine/relay.py)."""
    relay = config.relay
    return Dispatcher(
        adapters,
        Router(config.routes, config.claim_check),
        Backoff.from_config(relay),
        max_attempts=relay.max_attempts,
        publish_timeout=relay.publish_timeout,
        max_payload_bytes=relay.max_payload_bytes,
        hold_dead_letters=relay.dead_letter_policy == "hold",
    )


def wal_relay(wal: WalSlot, config: Config, adapters: Mapping[str, Adapter], **options: Any) -> WalRelay:
    """A WalRelay of `wal`'s slot for the outbox `config` names, with quick status updates."""
    options.setdefault("status_interval", 0.2)
    return WalRelay(
        wal.dsn,
        schema=config.database.schema_name,
        slot_name=wal.name,
        dispatcher=dispatcher_for(config, adapters),
        hold_dead_letters=config.relay.dead_letter_policy == "hold",
        **options,
    )


@contextlib.asynccontextmanager
async def running_wal_relay(relay: WalRelay) -> AsyncIterator[asyncio.Task[None]]:
    """Run `relay` for the duration of the block; stopped (or, if the test cancelled its
    task, as a crash would leave it: nothing more confirmed) at the end."""
    task = asyncio.create_task(relay.run())
    started = asyncio.create_task(relay.started.wait())
    done, _ = await asyncio.wait({task, started}, timeout=30, return_when=asyncio.FIRST_COMPLETED)
    if task in done:
        started.cancel()
        task.result()  # raises the startup error
    assert started in done, "the WAL relay did not start within 30s"
    try:
        yield task
    finally:
        relay.stop()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait_for(task, timeout=60)


def commit_end_lsns(wal: WalSlot) -> list[int]:
    """The end LSN of every commit the slot holds for us, by the SQL interface (a second
    opinion on the positions a relay confirms). Peeking consumes nothing, but needs the
    slot idle: call it before a relay streams."""
    with psycopg.connect(wal.dsn, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT lsn::text, data FROM pg_logical_slot_peek_binary_changes(%s, NULL, NULL, "
            "'proto_version', '1', 'publication_names', %s, 'messages', 'true')",
            (wal.name, wal.name),
        ).fetchall()
    return [pgoutput.parse_lsn(lsn) for lsn, data in rows if isinstance(pgoutput.decode(bytes(data)), pgoutput.Commit)]
