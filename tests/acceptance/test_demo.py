"""`outbox-relay demo` as a user runs it: a real process, its stdout and its stderr.

Stdout is checked on its own terms (the JSON lines a consumer would read), not only
through the summary the demo prints about itself.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from typing import Any

import psycopg

from tests.support.cli import exe

ORDERS = 60
ROLLBACK_EVERY = 4
COMMITTED = ORDERS - ORDERS // ROLLBACK_EVERY  # 45
ROLLED_BACK = ORDERS // ROLLBACK_EVERY  # 15


def _run_demo(*extra: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "OUTBOX_DEMO_DSN"}
    return subprocess.run(
        [*exe(), "demo", "--orders", str(ORDERS), "--rollback-every", str(ROLLBACK_EVERY), *extra],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        check=False,
    )


def _json_lines(stdout: str) -> list[dict[str, Any]]:
    records = []
    for number, line in enumerate(stdout.splitlines(), 1):
        try:
            records.append(json.loads(line))
        except ValueError:
            raise AssertionError(f"stdout line {number} is not JSON: {line!r}") from None
    return records


def _check_published(records: list[dict[str, Any]]) -> None:
    assert {r["topic"] for r in records} == {"orders.created"}
    assert len({r["message_id"] for r in records}) == COMMITTED
    numbers = [r["payload"]["order_no"] for r in records]
    # Order numbers that are multiples of ROLLBACK_EVERY were rolled back: none may appear.
    assert sorted(set(numbers)) == [n for n in range(1, ORDERS + 1) if n % ROLLBACK_EVERY]
    by_key: dict[str, list[int]] = {}
    for record in records:
        assert record["key"] == record["payload"]["customer"]
        by_key.setdefault(record["key"], []).append(record["payload"]["order_no"])
    for key, seen in by_key.items():
        assert seen == sorted(seen), f"{key}: published out of enqueue order: {seen}"


def _check_summary(stderr: str, order: str = "enqueue") -> None:
    committed = rf"orders committed\s+{COMMITTED}\s+\(messages published: {COMMITTED}\)"
    rolled_back = rf"orders rolled back\s+{ROLLED_BACK}\s+\(messages published: 0\b"
    assert re.search(committed, stderr), stderr
    assert re.search(rolled_back, stderr), stderr
    latency = re.search(r"commit-to-ack latency\s+p50 (-?\d+\.\d) ms\s+p99 (-?\d+\.\d) ms", stderr)
    assert latency, stderr
    p50, p99 = float(latency.group(1)), float(latency.group(2))
    assert 0 <= p50 <= p99, f"commit-to-ack p50 {p50} ms, p99 {p99} ms: a latency cannot be negative"
    assert f"kept their {order} order: yes" in stderr, stderr
    assert "demo failed" not in stderr, stderr


def test_demo_on_embedded_postgres() -> None:
    result = _run_demo()
    assert result.returncode == 0, result.stderr
    _check_published(_json_lines(result.stdout))
    _check_summary(result.stderr)


def test_demo_on_existing_database_leaves_nothing_behind(admin_dsn: str) -> None:
    result = _run_demo("--dsn", admin_dsn)
    assert result.returncode == 0, result.stderr
    _check_published(_json_lines(result.stdout))
    _check_summary(result.stderr)
    used = re.search(r"outbox schema (outbox_demo_\w+)", result.stderr)
    assert used, result.stderr  # it did work in a schema of its own
    with psycopg.connect(admin_dsn) as conn:
        left = conn.execute("SELECT nspname FROM pg_namespace WHERE nspname LIKE 'outbox\\_demo\\_%'").fetchall()
    assert left == []


def _check_through_the_wal(stderr: str) -> None:
    # Counted by the demo in the database, by message id: none of the published messages
    # is a row of the outbox table; they were logical decoding messages in the WAL.
    through = rf"messages through the WAL\s+{COMMITTED}\s+\(committed messages in the outbox table: 0;"
    assert re.search(through, stderr), stderr
    assert "WAL mode: each enqueue writes a logical decoding message, no row" in stderr, stderr


def test_demo_with_the_wal_source_publishes_from_the_wal_and_writes_no_row() -> None:
    result = _run_demo("--source", "wal")
    assert result.returncode == 0, result.stderr
    _check_published(_json_lines(result.stdout))
    _check_summary(result.stderr, order="commit")
    _check_through_the_wal(result.stderr)


def test_demo_with_the_wal_source_on_existing_database_drops_its_slot(admin_dsn: str) -> None:
    result = _run_demo("--source", "wal", "--dsn", admin_dsn)
    assert result.returncode == 0, result.stderr
    _check_published(_json_lines(result.stdout))
    _check_summary(result.stderr, order="commit")
    _check_through_the_wal(result.stderr)
    used = re.search(r"outbox schema (outbox_demo_\w+)", result.stderr)
    assert used, result.stderr
    slot = f"outbox_relay_{used.group(1)}"
    with psycopg.connect(admin_dsn) as conn:
        # A slot left behind would keep the server's WAL for ever.
        assert conn.execute("SELECT count(*) FROM pg_replication_slots WHERE slot_name = %s", (slot,)).fetchone() == (
            0,
        )
        assert conn.execute("SELECT count(*) FROM pg_publication WHERE pubname = %s", (slot,)).fetchone() == (0,)
        assert conn.execute(
            "SELECT count(*) FROM pg_namespace WHERE nspname LIKE %s", (used.group(1) + "%",)
        ).fetchone() == (0,)


def test_demo_refuses_an_unknown_source_in_one_line() -> None:
    result = _run_demo("--source", "kafka")
    assert result.returncode == 2, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.lower().startswith("error")]
    assert errors == [
        "error: invalid value for '--source': 'kafka' is not one of 'table', 'wal'; see 'outbox-relay demo --help'"
    ], result.stderr
    assert "starting an embedded PostgreSQL" not in result.stderr and result.stdout == ""
