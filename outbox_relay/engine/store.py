"""The SQL side of one batch: claim rows, then record their outcomes.

A batch lives in one transaction on one connection: the claim's row locks (FOR
UPDATE SKIP LOCKED) are held while the brokers are called and dropped at commit,
right after the outcomes are written. A relay that dies mid-batch loses its
connection, Postgres rolls the transaction back, and the rows are claimable again
at once: nothing is stranded and no lease needs to expire.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Literal

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
    # Where it went, for metrics and logs (None: no route); not part of what is written.
    broker: str | None = field(default=None, compare=False)
    destination: str | None = field(default=None, compare=False)


def _message(row: Sequence[Any]) -> Message:
    # Rows come in binary format: ids, uuids and bytea need no text parsing.
    mid, message_id, topic, key, payload, content_type, headers, attempts, created_at = row
    return Message(mid, message_id, topic, key, payload, content_type, headers or _NO_HEADERS, attempts, created_at)


_NO_HEADERS: Mapping[str, str] = MappingProxyType({})


class OutboxStore:
    def __init__(self, queries: Queries, *, hold_dead_letters: bool):
        self._q = queries
        self._hold = hold_dead_letters

    async def claim(self, conn: psycopg.AsyncConnection[Any], limit: int) -> list[Message]:
        """Lock and return up to `limit` publishable messages, in enqueue order.

        Must run inside the batch's transaction.
        """
        cur = await conn.execute(
            self._q["claim_heads"], {"limit": limit, "hold_dead_letters": self._hold}, binary=True
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
        cur = await conn.execute(self._q["claim_ids"], {"ids": ids}, binary=True)
        locked = {m.id: m for m in (_message(row) for row in await cur.fetchall())}
        claimed: list[Message] = []
        for run in wanted.values():
            for fid in run:
                if fid not in locked:
                    break  # someone else holds it: the rest of this run must wait
                claimed.append(locked[fid])
        return claimed

    async def record(self, conn: psycopg.AsyncConnection[Any], records: Sequence[Record]) -> None:
        """Write the batch's outcomes (inside its transaction): one statement marks every
        acked row dispatched; failures, when there are any, take a second one."""
        acked = [r.id for r in records if r.kind == "acked"]
        failed = [r for r in records if r.kind != "acked"]
        if acked:
            await conn.execute(self._q["mark_dispatched"], {"ids": acked}, binary=True)
        if failed:
            await conn.execute(
                self._q["record_outcomes"],
                {
                    "ids": [r.id for r in failed],
                    "outcomes": [r.kind for r in failed],
                    "errors": [r.error for r in failed],
                    "delays": [r.delay for r in failed],
                },
            )
