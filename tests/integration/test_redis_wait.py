"""The redis adapter's ``wait: {replicas, timeout}`` against real servers: a primary
with one replica (a second local redis-server told REPLICAOF) acks; without enough
replicas the entries are written on the primary but answered ``unavailable`` (they go
again, spending no attempt), and ``ready()`` says false."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
import redis
from outbox_relay_adapters.redis_streams import create as create_redis

from outbox_relay.models import Outcome, OutgoingMessage
from tests import services
from tests.consumers import redis_entries
from tests.support.factories import message
from tests.support.waiting import wait_for


@pytest.fixture(scope="module")
def primary_and_replica() -> Iterator[tuple[str, str]]:
    with services.local_redis() as primary, services.local_redis() as replica:
        with redis.Redis(port=replica.port) as admin:
            admin.replicaof("127.0.0.1", str(primary.port))
            wait_for(lambda: admin.info("replication")["master_link_status"] == "up", 30, "the replica in sync")
        with redis.Redis(port=primary.port) as admin:
            # The replica's side says up before the primary counts it online (its first
            # REPLCONF ACK): until then WAIT counts 0 replicas, not 1.
            wait_for(
                lambda: admin.info("replication").get("slave0", {}).get("state") == "online",
                30,
                "the primary counting its replica online",
            )
        yield f"redis://127.0.0.1:{primary.port}/0", f"redis://127.0.0.1:{replica.port}/0"


async def test_acked_once_the_replica_has_the_entries(primary_and_replica: tuple[str, str]) -> None:
    primary, replica = primary_and_replica
    stream = f"wait-{uuid.uuid4().hex[:8]}"
    adapter = create_redis("r", {"url": primary, "wait": {"replicas": 1, "timeout": "4s"}})
    await adapter.connect()
    try:
        assert await adapter.ready()
        sent = [message(n, key=f"k{n % 2}") for n in range(6)]
        results = await adapter.publish([OutgoingMessage(m, stream, True) for m in sent])
    finally:
        await adapter.close()
    assert [r.outcome for r in results] == [Outcome.ACKED] * 6, results
    # WAIT returned: the replica holds every entry already (each key's run together).
    assert sorted(r.message_id for r in redis_entries(replica, stream)) == sorted(str(m.message_id) for m in sent)


async def test_too_few_replicas_is_unavailable_and_not_ready(primary_and_replica: tuple[str, str]) -> None:
    primary, _ = primary_and_replica
    stream = f"wait-{uuid.uuid4().hex[:8]}"
    adapter = create_redis("r", {"url": primary, "wait": {"replicas": 2, "timeout": "200ms"}})
    await adapter.connect()
    try:
        assert not await adapter.ready()
        sent = [message(n, key="k") for n in range(3)]
        results = await adapter.publish([OutgoingMessage(m, stream, True) for m in sent])
    finally:
        await adapter.close()
    assert [r.outcome for r in results] == [Outcome.UNAVAILABLE] * 3, results
    assert "WAIT 2 0.2s: 1 of 2 replicas" in (results[0].reason or ""), results[0]
    # On the primary all the same: they go again (a duplicate), never lost with it.
    assert len(redis_entries(primary, stream)) == 3
