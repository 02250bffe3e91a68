"""The NATS JetStream adapter and the relay against a real nats-server (scripts/services/
nats.sh), read back with an independent client (tests/support/jetstream.py): key order,
a failure in the middle of a batch and of a key's run, the duplicate window, a subject no
stream takes."""

from __future__ import annotations

import json
import uuid

import psycopg
from outbox_relay_adapters.nats import check_destination, create

from outbox_relay import enqueue
from outbox_relay.assembly import build_adapters
from outbox_relay.models import Outcome, OutgoingMessage
from tests.services import NatsServer
from tests.support.configs import make_config
from tests.support.factories import message
from tests.support.jetstream import make_stream, stream_read
from tests.support.outbox import dead_letters, pending, sequence_by_key, write
from tests.support.relay import running_relay
from tests.support.waiting import wait_until

LIMIT = 4096  # the test streams' max_msg_size


async def fresh_stream(server: NatsServer, **config: object) -> tuple[str, str]:
    """(stream name, subject prefix): a stream of its own over `prefix.>`."""
    name = f"e2e-{uuid.uuid4().hex[:10]}"
    await make_stream(server.url, name, [f"{name}.>"], **config)
    return name, name


async def test_committed_messages_arrive_in_key_order_with_their_headers(db: str, nats_server: NatsServer) -> None:
    stream, prefix = await fresh_stream(nats_server)
    config = make_config(
        db,
        brokers={"js": {"type": "nats", "servers": [nats_server.url], "subject": prefix + ".{destination}"}},
        routes=[{"topic": "*", "broker": "js"}],
        batch_size=100,
    )
    async with running_relay(config, build_adapters(config)):
        written = await write(db, "emails.sent", [f"user-{i}" for i in range(10)], 40, rollback_every=6)
        await wait_until(lambda: pending(db) == 0, timeout=60)
    received = await stream_read(nats_server.url, stream, len(written.committed))
    ids = [r.message_id for r in received]
    assert set(ids) == set(written.committed) and len(ids) == len(set(ids))
    assert not set(ids) & written.rolled_back
    first = received[0]
    assert first.properties["subject"] == f"{prefix}.emails.sent"
    assert first.headers["Content-Type"] == "application/json"
    assert first.key is not None and first.key.startswith("user-")
    order = sequence_by_key([r.payload for r in received])
    for key, ns in order.items():
        assert ns == sorted(n for k, n in written.committed.values() if k == key), key
    with psycopg.connect(db) as conn:
        receipts = [r for (r,) in conn.execute("SELECT receipt FROM outbox.messages WHERE receipt IS NOT NULL")]
    # Each receipt names the stream and the sequence where its message is.
    assert len(receipts) == len(written.committed)
    at = {r.properties["seq"]: r.message_id for r in received}
    assert all(receipt["stream"] == stream and receipt["seq"] in at for receipt in receipts), receipts[:3]


async def test_a_failure_in_the_middle_of_a_batch_fails_that_message_only(nats_server: NatsServer) -> None:
    # One message over the stream's max_msg_size (JetStream refuses it, after the next
    # ones were sent) and one over the server's max_payload (refused before sending: the
    # server would close the connection on it), each in the middle of a batch.
    stream, prefix = await fresh_stream(nats_server, max_msg_size=LIMIT)
    adapter = create("js", {"servers": [nats_server.url], "stream": stream})
    await adapter.connect()
    try:
        max_payload = adapter._nc.max_payload if adapter._nc else 0
        sent = [
            message(1, key="a", payload=b"a" * 10),
            message(2, key="b", payload=b"b" * (LIMIT + 100)),
            message(3, key="c", payload=b"c" * 10),
            message(4, key="d", payload=b"d" * (max_payload + 1)),
            message(5, key="e", payload=b"e" * 10),
        ]
        results = await adapter.publish([OutgoingMessage(m, f"{prefix}.t", True) for m in sent])
        outcomes = [r.outcome for r in results]
        assert outcomes == [Outcome.ACKED, Outcome.PERMANENT, Outcome.ACKED, Outcome.PERMANENT, Outcome.ACKED]
        assert "exceeds maximum" in (results[1].reason or ""), results[1]
        assert "max_payload" in (results[3].reason or ""), results[3]
        # The connection lived through both: the next call is acked on it.
        sixth = message(6, key="f")
        [after] = await adapter.publish([OutgoingMessage(sixth, f"{prefix}.t", True)])
        assert after.outcome is Outcome.ACKED
    finally:
        await adapter.close()
    # The stream holds the acked ones of the batch, in order, then message 6: nothing else.
    held = [r.message_id for r in await stream_read(nats_server.url, stream, 4)]
    assert held == [str(sent[0].message_id), str(sent[2].message_id), str(sent[4].message_id), str(sixth.message_id)]


async def test_a_keys_run_with_a_refused_message_in_the_middle(db: str, nats_server: NatsServer) -> None:
    # The engine hands the adapter (keeps_key_order False) one message of a key per call:
    # the refused one is dead-lettered before the next of its key is sent, so no later
    # message of the key is acked before an earlier one's fate is known.
    stream, prefix = await fresh_stream(nats_server, max_msg_size=LIMIT)
    with psycopg.connect(db) as conn:
        enqueue(conn, "orders", {"key": "k", "n": 0}, key="k")
        big = enqueue(conn, "orders", {"key": "k", "n": 1, "pad": "x" * (LIMIT + 100)}, key="k")
        enqueue(conn, "orders", {"key": "k", "n": 2}, key="k")
        conn.commit()
    config = make_config(
        db,
        brokers={"js": {"type": "nats", "servers": [nats_server.url], "subject": prefix + ".{destination}"}},
        routes=[{"topic": "*", "broker": "js"}],
    )
    async with running_relay(config, build_adapters(config)):
        await wait_until(lambda: pending(db) == 0, timeout=30)
    [(mid, _, reason)] = dead_letters(db)
    assert mid == str(big) and "exceeds maximum" in reason
    received = await stream_read(nats_server.url, stream, 2)
    assert sequence_by_key([r.payload for r in received]) == {"k": [0, 2]}


async def test_a_resend_within_the_duplicate_window_is_stored_once(nats_server: NatsServer) -> None:
    stream, prefix = await fresh_stream(nats_server)
    adapter = create("js", {"servers": [nats_server.url]})
    await adapter.connect()
    try:
        sent = message(1, key="k")
        [first] = await adapter.publish([OutgoingMessage(sent, f"{prefix}.t", True)])
        [again] = await adapter.publish([OutgoingMessage(sent, f"{prefix}.t", True)])
    finally:
        await adapter.close()
    assert first.outcome is again.outcome is Outcome.ACKED
    one, two = json.loads(first.receipt or "{}"), json.loads(again.receipt or "{}")
    assert one == {"stream": stream, "seq": 1, "duplicate": False}
    assert two == {"stream": stream, "seq": 1, "duplicate": True}
    assert [r.message_id for r in await stream_read(nats_server.url, stream, 1)] == [str(sent.message_id)]


async def test_a_subject_no_stream_takes_is_retried_and_a_bad_subject_is_refused(nats_server: NatsServer) -> None:
    adapter = create("js", {"servers": [nats_server.url]})
    await adapter.connect()
    try:
        nowhere = f"nowhere-{uuid.uuid4().hex[:8]}.t"
        results = await adapter.publish(
            [
                OutgoingMessage(message(1, key="a"), nowhere, True),
                OutgoingMessage(message(2, key="b"), "bad subject", True),
                OutgoingMessage(message(3, key="c", headers={"Nats-Rollup": "all"}), nowhere, True),
            ]
        )
    finally:
        await adapter.close()
    # No stream takes that subject while JetStream answers (the account's info came back):
    # the subject is the message's (built from its topic or destination), so it is retried,
    # spending attempts, rather than waiting forever as if the server were down.
    assert results[0].outcome is Outcome.TRANSIENT and "no responders" in (results[0].reason or "")
    assert results[1].outcome is Outcome.PERMANENT and "whitespace" in (results[1].reason or "")
    assert results[2].outcome is Outcome.PERMANENT and "Nats-" in (results[2].reason or "")
    assert check_destination("orders.created", True) is None
    assert check_destination("orders..created", True) is not None
    assert check_destination("orders.*", True) is not None
    assert check_destination("tenant ", False) is not None


async def test_a_messages_subject_outside_the_stream_is_its_own_failure_not_an_outage(
    db: str, nats_server: NatsServer
) -> None:
    # subject "{destination}" with `stream` over orders.>: a message of topic "payments"
    # gets a subject no stream takes ("no responders"), and one routed to another stream's
    # subject gets JetStream error 10060. Both alone in a call, where nothing else was
    # acked: the stream's info says JetStream answers, so neither waits as `unavailable`.
    orders, _ = await fresh_stream(nats_server)
    other, _ = await fresh_stream(nats_server)
    adapter = create("js", {"servers": [nats_server.url], "stream": orders})
    await adapter.connect()
    try:
        [nowhere] = await adapter.publish([OutgoingMessage(message(1, key="a"), "payments", True)])
        [elsewhere] = await adapter.publish([OutgoingMessage(message(2, key="b"), f"{other}.t", True)])
        [good] = await adapter.publish([OutgoingMessage(message(3, key="c"), f"{orders}.t", True)])
    finally:
        await adapter.close()
    assert nowhere.outcome is Outcome.TRANSIENT and "no responders" in (nowhere.reason or ""), nowhere
    assert elsewhere.outcome is Outcome.PERMANENT and "10060" in (elsewhere.reason or ""), elsewhere
    assert good.outcome is Outcome.ACKED, good

    # Through the relay: the payments message is dead-lettered after its one attempt (it
    # does not stall its key nor trip the circuit), the orders ones arrive.
    config = make_config(
        db,
        brokers={"js": {"type": "nats", "servers": [nats_server.url], "stream": orders, "subject": "{destination}"}},
        routes=[
            {"topic": "payments", "broker": "js"},
            {"topic": "orders", "broker": "js", "destination": f"{orders}.created"},
        ],
        max_attempts=1,
    )
    with psycopg.connect(db) as conn:
        lost = enqueue(conn, "payments", {"n": 0}, key="k")
        enqueue(conn, "orders", {"n": 1}, key="k2")
        conn.commit()
    async with running_relay(config, build_adapters(config)):
        await wait_until(lambda: pending(db) == 0, timeout=60)
    [(mid, _, reason)] = dead_letters(db)
    assert mid == str(lost) and "no responders" in reason, reason
    assert len(await stream_read(nats_server.url, orders, 2)) == 2  # message 3 above, and the order


async def test_key_rounds_stop_starting_at_timeout_and_the_rest_waits(nats_server: NatsServer) -> None:
    # A hot key's run of 4,000 in one call is 4,000 round trips: rounds start for
    # `timeout` only, the rest comes back not_sent (the engine leaves it due at once,
    # spending no attempt) and the next call takes up where this one stopped. 200 ms:
    # a fast machine did all 4,000 within 1 s (no round left to refuse); 200 ms would
    # need a PubAck round trip under 50 us, which no JetStream store answers in.
    stream, prefix = await fresh_stream(nats_server)
    adapter = create("js", {"servers": [nats_server.url], "stream": stream, "key_rounds": True, "timeout": "200ms"})
    await adapter.connect()
    try:
        sent = [message(i, key="hot") for i in range(4000)]
        results = await adapter.publish([OutgoingMessage(m, f"{prefix}.t", True) for m in sent])
        outcomes = [r.outcome for r in results]
        acked = outcomes.index(Outcome.NOT_SENT)
        assert 0 < acked < len(sent) and outcomes[:acked] == [Outcome.ACKED] * acked, outcomes[:acked]
        assert "rounds took timeout" in (results[acked].reason or ""), results[acked]
        assert outcomes[acked + 1 :] == [Outcome.NOT_SENT] * (len(sent) - acked - 1)
        # The next call takes up where this one stopped.
        [resumed] = await adapter.publish([OutgoingMessage(sent[acked], f"{prefix}.t", True)])
        assert resumed.outcome is Outcome.ACKED, resumed
    finally:
        await adapter.close()
    held = [r.message_id for r in await stream_read(nats_server.url, stream, acked + 1)]
    assert held == [str(m.message_id) for m in sent[: acked + 1]]
