"""A row too large for the relay's memory: dead-lettered on its size, never read, so
the relay neither crashes on it nor, restarted, on it again (a crash loop that would
stall every key). Run under an address-space limit smaller than the row."""

from __future__ import annotations

import shutil
from pathlib import Path

import psycopg

from outbox_relay import enqueue
from tests.support.cli import RelayProcess, read_jsonl
from tests.support.configs import write_config
from tests.support.waiting import wait_for

ROW_MB = 200
# The relay idles at about 70 MB of address space here; reading the row would take it
# past this limit twice over (libpq's copy of the row, then Python's).
LIMIT_MB = 330


def test_a_200_mb_row_under_a_memory_limit_is_dead_lettered_and_later_rows_flow(db: str, tmp_path: Path) -> None:
    prlimit = shutil.which("prlimit")
    assert prlimit, "prlimit (util-linux) is needed: scripts/test installs it"
    with psycopg.connect(db) as conn:
        enqueue(conn, "orders", b"before", key="k")
        # Built in the server, so the test process does not hold 200 MB either.
        conn.execute(
            "SELECT outbox.enqueue_binary('orders', 'k', convert_to(repeat('x', %s), 'UTF8'))", (ROW_MB * 1024 * 1024,)
        )
        for i in range(20):
            enqueue(conn, "orders", f"k-{i}".encode(), key="k")
            enqueue(conn, "orders", f"other-{i}".encode(), key=f"other-{i % 3}")
            enqueue(conn, "orders", f"keyless-{i}".encode())
        conn.commit()
    sink = tmp_path / "out.jsonl"
    config = write_config(tmp_path / "relay.yaml", db, sink=sink)  # max_payload_bytes: its default
    # One malloc arena: the limit then measures the relay's data, not arenas reserved per thread.
    limit = [prlimit, f"--as={LIMIT_MB * 1024 * 1024}", "--"]
    relay = RelayProcess(config, env={"MALLOC_ARENA_MAX": "1"}, prefix=limit)
    try:
        wait_for(lambda: len(read_jsonl(sink)) == 61 or relay.proc.poll() is not None, 60, "the small rows delivered")
        assert relay.proc.poll() is None, f"relay died: {relay.log_path.read_text()[-1500:]}"
        assert relay.terminate() == 0
    finally:
        relay.close()
    delivered = [line["key"] for line in read_jsonl(sink)]
    assert delivered.count("k") == 21, "the key's messages before and after the huge row went (release)"
    with psycopg.connect(db) as conn:
        row = conn.execute(
            "SELECT dead_letter_reason, octet_length(payload) FROM outbox.messages WHERE dead_lettered_at IS NOT NULL"
        ).fetchall()
    assert row == [
        (
            f"payload too large: {ROW_MB * 1024 * 1024} bytes > relay.max_payload_bytes ({64 * 1024 * 1024})",
            ROW_MB * 1024 * 1024,
        )
    ]
