"""Relays killed with SIGKILL at random moments, again and again, while writers keep
committing: with one replica and with three."""

from __future__ import annotations

import random
import time
import uuid
from pathlib import Path

import pytest

from tests.consumers import kafka_create_topic, kafka_read
from tests.faults.harness import Writers, check_delivery
from tests.support.cli import RelayProcess
from tests.support.configs import PATIENT, write_config
from tests.support.outbox import pending
from tests.support.waiting import wait_for

BATCH, WORKERS = 50, 2


@pytest.mark.parametrize("replicas", [1, 3])
async def test_sigkill_again_and_again(db: str, kafka_bootstrap: str, tmp_path: Path, replicas: int) -> None:
    topic = f"crash-{uuid.uuid4().hex[:8]}"
    await kafka_create_topic(kafka_bootstrap, topic)
    config = write_config(
        tmp_path / "relay.yaml",
        db,
        brokers={"kafka": {"type": "kafka", "bootstrap_servers": kafka_bootstrap}},
        routes=[{"topic": "*", "broker": "kafka", "destination": topic}],
        timing=PATIENT,
        batch_size=BATCH,
        workers=WORKERS,
    )
    rng = random.Random(replicas)
    relays = [RelayProcess(config) for _ in range(replicas)]
    writers = Writers(db, "orders.created").start()
    kills = 0
    try:
        deadline = time.monotonic() + 12
        while time.monotonic() < deadline:
            time.sleep(rng.uniform(0.3, 1.2))  # the fault: a SIGKILL at a random moment
            victim = rng.randrange(replicas)
            relays[victim].kill()  # SIGKILL: no cleanup at all
            kills += 1
            relays[victim] = RelayProcess(config)
        ledger = writers.stop()
        wait_for(lambda: pending(db) == 0, 90, "every message dispatched")
        for relay in relays:
            relay.wait_started()
            assert relay.terminate() == 0
    finally:
        writers.stop()
        for relay in relays:
            relay.close()
    received = await kafka_read(kafka_bootstrap, topic, len(ledger.committed), timeout=60)
    assert kills >= 8
    duplicates = check_delivery(received, ledger, uncertain=writers.uncertain, max_duplicates=kills * BATCH * WORKERS)
    print(f"replicas={replicas} kills={kills} committed={len(ledger.committed)} duplicates={duplicates}")
