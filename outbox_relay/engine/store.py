"""The SQL side of one batch: claim rows, then record their outcomes.

A batch lives in one transaction on one connection: the claim's row locks (FOR
UPDATE SKIP LOCKED) are held while the brokers are called and dropped at commit,
right after the outcomes are written. A relay that dies mid-batch loses its
connection, Postgres rolls the transaction back, and the rows are claimable again
at once: nothing is stranded and no lease needs to expire.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import psycopg

from outbox_relay.models import Message, Record, RecordKind
from outbox_relay.sqlfiles import Queries


def _message(row: Sequence[Any]) -> Message:
    # Rows come in binary format: ids, uuids and bytea need no text parsing. A row whose
    # payload was left in the database (too large) comes with its size only.
    mid, message_id, topic, key, payload, content_type, headers, attempts, created_at, size = row
    return Message(
        mid,
        message_id,
        topic,
        key,
        b"" if payload is None else payload,
        content_type,
        headers or _NO_HEADERS,
        attempts,
        created_at,
        size,
    )


_NO_HEADERS: Mapping[str, str] = MappingProxyType({})

# No relay.max_payload_bytes: a bound no payload reaches (PostgreSQL's bytea stops at 1 GB).
NO_LIMIT = 2**62


def _within_budget(rows: Sequence[Sequence[Any]], max_payload: int) -> list[Sequence[Any]]:
    """The claimed rows up to the first one past the batch's byte budget (its payload did
    not come back though it is not too large); the rest stay pending, untouched."""
    kept = []
    for row in rows:
        if row[4] is None and row[9] <= max_payload:
            break
        kept.append(row)
    return kept


def _unbroken_runs(rows: Sequence[Sequence[Any]], limit: int) -> list[Message]:
    """From each locked key's rows (head first, then its later rows; all in id order),
    keep the run that is due without a break, and at most `limit` messages in all.

    Taking rows in id order and stopping at the limit keeps every key's share a prefix
    of its run, so nothing of a key is sent ahead of an earlier message of it."""
    kept: list[Message] = []
    broken: set[str] = set()
    for row in rows:
        key, due = row[3], row[10]
        if key in broken:
            continue
        if not due:
            broken.add(key)
            continue
        kept.append(_message(row[:10]))
        if len(kept) >= limit:
            break
    return kept


# PostgreSQL's timeouts are ints of milliseconds: a longer one (a timeout of "30d",
# meant as "never") would make every batch's first statement fail.
MAX_TIMEOUT_MS = 2**31 - 1


def milliseconds(seconds: float) -> int:
    """`seconds` as a PostgreSQL timeout setting: whole milliseconds, at least 1, capped."""
    return min(MAX_TIMEOUT_MS, max(1, int(seconds * 1000)))


@dataclass
class Walk:
    """What a key walk found: due heads' ids, in walk order; whether it stopped short of
    the last key (another claim may find more at once); and whether it saw every key
    with a pending row (it went all the way round), so `heads` are all the due heads."""

    heads: list[int]
    more: bool
    whole: bool


@dataclass
class Claim:
    """One claim's messages, and whether the key walk stopped before it had looked at
    every key (it visits at most a few times the batch size): if so, another claim
    right away may find more even when this one found nothing."""

    messages: list[Message]
    more_keys: bool = False


class OutboxStore:
    """Claims and records batches; one per relay process, shared by its workers.

    Keys are claimed round-robin: a cursor (a key) says where the next walk over the
    keys starts, so under a backlog every key gets its turn and no key starves. The
    workers of one process take turns walking (an asyncio lock around the walk), so
    they advance the cursor instead of racing each other for the same heads; each then
    locks what it found on its own, so one that waits for a row lock stalls no other.
    """

    # A walk visits at most this many keys per message of the batch: bounds a claim's
    # cost when most keys are waiting (a broker outage), at the price of a few more,
    # still cheap, claims to find the keys that are not.
    VISITS_PER_SLOT = 4

    def __init__(
        self,
        queries: Queries,
        *,
        hold_dead_letters: bool,
        workers: int = 1,
        max_batch_bytes: int = NO_LIMIT,
        max_payload_bytes: int | None = None,
        idle_in_transaction_timeout: float | None = None,
        statement_timeout: float | None = None,
        keep_dispatched: bool = True,
        feed_dead_letters: bool = True,
    ):
        self._q = queries
        # relay.retention 0s keeps no dispatched row: the acked rows are deleted in the
        # statement that would mark them (schema/queries.sql, delete_dispatched).
        self._keep = keep_dispatched
        self._mark = self._q["mark_dispatched" if keep_dispatched else "delete_dispatched"]
        # With the acked rows' receipts (relay.receipts; kept rows only).
        self._mark_receipts = self._q["mark_dispatched_receipts"]
        # The same, writing `delivered` outcomes too: only for a batch that has some.
        self._mark_feeding = self._q["mark_dispatched_feeding" if keep_dispatched else "delete_dispatched_feeding"]
        # outcomes.dead_lettered: each dead letter's outcome row (record_outcomes_feeding);
        # set at start once the role is known to be granted it (engine/outcomes.py).
        self.feed_dead_letters = feed_dead_letters
        # None: the server's idle_in_transaction_session_timeout applies to batches.
        self._idle_ms = None if idle_in_transaction_timeout is None else milliseconds(idle_in_transaction_timeout)
        # None: the server's statement_timeout applies to the batch's statements.
        self._statement_ms = None if statement_timeout is None else milliseconds(statement_timeout)
        self._hold = hold_dead_letters
        self._max_bytes = max_batch_bytes
        self._max_payload = NO_LIMIT if max_payload_bytes is None else max_payload_bytes
        # A claim takes at most its share of the keys it finds, so that with a hundred hot
        # keys the other workers of this process find keys of their own instead of the
        # heads this one holds; a hot key still fills a whole batch alone. (The share
        # counts this process's workers only: with several replicas, the first to claim
        # may still take every key of a small keyspace while its batch is out.)
        self._workers = max(1, workers)
        self._cursor = ""  # keys are 1+ characters, so "" is before every key
        self._walking = asyncio.Lock()
        self._keyless_first = False

    async def claim(self, conn: psycopg.AsyncConnection[Any], limit: int) -> Claim:
        """Lock and return up to `limit` publishable messages (inside the batch's transaction).

        Keyed and keyless messages share the batch; which kind is claimed first
        alternates, so neither starves the other.

        The claim's first statement sets up the rest of the transaction (batch_settings
        in queries.sql, transaction-local: a pooler in transaction mode shares server
        sessions). Its planner settings plan every statement on its index whatever the
        table's statistics. The outbox is a queue: its statistics describe the table as
        it was at the last ANALYZE, not as it is (a keyless backlog analyzed, then keyed
        rows arriving; a backlog drained since). With them, and the generic plans psycopg
        prepares, the planner priced the key walk's "next key after this one" as a range
        of a third of the table and chose a sequential or parallel bitmap scan plus a
        sort, or JIT compilation (280 ms per walk on 1,000,000 rows, a keyless drain of
        4,300 msg/s instead of 30,000). Every statement of a batch is written for an
        index path (queries.sql); the settings take the alternatives away: no sequential
        or bitmap scans (the cost of each becomes prohibitive, so the index is chosen
        whenever one applies), no parallel workers, no JIT.
        """
        await conn.execute(self._q["batch_settings"], {"idle_ms": self._idle_ms, "statement_ms": self._statement_ms})
        # This claim's order, read once: the workers share the store, and another
        # worker's claim flips the shared toggle while this one awaits its statements.
        # Read again after an await, it made a keyed-first claim skip its keyless rows
        # (an empty claim mid-drain: the worker slept a poll interval, a third of a
        # keyless drain's throughput lost) or a keyless-first claim take keyless rows
        # twice (a batch over batch_size). tests/integration/test_claim.py.
        keyless_first = self._keyless_first = not self._keyless_first
        keyless: list[Message] = []
        keyed = Claim([])
        budget = self._max_bytes
        if keyless_first:
            keyless = await self._claim_keyless(conn, limit, budget)
            budget -= sum(len(m.payload) for m in keyless)
        if len(keyless) < limit and budget > 0:
            keyed = await self._claim_keyed(conn, limit - len(keyless), budget)
            budget -= sum(len(m.payload) for m in keyed.messages)
        if not keyless_first and len(keyed.messages) < limit and budget > 0:
            keyless = await self._claim_keyless(conn, limit - len(keyed.messages), budget)
        messages = keyed.messages + keyless
        messages.sort(key=lambda m: m.id)
        return Claim(messages, keyed.more_keys)

    async def _claim_keyless(self, conn: psycopg.AsyncConnection[Any], limit: int, budget: int) -> list[Message]:
        cur = await conn.execute(
            self._q["claim_keyless"],
            {"limit": limit, "max_bytes": budget, "max_payload": self._max_payload},
            binary=True,
        )
        return [_message(row) for row in _within_budget(await cur.fetchall(), self._max_payload)]

    async def _claim_keyed(self, conn: psycopg.AsyncConnection[Any], limit: int, budget: int) -> Claim:
        async with self._walking:
            walk = await self._walk(conn, -(-limit // self._workers), limit * self.VISITS_PER_SLOT)
        # The walking lock covers the walk only: claim_runs can wait on a row lock (a run
        # another relay holds after a requeue under `release`, for as long as its batch
        # lasts), and the other workers must not wait with it. They walk on from the
        # cursor this walk moved, so they look at other keys; where walks overlap (one
        # that wrapped round), the heads' SKIP LOCKED gives each head to one claim.
        if not walk.heads:
            return Claim([], walk.more)
        # A walk that saw every key knows all the due keys there are: fewer than the
        # walk's limit (a hundred keys, each with a deep backlog). Taking them all left
        # the other workers nothing while this batch was out (their claims came back
        # empty and they slept a poll interval: one worker drained alone), so a claim
        # takes its share of them, the oldest heads not locked, and their runs go
        # deeper instead. The other workers lock the rest meanwhile.
        heads = len(walk.heads) if not walk.whole else max(1, -(-len(walk.heads) // self._workers))
        # A share of the batch per key: one hot key fills it alone, a hundred keys
        # bring a few messages each. Rows past a share wait for the next batch.
        per_key = max(1, -(-limit // heads))
        cur = await conn.execute(
            self._q["claim_runs"],
            {
                "head_ids": walk.heads,
                "max_heads": heads,
                "hold_dead_letters": self._hold,
                "per_key": per_key,
                "max_bytes": budget,
                "max_payload": self._max_payload,
            },
            binary=True,
        )
        rows = await cur.fetchall()
        return Claim(_unbroken_runs(_within_budget(rows, self._max_payload), limit), walk.more)

    async def _walk(self, conn: psycopg.AsyncConnection[Any], limit: int, budget: int) -> Walk:
        """Head ids of up to `limit` keys with a due head, from the cursor on (see Walk).

        A walk that reaches the last key wraps round to the first and goes on up to where
        it began, and reports False: the relay then waits for a wake-up, so a keyspace
        where every key waits (a broker outage) is walked once per wake-up, not in a loop.
        """
        start = self._cursor
        rows = await self._walk_from(conn, start, None, limit, budget)
        heads = [head for _, head, due in rows if due]
        if len(heads) >= limit or len(rows) >= budget:
            self._cursor = rows[-1][0]
            return Walk(heads, more=True, whole=False)
        self._cursor = ""
        stopped_short = False
        if start:
            budget -= len(rows)
            wrapped = await self._walk_from(conn, "", start, limit - len(heads), budget)
            before = [row for row in wrapped if row[0] <= start]
            heads += [head for _, head, due in before if due]
            stopped_short = len(before) == len(wrapped) and (len(heads) >= limit or len(wrapped) >= budget)
            self._cursor = before[-1][0] if stopped_short and before else start
        return Walk(heads, more=False, whole=not stopped_short)

    async def _walk_from(
        self, conn: psycopg.AsyncConnection[Any], after: str, until: str | None, limit: int, budget: int
    ) -> list[tuple[str, int, bool]]:
        cur = await conn.execute(
            self._q["walk_keys"],
            {"after": after, "until": until, "limit": limit, "max_visits": budget, "hold_dead_letters": self._hold},
        )
        return [(str(key), int(head), bool(due)) for key, head, due in await cur.fetchall()]

    async def record(
        self, conn: psycopg.AsyncConnection[Any], records: Sequence[Record], feed: Sequence[int] = ()
    ) -> None:
        """Write the batch's outcomes (inside its transaction): one statement marks every
        acked row dispatched (or deletes them: retention 0s); failures, when there are
        any, take a second one. `feed`: ids whose delivery the application asked to hear
        of (outcomes.delivered), written to the outcomes table by the marking statement
        itself; dead letters are written there by the second one (outcomes.dead_lettered)."""
        acked_records = [r for r in records if r.kind is RecordKind.ACKED]
        failed = [r for r in records if r.kind is not RecordKind.ACKED]
        if acked_records:
            acked = [r.id for r in acked_records]
            # Receipts are kept with dispatched rows only (retention 0s deletes them), as
            # one text of a line each (queries.sql, mark_dispatched_receipts says why).
            has_receipts = self._keep and any(r.receipt for r in acked_records)
            receipts = "\n".join(r.receipt or "" for r in acked_records) if has_receipts else ""
            fed = set(feed).intersection(acked)
            params: dict[str, Any] = {"ids": acked, "receipts": receipts}
            if fed:
                params["feed_ids"] = sorted(fed)
                await conn.execute(self._mark_feeding, params, binary=True)
            elif has_receipts:
                await conn.execute(self._mark_receipts, params, binary=True)
            else:
                await conn.execute(self._mark, params, binary=True)
        if failed:
            feeding = self.feed_dead_letters and any(r.kind is RecordKind.DEAD for r in failed)
            await conn.execute(
                self._q["record_outcomes_feeding" if feeding else "record_outcomes"],
                {
                    "ids": [r.id for r in failed],
                    "outcomes": [r.kind.value for r in failed],
                    "errors": [r.error for r in failed],
                    "delays": [r.delay for r in failed],
                },
            )
