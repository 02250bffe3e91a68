"""The SQL side of one batch: claim rows, then record their outcomes.

A batch lives in one transaction on one connection: the claim's row locks (FOR
UPDATE SKIP LOCKED) are held while the brokers are called and dropped at commit,
right after the outcomes are written. A relay that dies mid-batch loses its
connection, Postgres rolls the transaction back, and the rows are claimable again
at once: nothing is stranded and no lease needs to expire.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal
from uuid import UUID

import psycopg

from outbox_relay.models import Message
from outbox_relay.sqlfiles import Queries

RecordKind = Literal["acked", "retry", "wait", "dead"]


@dataclass(frozen=True, slots=True)
class Record:
    """What to write for one attempted message."""

    id: int
    kind: RecordKind
    error: str | None = None
    delay: float = 0.0


def _message(row: Sequence[Any]) -> Message:
    mid, message_id, topic, key, payload, content_type, headers, attempts, created_at = row
    if isinstance(headers, str):
        headers = json.loads(headers)
    return Message(
        id=int(mid),
        message_id=message_id if isinstance(message_id, UUID) else UUID(str(message_id)),
        topic=topic,
        key=key,
        payload=bytes(payload),
        content_type=content_type,
        headers=headers or {},
        attempts=int(attempts),
        created_at=created_at,
    )


class OutboxStore:
    def __init__(self, queries: Queries, *, hold_dead_letters: bool):
        self._q = queries
        self._hold = hold_dead_letters

    async def claim(self, conn: psycopg.AsyncConnection[Any], limit: int) -> list[Message]:
        """Lock and return up to `limit` publishable messages, in enqueue order.

        Must run inside the batch's transaction.
        """
        cur = await conn.execute(
            self._q["claim_heads"], {"limit": limit, "hold_dead_letters": self._hold}
        )
        heads = [_message(row) for row in await cur.fetchall()]
        room = limit - len(heads)
        keyed = [m for m in heads if m.key is not None]
        if room <= 0 or not keyed:
            return heads
        followers = await self._claim_followers(conn, keyed, room)
        return sorted(heads + followers, key=lambda m: m.id)

    async def _claim_followers(
        self, conn: psycopg.AsyncConnection[Any], heads: list[Message], room: int
    ) -> list[Message]:
        # A key's later messages may join the batch only as an unbroken run right after
        # its head: they are published after it, in order, in later waves.
        cur = await conn.execute(
            self._q["follower_candidates"],
            {"keys": [m.key for m in heads], "head_ids": [m.id for m in heads], "limit": room},
        )
        wanted: dict[str, list[int]] = {}
        stopped: set[str] = set()
        for fid, key, dead, due in await cur.fetchall():
            if key in stopped:
                continue
            if dead and not self._hold:
                continue  # released: a dead letter does not hold its key
            if dead or not due:
                stopped.add(key)
                continue
            wanted.setdefault(key, []).append(int(fid))
        ids = [fid for run in wanted.values() for fid in run]
        if not ids:
            return []
        cur = await conn.execute(self._q["claim_ids"], {"ids": ids})
        locked = {m.id: m for m in (_message(row) for row in await cur.fetchall())}
        claimed: list[Message] = []
        for run in wanted.values():
            for fid in run:
                if fid not in locked:
                    break  # someone else holds it: the rest of this run must wait
                claimed.append(locked[fid])
        return claimed

    async def record(self, conn: psycopg.AsyncConnection[Any], records: Sequence[Record]) -> None:
        """Write every outcome of the batch in one statement (inside its transaction)."""
        if not records:
            return
        await conn.execute(
            self._q["record_outcomes"],
            {
                "ids": [r.id for r in records],
                "outcomes": [r.kind for r in records],
                "errors": [r.error for r in records],
                "delays": [r.delay for r in records],
            },
        )
