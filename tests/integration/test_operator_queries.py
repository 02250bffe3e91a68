"""The queries behind `status` and `dead-letters list|show` read through indexes: with
sequential scans off no plan reads the outbox through, whatever retention keeps."""

from __future__ import annotations

import uuid

import psycopg
import pytest

from outbox_relay.sqlfiles import Queries

PARAMS = {
    "topic_regex": None,
    "key": None,
    "since": None,
    "reason": None,
    "until": None,
    "limit": 100,
    "cap": 10_001,
    "message_id": uuid.uuid4(),
}


@pytest.mark.parametrize(
    ("query", "key", "index"),
    [
        ("status_behind_dead_letters", None, "messages_keyed_pending_idx"),
        ("dead_letters_list", None, "messages_dead_letters"),
        ("dead_letters_list", "k", "messages_dead_letters"),
        ("console_dead_letters_count", None, "messages_dead_letters"),
        ("console_dead_letters_count", "k", "messages_dead_letters"),
        ("dead_letters_of_message", None, "messages_dead_letters"),
    ],
)
def test_operator_queries_read_through_their_index(db: str, query: str, key: str | None, index: str) -> None:
    with psycopg.connect(db) as conn:
        # Rows of every kind, so that the planner has something to choose between.
        conn.execute(
            "INSERT INTO outbox.messages (topic, key, payload, dispatched_at, dead_lettered_at, dead_letter_reason) "
            "SELECT 't', 'k' || (g % 50), '\\x7b7d', CASE WHEN g % 3 = 0 THEN now() END, "
            "CASE WHEN g % 7 = 0 AND g % 3 <> 0 THEN now() END, 'x' FROM generate_series(1, 5000) AS g"
        )
        conn.execute("ANALYZE outbox.messages")
        conn.execute("SET enable_seqscan = off")
        text = Queries("outbox")[query].as_string(conn)
        plan = "\n".join(row[0] for row in conn.execute("EXPLAIN " + text, {**PARAMS, "key": key}))
    assert "Seq Scan" not in plan, plan
    assert index in plan, plan
