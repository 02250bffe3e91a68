from __future__ import annotations

import psycopg

from outbox_relay import enqueue
from outbox_relay.testing import FakeAdapter
from tests.support.configs import make_config
from tests.support.relay import running_relay
from tests.support.waiting import wait_until


async def test_relay_publishes_python_and_sql_messages(db: str) -> None:
    with psycopg.connect(db) as conn:
        ids = [enqueue(conn, "orders.created", {"n": i}, key="k") for i in range(3)]
        conn.execute("SELECT outbox.enqueue('orders.sql', 'k', '{\"n\": 3}')")
        conn.commit()
    fake = FakeAdapter()
    async with running_relay(make_config(db, brokers={"main": {"type": "stdout"}}), {"main": fake}):
        await wait_until(lambda: len(fake.delivered) == 4)
    assert fake.delivered_ids[:3] == [str(i) for i in ids]
