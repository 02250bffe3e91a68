"""Delivery receipts: where each dispatched message landed, written by the statement that
marks it, read back by `outbox.receipt(message_id)` and `outbox-relay status
--message-id`. The adapters' own words are checked against their real brokers by the
contract suite (tests/contract/test_adapter_contract.py, ..._says_where_its_message_landed)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import sql

from outbox_relay import enqueue
from outbox_relay.models import OutgoingMessage, PublishResult
from outbox_relay.testing import FakeAdapter
from tests.support.cli import run_cli
from tests.support.configs import make_config, write_config
from tests.support.databases import role_with_grants
from tests.support.outbox import count
from tests.support.relay import running_relay
from tests.support.waiting import wait_until


def kafka_like(out: OutgoingMessage) -> PublishResult:
    """Acks as a Kafka adapter does: a partition and an offset per message."""
    return PublishResult.acked(f'{{"partition":{len(out.message.payload) % 3},"offset":{out.message.id * 10}}}')


def receipts(dsn: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(dsn) as conn:
        return conn.execute("SELECT id, message_id, receipt FROM outbox.messages ORDER BY id").fetchall()


async def test_each_dispatched_message_keeps_its_broker_destination_and_the_brokers_words(db: str) -> None:
    with psycopg.connect(db) as conn:
        ids = [enqueue(conn, "orders.created", {"n": n}, key=f"k{n % 2}" if n % 3 else None) for n in range(20)]
        conn.commit()
    config = make_config(
        db,
        brokers={"events": {"type": "stdout"}},
        routes=[{"topic": "orders.*", "broker": "events", "destination": "orders"}],
    )
    async with running_relay(config, {"events": FakeAdapter(script=kafka_like)}):
        await wait_until(lambda: count(db, "dispatched_at IS NULL") == 0)
    rows = receipts(db)
    assert [r[1] for r in rows] == ids
    for row_id, _, receipt in rows:
        assert receipt["broker"] == "events" and receipt["destination"] == "orders"
        assert receipt["offset"] == row_id * 10 and receipt["partition"] in (0, 1, 2)
    # The application's role reads it by message id, with when and after how many tries.
    with role_with_grants(db, "producer", "app") as app_dsn, psycopg.connect(app_dsn) as app:
        [(found,)] = app.execute("SELECT outbox.receipt(%s)", (ids[4],)).fetchall()
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            app.execute("SELECT receipt FROM outbox.messages")
    assert {k: found[k] for k in ("broker", "destination", "offset", "attempts")} == {
        "broker": "events",
        "destination": "orders",
        "offset": rows[4][0] * 10,
        "attempts": 1,
    }
    assert found["dispatched_at"]


async def test_an_adapter_without_words_still_gets_its_broker_and_destination(db: str) -> None:
    with psycopg.connect(db) as conn:
        enqueue(conn, "t", {"n": 1})
        conn.commit()
    async with running_relay(make_config(db), {"main": FakeAdapter()}):
        await wait_until(lambda: count(db, "dispatched_at IS NULL") == 0)
    assert [r[2] for r in receipts(db)] == [{"broker": "main", "destination": "t"}]


async def test_with_receipts_off_nothing_is_kept(db: str) -> None:
    with psycopg.connect(db) as conn:
        message_id = enqueue(conn, "t", {"n": 1})
        conn.commit()
    async with running_relay(make_config(db, receipts=False), {"main": FakeAdapter(script=kafka_like)}):
        await wait_until(lambda: count(db, "dispatched_at IS NULL") == 0)
    assert [r[2] for r in receipts(db)] == [None]
    with psycopg.connect(db) as conn:
        [(found,)] = conn.execute("SELECT outbox.receipt(%s)", (message_id,)).fetchall()
    assert set(found) == {"dispatched_at", "attempts"}


class ThirdPartyAdapter(FakeAdapter):
    """An adapter from outside this package, answering `words` for every message."""

    words: str = "{}"

    async def publish(self, batch: Sequence[OutgoingMessage]) -> Sequence[PublishResult]:
        await super().publish(batch)
        return [PublishResult.acked(self.words) for _ in batch]


@pytest.mark.parametrize(
    "words",
    [
        "partition 3, offset 7",  # not JSON
        '{"offset": NaN}',  # JSON to Python, not to PostgreSQL
        '{"note": "a\\u0000b"}',  # a NUL, which jsonb refuses
        "[1, 2]",  # not an object
        ' {"offset": 7}',  # fine once parsed, but not spliceable as text
    ],
)
async def test_a_receipt_postgresql_would_refuse_is_left_out_and_the_message_still_marked(db: str, words: str) -> None:
    # Written as is, it would fail the mark and the batch would go again forever.
    with psycopg.connect(db) as conn:
        enqueue(conn, "t", {"n": 1})
        conn.commit()
    adapter = ThirdPartyAdapter()
    adapter.words = words
    async with running_relay(make_config(db), {"main": adapter}):
        await wait_until(lambda: count(db, "dispatched_at IS NULL") == 0)
    [receipt] = [r[2] for r in receipts(db)]
    if words.strip().startswith("{") and "NaN" not in words and "u0000" not in words:
        assert receipt == {"broker": "main", "destination": "t", "offset": 7}
    else:
        assert receipt == {"broker": "main", "destination": "t"}


async def test_a_third_party_receipt_cannot_overwrite_the_broker_or_destination(db: str) -> None:
    with psycopg.connect(db) as conn:
        enqueue(conn, "t", {"n": 1})
        conn.commit()
    adapter = ThirdPartyAdapter()
    adapter.words = '{"broker": "elsewhere", "destination": "x", "offset": 9}'
    async with running_relay(make_config(db), {"main": adapter}):
        await wait_until(lambda: count(db, "dispatched_at IS NULL") == 0)
    assert [r[2] for r in receipts(db)] == [{"broker": "main", "destination": "t", "offset": 9}]


async def test_receipt_is_null_until_dispatched_and_a_replays_delivery_is_the_latest(db: str) -> None:
    with psycopg.connect(db) as conn:
        message_id = enqueue(conn, "t", {"n": 1})
        conn.commit()
        assert conn.execute("SELECT outbox.receipt(%s)", (message_id,)).fetchone() == (None,)
    offsets = iter([100, 200])
    fake = FakeAdapter(script=lambda out: PublishResult.acked(f'{{"offset":{next(offsets)}}}'))
    async with running_relay(make_config(db), {"main": fake}):
        await wait_until(lambda: count(db, "dispatched_at IS NULL") == 0)
        # A replay's copy: the same message id, delivered again.
        with psycopg.connect(db) as conn:
            conn.execute(
                "INSERT INTO outbox.messages (message_id, topic, payload) SELECT message_id, topic, payload"
                " FROM outbox.messages WHERE message_id = %s",
                (message_id,),
            )
            conn.commit()
        await wait_until(lambda: count(db, "dispatched_at IS NOT NULL") == 2)
    with psycopg.connect(db) as conn:
        [(found,)] = conn.execute("SELECT outbox.receipt(%s)", (message_id,)).fetchall()
    assert found["offset"] == 200


def scans(conn: psycopg.Connection[Any]) -> tuple[dict[str, int], int]:
    """Index scans of the outbox's indexes and sequential scans of messages, as this
    session's statements so far leave them (flushed first)."""
    conn.execute("SELECT pg_stat_force_next_flush()")
    conn.execute("SELECT pg_stat_clear_snapshot()")
    rows = conn.execute(
        "SELECT indexrelname, idx_scan FROM pg_stat_user_indexes WHERE schemaname = 'outbox'"
    ).fetchall()
    seq = conn.execute(
        "SELECT seq_scan FROM pg_stat_user_tables WHERE schemaname = 'outbox' AND relname = 'messages'"
    ).fetchone()
    assert seq is not None
    return {name: count for name, count in rows}, int(seq[0])


def test_outbox_receipt_finds_a_message_by_its_index_not_by_reading_the_table(db: str) -> None:
    with psycopg.connect(db, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO outbox.messages (topic, payload, dispatched_at, receipt)"
            " SELECT 't', '\\x00', now(), '{}' FROM generate_series(1, 20000)"
        )
        conn.execute("ANALYZE outbox.messages")
        row = conn.execute("SELECT message_id FROM outbox.messages LIMIT 1").fetchone()
        assert row is not None
        before, seq_before = scans(conn)
        for _ in range(3):  # the function's plan, whichever the session caches
            assert conn.execute("SELECT outbox.receipt(%s)", row).fetchone() is not None
        after, seq_after = scans(conn)
    used = after["messages_dispatched_message_id_idx"] - before["messages_dispatched_message_id_idx"]
    assert used == 3 and seq_after == seq_before, (before, after, seq_before, seq_after)


def test_requeue_and_purge_of_chosen_ids_probe_the_dead_letters_message_id_index(db: str) -> None:
    # The SECURITY DEFINER functions the CLI and the console call (schema version 15:
    # PL/pgSQL with custom plans): chosen ids are probes of the hash index, not a read of
    # every dead letter through the dead letters' other indexes.
    with psycopg.connect(db, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO outbox.messages (topic, key, payload, dead_lettered_at, dead_letter_reason)"
            " SELECT 't', 'k' || g, '\\x00', now(), 'permanent' FROM generate_series(1, 5000) AS g"
        )
        conn.execute("ANALYZE outbox.messages")
        chosen = [r[0] for r in conn.execute("SELECT message_id FROM outbox.messages ORDER BY id LIMIT 2")]
        before, seq_before = scans(conn)
        for _ in range(6):  # past the 5 custom plans PL/pgSQL makes before it may go generic
            requeued = conn.execute("SELECT * FROM outbox.requeue_dead_letters(%s, NULL, NULL)", ([chosen[0]],))
            assert requeued.fetchall() in ([(chosen[0],)], [])
        purged = conn.execute("SELECT * FROM outbox.purge_dead_letters(%s, NULL, NULL, 100)", ([chosen[1]],))
        assert purged.fetchall() == [(chosen[1],)]
        after, seq_after = scans(conn)
    probes = after["messages_dead_letters_message_id_idx"] - before["messages_dead_letters_message_id_idx"]
    assert probes == 7 and seq_after == seq_before, (before, after)
    # Neither read the dead letters through their (key, id) index (the purge's DELETE
    # then finds its chosen rows by row id: a probe of the by-id index each).
    assert after["messages_dead_letters_idx"] == before["messages_dead_letters_idx"], (before, after)


def lookup_plan(conn: psycopg.Connection[Any], query: str) -> str:
    from outbox_relay.sqlfiles import Queries

    conn.execute("SET LOCAL enable_seqscan = off")
    return "\n".join(
        row[0]
        for row in conn.execute(
            "EXPLAIN " + Queries("outbox")[query].as_string(conn),
            {"message_id": "00000000-0000-0000-0000-000000000001"},
        )
    )


def test_status_message_id_reads_no_table_through(db: str) -> None:
    # Whatever the row's state, each part of the lookup goes through its partial index:
    # dispatched rows and dead letters (schema version 15) by a probe of their message-id
    # index, pending rows through the claim's indexes.
    with psycopg.connect(db) as conn:
        settled = lookup_plan(conn, "message_by_id_settled")
        pending = lookup_plan(conn, "message_by_id_pending")
    assert "Seq Scan" not in settled + pending, (settled, pending)
    assert "messages_dispatched_message_id_idx" in settled and "messages_dead_letters_message_id_idx" in settled
    assert settled.count("Index Cond: (message_id = ") == 2, settled
    assert "messages_keyed_pending_idx" in pending and "messages_keyless_pending_idx" in pending, pending


def test_the_optional_pending_message_id_index_makes_every_part_a_probe(db: str) -> None:
    # The optional index docs/how-to/console.md offers (it costs every enqueue): with
    # it, both pending parts probe it by message id too.
    with psycopg.connect(db) as conn:
        conn.execute(
            "CREATE INDEX messages_pending_message_id_idx ON outbox.messages USING hash (message_id)"
            " WHERE dispatched_at IS NULL AND dead_lettered_at IS NULL"
        )
        plan = lookup_plan(conn, "message_by_id_pending")
    assert "Seq Scan" not in plan, plan
    assert plan.count("messages_pending_message_id_idx") == 2, plan
    assert plan.count("Index Cond: (message_id = ") == 2, plan


async def test_status_message_id_shows_its_state_attempts_and_receipt(db: str, tmp_path: Path) -> None:
    with psycopg.connect(db) as conn:
        sent = enqueue(conn, "orders.created", {"n": 1}, key="a")
        conn.commit()
    async with running_relay(make_config(db), {"main": FakeAdapter(script=kafka_like)}):
        await wait_until(lambda: count(db, "dispatched_at IS NULL") == 0)
    with psycopg.connect(db) as conn:
        waiting = enqueue(conn, "orders.created", {"n": 2}, key="b")
        conn.commit()
    config = write_config(tmp_path / "relay.yaml", db)
    shown = run_cli("status", "--config", str(config), "--message-id", str(sent))
    assert shown.returncode == 0, shown.stderr
    assert "dispatched" in shown.stdout and '"broker": "main"' in shown.stdout and '"offset":' in shown.stdout
    as_json = json.loads(run_cli("status", "--config", str(config), "--message-id", str(sent), "--json").stdout)
    [row] = as_json["rows"]
    assert (row["state"], row["attempts"], row["receipt"]["destination"]) == ("dispatched", 1, "orders.created")
    pending = json.loads(run_cli("status", "--config", str(config), "--message-id", str(waiting), "--json").stdout)
    assert [(r["state"], r["receipt"]) for r in pending["rows"]] == [("pending", None)]
    unknown = run_cli("status", "--config", str(config), "--message-id", "00000000-0000-0000-0000-000000000001")
    assert unknown.returncode == 1
    assert unknown.stderr.strip() == (
        "error: no message 00000000-0000-0000-0000-000000000001 in schema 'outbox'"
        " (never enqueued here, or deleted by retention or a purge)"
    )
    bad = run_cli("status", "--config", str(config), "--message-id", "4711")
    assert bad.returncode == 2 and "'4711' is not a valid UUID" in bad.stderr, bad.stderr


async def test_status_message_id_works_for_a_relay_role_granted_before_wal_receipts(db: str, tmp_path: Path) -> None:
    # A relay role granted before schema version 13 cannot read outbox.wal_receipts: the
    # lookup still shows the table's rows, receipt included, instead of failing.
    with psycopg.connect(db) as conn:
        sent = enqueue(conn, "orders.created", {"n": 1}, key="a")
        conn.commit()
    async with running_relay(make_config(db), {"main": FakeAdapter(script=kafka_like)}):
        await wait_until(lambda: count(db, "dispatched_at IS NULL") == 0)
    with role_with_grants(db, "relay", "old_relay") as dsn:
        with psycopg.connect(db, autocommit=True) as conn:
            role = sql.Identifier(f"old_relay_{conn.info.dbname}")
            conn.execute(sql.SQL("REVOKE SELECT ON outbox.wal_receipts FROM {}").format(role))
        with psycopg.connect(dsn) as conn, pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("SELECT 1 FROM outbox.wal_receipts")
        config = write_config(tmp_path / "relay.yaml", dsn)
        shown = run_cli("status", "--config", str(config), "--message-id", str(sent), "--json")
    assert shown.returncode == 0, shown.stderr
    [row] = json.loads(shown.stdout)["rows"]
    assert row["state"] == "dispatched" and row["receipt"]["broker"] == "main"
