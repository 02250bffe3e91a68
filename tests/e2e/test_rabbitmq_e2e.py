"""The relay publishing to a real RabbitMQ broker, read back with pika basic_get."""

from __future__ import annotations

import asyncio
import uuid
from urllib.parse import urlsplit

import psycopg
from outbox_relay_adapters.rabbitmq import create

from outbox_relay import enqueue
from outbox_relay.assembly import build_adapters
from outbox_relay.models import Outcome, OutgoingMessage
from tests.consumers import RabbitQueue, rabbit_read
from tests.support.configs import make_config
from tests.support.factories import message
from tests.support.outbox import dead_letters, pending, sequence_by_key, write
from tests.support.relay import running_relay
from tests.support.toxiproxy import MakeProxy
from tests.support.waiting import wait_until


def rabbit_config(db: str, url: str, exchange: str, **relay: object):  # type: ignore[no-untyped-def]
    return make_config(
        db,
        brokers={"mq": {"type": "rabbitmq", "url": url, "exchange": exchange}},
        routes=[{"topic": "*", "broker": "mq"}],
        **relay,
    )


async def test_committed_messages_arrive_in_key_order_and_rolled_back_never(db: str, amqp_url: str) -> None:
    exchange = f"e2e-{uuid.uuid4().hex[:10]}"
    queue = RabbitQueue(amqp_url, exchange, exchange + ".all", binding="emails.#")
    try:
        config = rabbit_config(db, amqp_url, exchange, batch_size=100)
        async with running_relay(config, build_adapters(config)):
            written = await write(db, "emails.sent", [f"user-{i}" for i in range(10)], 40, rollback_every=6)
            await wait_until(lambda: pending(db) == 0, timeout=60)
        received = await rabbit_read(queue, len(written.committed))
    finally:
        queue.close()
    ids = {r.message_id for r in received}
    assert ids == set(written.committed)
    assert not ids & written.rolled_back
    first = received[0]
    assert first.properties["routing_key"] == "emails.sent"
    assert first.properties["content_type"] == "application/json"
    assert first.properties["delivery_mode"] == 2 and first.properties["timestamp"] > 0
    order = sequence_by_key([r.payload for r in received])
    for key, ns in order.items():
        assert ns == sorted(n for k, n in written.committed.values() if k == key), key


async def test_unroutable_message_is_dead_lettered_while_others_flow(db: str, amqp_url: str) -> None:
    exchange = f"e2e-{uuid.uuid4().hex[:10]}"
    queue = RabbitQueue(amqp_url, exchange, exchange + ".sent", binding="emails.sent")
    try:
        with psycopg.connect(db) as conn:
            enqueue(conn, "emails.sent", {"key": "u", "n": 0}, key="u")
            lost = enqueue(conn, "emails.bounced", {"key": "u", "n": 1}, key="u")  # no binding
            enqueue(conn, "emails.sent", {"key": "u", "n": 2}, key="u")
            conn.commit()
        config = rabbit_config(db, amqp_url, exchange)
        async with running_relay(config, build_adapters(config)):
            await wait_until(lambda: pending(db) == 0, timeout=30)
        received = await rabbit_read(queue, 2)
    finally:
        queue.close()
    [(mid, _, reason)] = dead_letters(db)
    assert mid == str(lost)
    assert reason.startswith("unroutable")
    assert sequence_by_key([r.payload for r in received]) == {"u": [0, 2]}


async def test_connection_loss_reports_unconfirmed_unavailable_then_reconnects(amqp_url: str, proxy: MakeProxy) -> None:
    parts = urlsplit(amqp_url)
    server = proxy(f"{parts.hostname or '127.0.0.1'}:{parts.port or 5672}")
    exchange = f"e2e-{uuid.uuid4().hex[:10]}"
    queue = RabbitQueue(amqp_url, exchange, exchange + ".q")
    adapter = create(
        "mq",
        {
            "url": amqp_url.replace(f":{parts.port}/", f":{server.port}/"),
            "exchange": exchange,
            "heartbeat": "5s",
            "connect_timeout": "2s",
        },
    )
    try:
        await adapter.connect()
        holes = server.black_hole()  # publishes leave, confirms never come back
        batch = [OutgoingMessage(message(i), exchange) for i in range(20)]
        publishing = asyncio.ensure_future(adapter.publish(batch))
        # The positive signal: every message is published and waits for its confirm.
        await wait_until(lambda: len(adapter._unconfirmed) == 20, timeout=10)  # type: ignore[attr-defined]
        assert not publishing.done(), "no result may be reported before the broker confirms"
        server.disable()
        server.remove(*holes)
        results = await asyncio.wait_for(publishing, 10)
        # Unconfirmed means republish later; the node went away, so no attempt is spent.
        assert {r.outcome for r in results} == {Outcome.UNAVAILABLE}, [r.reason for r in results[:1]]
        down = await adapter.publish([OutgoingMessage(message(99), exchange)])
        assert down[0].outcome is Outcome.UNAVAILABLE
        server.enable()
        last = message(100)
        again = await adapter.publish([OutgoingMessage(last, exchange)])
        assert again[0].outcome is Outcome.ACKED
        delivered = {r.message_id for r in await rabbit_read(queue, 21, timeout=5)}
        assert str(last.message_id) in delivered
    finally:
        await adapter.close()
        queue.close()


def delete_exchange(url: str, exchange: str) -> None:
    import pika

    connection = pika.BlockingConnection(pika.URLParameters(url))
    try:
        connection.channel().exchange_delete(exchange)
    finally:
        connection.close()


async def test_an_exchange_created_after_the_relay_started_is_found_with_declare_false(amqp_url: str) -> None:
    # A refusal is remembered only briefly and forgotten on reconnect: once the exchange
    # exists, the adapter connects (before: the first refusal was cached forever).
    exchange = f"late-{uuid.uuid4().hex[:10]}"
    adapter = create("mq", {"url": amqp_url, "exchange": exchange, "declare": False})
    try:
        try:
            await adapter.connect()
        except ConnectionError as exc:
            assert "unusable: 404" in str(exc)
        else:
            raise AssertionError("connected to an exchange that does not exist")
        queue = RabbitQueue(amqp_url, exchange, exchange + ".q")  # the exchange now exists
        try:
            await adapter.connect()
            assert await adapter.ready()
            out = OutgoingMessage(message(1), "t")
            assert [r.outcome for r in await adapter.publish([out])] == [Outcome.ACKED]
            assert [r.message_id for r in await rabbit_read(queue, 1)] == [str(out.message_id)]
        finally:
            queue.close()
            delete_exchange(amqp_url, exchange)
    finally:
        await adapter.close()


async def test_a_refused_exchange_leaves_the_confirms_of_earlier_messages_alone(amqp_url: str) -> None:
    # The check of an exchange that does not exist (declare: false) is refused with a
    # 404 that closes the channel it was made on. Made on the publishing channel, it
    # failed every message still waiting for its confirm (persistent messages to a
    # durable queue: confirmed after the broker's fsync), and they were published again.
    kept, missing = f"kept-{uuid.uuid4().hex[:10]}", f"missing-{uuid.uuid4().hex[:10]}"
    queue = RabbitQueue(amqp_url, kept, kept + ".q")
    adapter = create("mq", {"url": amqp_url, "exchange": kept, "declare": False})
    await adapter.connect()
    try:
        batch = [
            *(OutgoingMessage(message(i), kept) for i in range(1, 51)),
            OutgoingMessage(message(51), missing, explicit_destination=True),
            *(OutgoingMessage(message(i), kept) for i in range(52, 61)),
        ]
        results = await adapter.publish(batch)
        outcomes = [r.outcome for r in results]
        assert outcomes[50] is Outcome.PERMANENT and "unusable: 404" in (results[50].reason or ""), results[50]
        assert outcomes[:50] + outcomes[51:] == [Outcome.ACKED] * 59, "the refusal failed its neighbours"
        received = await rabbit_read(queue, 59)
        assert sorted(r.message_id for r in received) == sorted(
            str(out.message_id) for i, out in enumerate(batch) if i != 50
        )
    finally:
        await adapter.close()
        queue.close()
        delete_exchange(amqp_url, kept)


async def test_a_deleted_exchange_is_declared_again_and_its_neighbours_spend_no_attempt(amqp_url: str) -> None:
    import pika

    gone, kept = f"gone-{uuid.uuid4().hex[:10]}", f"kept-{uuid.uuid4().hex[:10]}"
    queues = [RabbitQueue(amqp_url, gone, gone + ".q"), RabbitQueue(amqp_url, kept, kept + ".q")]
    adapter = create("mq", {"url": amqp_url, "exchange": kept})
    await adapter.connect()
    try:
        first = [OutgoingMessage(message(1), gone, explicit_destination=True), OutgoingMessage(message(2), kept)]
        assert [r.outcome for r in await adapter.publish(first)] == [Outcome.ACKED, Outcome.ACKED]
        delete_exchange(amqp_url, gone)  # cached as usable, now deleted (its binding with it)
        batch = [
            OutgoingMessage(message(3), gone, explicit_destination=True),
            *(OutgoingMessage(message(i), kept) for i in range(4, 9)),
        ]
        results = await adapter.publish(batch)
        # The broker closed the channel on the publish to the deleted exchange: nothing
        # of this call is a dead letter or a spent attempt; what was not acked waits.
        assert {r.outcome for r in results} <= {Outcome.ACKED, Outcome.UNAVAILABLE}, results
        assert results[0].outcome is Outcome.UNAVAILABLE
        again = [out for out, r in zip(batch, results, strict=True) if r.outcome is not Outcome.ACKED]
        # Next call: the exchange is declared again (declare: true). Nothing is bound to
        # it any more, so its message is unroutable (the broker's answer, not a 404).
        final = await adapter.publish(again)
        assert final[0].outcome is Outcome.PERMANENT and "unroutable" in (final[0].reason or ""), final[0]
        assert {r.outcome for r in final[1:]} <= {Outcome.ACKED}
        connection = pika.BlockingConnection(pika.URLParameters(amqp_url))
        try:
            connection.channel().exchange_declare(gone, passive=True)  # raises if it does not exist
        finally:
            connection.close()
    finally:
        await adapter.close()
        for queue in queues:
            queue.close()
        delete_exchange(amqp_url, gone)
        delete_exchange(amqp_url, kept)


async def test_an_unroutable_copy_is_never_acked_beside_routed_copies_of_its_message_id(amqp_url: str) -> None:
    # `replay --again` makes copies with the original's message_id, so one call can hold
    # several. A basic.return names the message, not its delivery tag. Matched by message
    # id, the return of the unroutable copy was taken by a routed copy whose confirm the
    # broker sent after that return (RabbitMQ confirms a routed message once its queue
    # has it, and coalesces confirms that are due together), and the unroutable copy was
    # then marked acked: a lost message marked dispatched. Where a routed copy's confirm
    # falls is the broker's timing (a non-durable queue confirms soonest): the call is
    # repeated with 1 to 8 routed copies before the unroutable one; the old matching
    # lost the unroutable copy in 18 to 41 of these 400 calls (three runs).
    import pika

    exchange = f"copies-{uuid.uuid4().hex[:10]}"
    connection = pika.BlockingConnection(pika.URLParameters(amqp_url))
    channel = connection.channel()
    channel.exchange_declare(exchange, exchange_type="topic", durable=True)
    channel.queue_declare(exchange + ".q", durable=False, auto_delete=True)
    channel.queue_bind(exchange + ".q", exchange, routing_key="routed")
    adapter = create("mq", {"url": amqp_url, "exchange": exchange})
    await adapter.connect()
    routed = 0
    try:
        for call in range(400):
            copies = 1 + call % 8
            message_id = uuid.uuid4()
            batch = [OutgoingMessage(message(0, topic="routed"), exchange)]  # another message first
            batch += [
                OutgoingMessage(message(i, topic="routed", message_id=message_id), exchange) for i in range(copies)
            ]
            batch.append(OutgoingMessage(message(9, topic="nowhere", message_id=message_id), exchange))
            results = await adapter.publish(batch)
            unroutable = results[-1]
            assert unroutable.outcome is Outcome.PERMANENT, f"call {call}: the unroutable copy was {unroutable}"
            assert (unroutable.reason or "").startswith("unroutable"), unroutable
            assert {r.outcome for r in results[:-1]} == {Outcome.ACKED}, f"call {call}: {results[:-1]}"
            routed += 1 + copies
        assert channel.queue_declare(exchange + ".q", passive=True).method.message_count == routed
    finally:
        await adapter.close()
        channel.queue_delete(exchange + ".q")
        channel.exchange_delete(exchange)
        connection.close()
