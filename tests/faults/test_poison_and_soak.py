"""A poison message in the middle of one key's sequence, and a soak at a steady rate.

The soak runs `OUTBOX_RELAY_SOAK_SECONDS` (default 30 in the suite; 600 for the long
form: `OUTBOX_RELAY_SOAK_SECONDS=600 scripts/test tests/faults -k soak`).
"""

from __future__ import annotations

import json
import os
import time
import uuid
from pathlib import Path

import psycopg
import pytest

from outbox_relay import enqueue
from outbox_relay.assembly import build_adapters
from tests.consumers import kafka_create_topic, kafka_read
from tests.faults.harness import Writers, check_delivery
from tests.support.cli import RelayProcess, rss_kb
from tests.support.configs import PATIENT, make_config, write_config
from tests.support.outbox import pending, table_stats
from tests.support.relay import running_relay
from tests.support.waiting import wait_for, wait_until


@pytest.mark.parametrize("policy", ["release", "hold"])
async def test_poison_message_mid_key(db: str, kafka_bootstrap: str, policy: str) -> None:
    topic = f"poison-{uuid.uuid4().hex[:8]}"
    await kafka_create_topic(kafka_bootstrap, topic, partitions=3, **{"max.message.bytes": "4096"})
    with psycopg.connect(db) as conn:
        ids = {}
        for n in range(6):
            pad = "x" * (20_000 if n == 2 else 10)  # n=2 is too large for the topic
            ids[n] = str(enqueue(conn, "orders.created", {"key": "poisoned", "n": n, "pad": pad}, key="poisoned"))
            for other in range(5):
                enqueue(conn, "orders.created", {"key": f"other-{other}", "n": n}, key=f"other-{other}")
        conn.commit()
    config = make_config(
        db,
        brokers={"kafka": {"type": "kafka", "bootstrap_servers": kafka_bootstrap}},
        routes=[{"topic": "*", "broker": "kafka", "destination": topic}],
        dead_letter_policy=policy,
    )

    def state() -> dict[str, int]:
        with psycopg.connect(db) as conn:
            rows = conn.execute(
                "SELECT count(*) FILTER (WHERE dispatched_at IS NOT NULL), "
                "count(*) FILTER (WHERE dead_lettered_at IS NOT NULL) FROM outbox.messages"
            ).fetchone()
        assert rows is not None
        return {"dispatched": rows[0], "dead": rows[1]}

    expected_dispatched = 35 if policy == "release" else 32  # hold: n=3..5 of the key wait
    async with running_relay(config, build_adapters(config)):
        await wait_until(lambda: state() == {"dispatched": expected_dispatched, "dead": 1}, timeout=60)
    received = await kafka_read(kafka_bootstrap, topic, expected_dispatched)
    by_key: dict[str, list[int]] = {}
    for r in received:
        body = json.loads(r.payload)
        by_key.setdefault(body["key"], []).append(body["n"])
    for other in range(5):
        assert by_key[f"other-{other}"] == list(range(6)), "other keys are unaffected"
    assert by_key["poisoned"] == ([0, 1, 3, 4, 5] if policy == "release" else [0, 1])
    with psycopg.connect(db) as conn:
        reason = conn.execute(
            "SELECT dead_letter_reason FROM outbox.messages WHERE message_id = %s", (ids[2],)
        ).fetchone()
        held = conn.execute(
            "SELECT count(*) FROM outbox.messages WHERE key = 'poisoned' AND "
            "dispatched_at IS NULL AND dead_lettered_at IS NULL"
        ).fetchone()
    assert reason is not None and "MessageSizeTooLarge" in reason[0]
    assert held == ((0,) if policy == "release" else (3,))


def autovacuum_naptime(dsn: str) -> float:
    with psycopg.connect(dsn) as conn:
        row = conn.execute("SELECT setting::float FROM pg_settings WHERE name = 'autovacuum_naptime'").fetchone()
    assert row is not None
    return float(row[0])


SOAK_SECONDS = float(os.environ.get("OUTBOX_RELAY_SOAK_SECONDS", "30"))


@pytest.mark.timeout(int(SOAK_SECONDS) + 240)
async def test_soak_memory_flat_and_table_bounded(db: str, kafka_bootstrap: str, tmp_path: Path) -> None:
    seconds = SOAK_SECONDS
    retention = 3.0
    topic = f"soak-{uuid.uuid4().hex[:8]}"
    await kafka_create_topic(kafka_bootstrap, topic)
    brokers = {"kafka": {"type": "kafka", "bootstrap_servers": kafka_bootstrap}}
    config = write_config(
        tmp_path / "relay.yaml",
        db,
        brokers=brokers,
        routes=[{"topic": "*", "broker": "kafka", "destination": topic}],
        timing=PATIENT,
        retention=f"{retention:g}s",
    )
    relay = RelayProcess(config)
    writers = Writers(db, "orders.created", count=2, pause=0.01).start()
    samples: list[tuple[float, int, int, int, int]] = []  # (t, rss kB, rows, dead, bytes)
    started = time.monotonic()
    try:
        relay.wait_started()
        while (elapsed := time.monotonic() - started) < seconds:
            time.sleep(min(2.0, seconds / 15))  # the sampling interval
            samples.append((elapsed, rss_kb(relay.proc.pid), *table_stats(db)))
        ledger = writers.stop()
        wait_for(lambda: pending(db) == 0, 60, "every message dispatched")
        assert relay.terminate() == 0
    finally:
        writers.stop()
        relay.close()
    rate = len(ledger.committed) / seconds
    third = max(1, len(samples) // 3)
    warm, late = samples[:third], samples[-third:]
    # Memory flat: after warm-up the relay's RSS does not keep growing.
    assert max(s[1] for s in late) <= max(s[1] for s in warm) * 1.10 + 8 * 1024, samples
    # Rows bounded by retention: about rate x (retention + its cleanup interval), never the whole run.
    row_bound = rate * (retention + 5) + 500
    assert max(s[2] for s in late) <= row_bound, (row_bound, samples)
    # Size and dead tuples do not grow with the run's length: vacuum keeps up.
    assert max(s[4] for s in late) <= max(s[4] for s in samples[: 2 * third]) * 1.5 + 512 * 1024, samples
    # Each message leaves two dead tuples (the dispatch update, the retention delete);
    # autovacuum removes them every naptime, so at most a naptime and a retention's worth.
    naptime = autovacuum_naptime(db)
    assert max(s[3] for s in late) <= 2 * rate * (naptime + retention + 10) + 2000, (naptime, samples)
    received = await kafka_read(kafka_bootstrap, topic, len(ledger.committed), timeout=60)
    check_delivery(received, ledger)
    print(
        f"soak {seconds:.0f}s: {rate:.0f} msg/s, rss {samples[0][1]}->{samples[-1][1]} kB, "
        f"rows max {max(s[2] for s in samples)}, dead max {max(s[3] for s in samples)}"
    )
