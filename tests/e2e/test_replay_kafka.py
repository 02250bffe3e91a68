"""`outbox-relay replay` against a real Kafka broker: the copies arrive with their
original message id and the replay header, after the originals, in key order."""

from __future__ import annotations

import uuid
from pathlib import Path

import psycopg

from outbox_relay import enqueue
from tests.consumers import kafka_create_topic, kafka_read
from tests.support.cli import RelayProcess, run_cli
from tests.support.configs import write_config
from tests.support.outbox import dispatched
from tests.support.waiting import wait_for


async def test_replayed_messages_reach_kafka_with_their_ids_and_the_replay_header(
    db: str, kafka_bootstrap: str, tmp_path: Path
) -> None:
    topic = f"replay-{uuid.uuid4().hex[:10]}"
    await kafka_create_topic(kafka_bootstrap, topic, partitions=3)
    config = write_config(
        tmp_path / "relay.yaml",
        db,
        brokers={"events": {"type": "kafka", "bootstrap_servers": kafka_bootstrap}},
        routes=[{"topic": "*", "broker": "events", "destination": topic}],
        timing={},
    )  # the relay's own defaults
    with psycopg.connect(db) as conn:
        ids = [str(enqueue(conn, "orders.created", {"n": n}, key=f"k{n % 3}")) for n in range(12)]
        others = [str(enqueue(conn, "emails.sent", {"n": n})) for n in range(4)]
        conn.commit()
    relay = RelayProcess(config)
    try:
        relay.wait_started()
        wait_for(lambda: dispatched(db) == 16)
        out = run_cli("replay", "--config", str(config), "--topic", "orders.*", "--yes")
        assert out.returncode == 0 and "12 message(s) to replay" in out.stdout, out.stdout + out.stderr
        wait_for(lambda: dispatched(db) == 28)
        assert relay.terminate() == 0
    finally:
        relay.close()
    received = await kafka_read(kafka_bootstrap, topic, 28, distinct=False)
    assert len(received) == 28
    copies = [r for r in received if "outbox-replay-id" in r.headers]
    assert sorted(r.message_id for r in copies) == sorted(ids), "each order once more, with its own id"
    assert {r.headers["outbox-replay-id"] for r in copies} == {"1"}
    assert not {r.message_id for r in copies} & set(others)
    for key in ("k0", "k1", "k2"):  # one key, one partition: the copies follow the originals in order
        sequence = [(r.message_id, "outbox-replay-id" in r.headers) for r in received if r.key == key]
        originals = [m for m, copy in sequence if not copy]
        assert sequence == [(m, False) for m in originals] + [(m, True) for m in originals], key
