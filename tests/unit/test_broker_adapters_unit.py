"""Kafka and RabbitMQ adapters without a broker: option validation, error
classification and confirm bookkeeping. Their behaviour against real brokers is in
tests/contract and tests/e2e."""

from __future__ import annotations

import asyncio
import logging
import types
import uuid
from typing import Any

import pika
import pytest
from aiokafka import errors as kafka_errors
from outbox_relay_adapters import _rounds, kafka, kafka_aiokafka, rabbitmq

from outbox_relay.errors import AdapterOptionsError
from outbox_relay.models import Outcome, OutgoingMessage, PublishResult
from tests.support.factories import outgoing
from tests.support.waiting import wait_for, wait_until

# -- kafka ---------------------------------------------------------------------------------


def test_kafka_producer_is_idempotent_with_acks_all() -> None:
    settings = kafka.producer_settings(kafka.KafkaOptions(bootstrap_servers="h:9092"))
    assert settings["acks"] == "all" and settings["enable_idempotence"] is True
    assert settings["compression_type"] is None


def test_librdkafka_producer_is_idempotent_with_acks_all() -> None:
    # What the cluster scenarios (tests/clusters/test_kafka_cluster.py) rely on: an ack
    # only with min.insync.replicas in sync, no record given up or reordered by a retry.
    from outbox_relay_adapters import kafka_librdkafka

    config = kafka_librdkafka.producer_config(kafka.KafkaOptions(bootstrap_servers="h:9092", client="librdkafka"))
    assert config["acks"] == "all" and config["enable.idempotence"] is True
    assert config["message.timeout.ms"] == 0


def test_kafka_options_durations_and_sasl() -> None:
    options = kafka.KafkaOptions.model_validate(
        {
            "bootstrap_servers": ["a:1", "b:2"],
            "linger": "20ms",
            "request_timeout": "5s",
            "compression": "gzip",
            "sasl": {"mechanism": "SCRAM-SHA-512", "username": "relay", "password": "pw"},
        }
    )
    settings = kafka.producer_settings(options)
    assert settings["linger_ms"] == 20 and settings["request_timeout_ms"] == 5000
    assert settings["compression_type"] == "gzip"
    assert settings["security_protocol"] == "SASL_PLAINTEXT" and settings["sasl_mechanism"] == "SCRAM-SHA-512"
    assert "pw" not in repr(options), "the password must not show in reprs or logs"


@pytest.mark.parametrize(
    ("options", "path", "message"),
    [
        ({}, "bootstrap_servers", "required option is missing"),
        ({"bootstrap_servers": "h:1", "compresion": "gzip"}, "compresion", "did you mean 'compression'"),
        ({"bootstrap_servers": "h:1", "compression": "brotli"}, "compression", "Input should be"),
        ({"bootstrap_servers": "h:1", "linger": "5"}, "linger", "invalid duration"),
        (
            {"bootstrap_servers": "h:1", "sasl": {"mechanism": "GSSAPI", "username": "u", "password": "p"}},
            "sasl.mechanism",
            "Input should be",
        ),
        ({"bootstrap_servers": "h:1", "tls": {"cert_file": "c.pem"}}, "tls", "cert_file and key_file go together"),
        ({"bootstrap_servers": " , "}, "bootstrap_servers", "host:port"),
    ],
)
def test_kafka_option_errors(options: dict[str, object], path: str, message: str) -> None:
    with pytest.raises(AdapterOptionsError) as info:
        kafka.create("events", options)
    assert info.value.path is not None and info.value.path.startswith(path.split(".")[0])
    assert message in str(info.value)


@pytest.mark.parametrize("codec", ["lz4", "zstd", "snappy"])
def test_kafka_compression_needs_its_library(codec: str) -> None:
    available = kafka.CODECS[codec]()
    if available:
        assert kafka.create("e", {"bootstrap_servers": "h:1", "compression": codec})
    else:
        with pytest.raises(AdapterOptionsError, match="needs its library"):
            kafka.create("e", {"bootstrap_servers": "h:1", "compression": codec})


@pytest.mark.parametrize(
    ("error", "outcome"),
    [
        (kafka_errors.MessageSizeTooLargeError(), Outcome.PERMANENT),
        (kafka_errors.RecordListTooLargeError(), Outcome.PERMANENT),
        (kafka_errors.InvalidTopicError(), Outcome.PERMANENT),
        (kafka_errors.TopicAuthorizationFailedError(), Outcome.PERMANENT),
        (kafka_errors.ClusterAuthorizationFailedError(), Outcome.PERMANENT),
        (kafka_errors.NotLeaderForPartitionError(), Outcome.TRANSIENT),
        (kafka_errors.LeaderNotAvailableError(), Outcome.TRANSIENT),
        (kafka_errors.NotEnoughReplicasError(), Outcome.TRANSIENT),
        (kafka_errors.NotEnoughReplicasAfterAppendError(), Outcome.TRANSIENT),
        (kafka_errors.UnknownTopicOrPartitionError(), Outcome.TRANSIENT),
        (kafka_errors.RequestTimedOutError(), Outcome.UNAVAILABLE),
        (kafka_errors.KafkaTimeoutError(), Outcome.UNAVAILABLE),
        (kafka_errors.NodeNotReadyError(), Outcome.UNAVAILABLE),
        (kafka_errors.OutOfOrderSequenceNumber(), Outcome.TRANSIENT),
        (kafka_errors.KafkaConnectionError(), Outcome.UNAVAILABLE),
        (RuntimeError("surprise"), Outcome.TRANSIENT),
    ],
)
def test_kafka_error_classification(error: BaseException, outcome: Outcome) -> None:
    result = kafka.classify(error)
    assert result.outcome is outcome
    assert type(error).__name__ in (result.reason or "")


def test_kafka_record_headers_carry_message_id_and_content_type() -> None:
    out = outgoing(destination="orders", headers={"h": "v"})
    headers = dict(_rounds.record_headers(out))
    assert headers == {"h": b"v", "message-id": str(out.message_id).encode(), "content-type": b"application/json"}
    # Made once per record in a call: sized, appended, appended again alone if refused.
    entry = _rounds.Entry(0, outgoing(destination="orders", key="k-1", headers={"h": "v"}))
    assert entry.key == b"k-1" and dict(entry.headers)["h"] == b"v"


# -- rabbitmq ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"url": "http://x"}, "amqp:// or amqps://"),
        ({"url": "amqp://h", "exchange_type": "x"}, "Input should be"),
        ({"url": "amqp://h", "confirm_window": 0}, "greater than or equal to 1"),
        ({"url": "amqp://h", "routing_key": "{nope}"}, "invalid template"),
        ({"url": "amqp://h", "heartbeat": "soon"}, "invalid duration"),
        ({"url": "amqp://h", "exchang": "e"}, "did you mean 'exchange'"),
    ],
)
def test_rabbitmq_option_errors(options: dict[str, object], message: str) -> None:
    with pytest.raises(AdapterOptionsError, match=message.replace("(", r"\(").replace("*", r"\*")):
        rabbitmq.create("mq", options)


@pytest.mark.parametrize(
    ("options", "path", "message"),
    [
        ({}, None, "give either url (one address) or urls"),
        ({"url": "amqp://h", "urls": ["amqp://h"]}, None, "not both or neither"),
        ({"urls": []}, "urls", "at least 1 item"),
        ({"urls": "amqp://h"}, "urls", "valid list"),
        ({"urls": ["amqp://u:s3cret@a:5672/", "http://u:s3cret@b/"]}, "urls.1", "amqp:// or amqps://"),
        ({"urls": ["amqp://u:s3cret@a:5672/", "amqp://u:s3cret@b:port/"]}, "urls.1", "invalid AMQP URL"),
    ],
)
def test_rabbitmq_url_or_urls_exactly_one_each_checked_no_secret_shown(
    options: dict[str, object], path: str | None, message: str
) -> None:
    with pytest.raises(AdapterOptionsError) as info:
        rabbitmq.create("mq", options)
    assert message in str(info.value) and info.value.path == path
    assert "s3cret" not in str(info.value)


def test_rabbitmq_urls_are_the_addresses_in_order_and_url_is_one() -> None:
    nodes = ["amqp://u:p@a:5672/%2F", "amqps://u:p@b:5671/%2F", "amqp://u:p@c/%2F"]
    options = rabbitmq.create("mq", {"urls": nodes}).options
    assert options.addresses == nodes
    assert [rabbitmq.where(url) for url in nodes] == ["a:5672", "b:5671", "c:5672"]
    assert rabbitmq.connection_parameters(options, nodes[1]).ssl_options is not None, "amqps: per address"
    assert rabbitmq.connection_parameters(options).host == "a", "the first address by default"
    assert rabbitmq.create("mq", {"url": nodes[0]}).options.addresses == nodes[:1]


async def test_rabbitmq_connect_tries_each_address_then_fails_in_one_line_without_secrets() -> None:
    # Nothing listens on these ports: each refuses at once, and connect says so for both.
    from outbox_relay.demo.local_postgres import free_port

    ports = [free_port(), free_port()]
    urls = [f"amqp://relay:s3cret-{i}@127.0.0.1:{port}/%2F" for i, port in enumerate(ports)]
    adapter = rabbitmq.create("mq", {"urls": urls, "connect_timeout": "5s"})
    with pytest.raises(ConnectionError) as info:
        await adapter.connect()
    text = str(info.value)
    assert text.startswith("cannot connect to RabbitMQ at any of its 2 addresses: 127.0.0.1:")
    assert all(f"127.0.0.1:{port}" in text for port in ports) and "\n" not in text
    assert "s3cret" not in text


def test_rabbitmq_target_uses_route_destination_or_default_exchange() -> None:
    adapter = rabbitmq.create("mq", {"url": "amqp://h", "exchange": "events", "routing_key": "{topic}.{key}"})
    plain = outgoing(key="k1", destination="orders")
    assert adapter._target(plain) == ("events", "orders.created.k1")
    explicit = OutgoingMessage(plain.message, "billing", explicit_destination=True)
    assert adapter._target(explicit) == ("billing", "orders.created.k1")


async def _futures(adapter: rabbitmq.RabbitAdapter, ids: list[str]) -> list[asyncio.Future[object]]:
    loop = asyncio.get_running_loop()
    futures = []
    for tag, mid in enumerate(ids, start=1):
        future: asyncio.Future[object] = loop.create_future()
        adapter._unconfirmed[tag] = (future, mid, "{}")  # type: ignore[assignment]
        adapter._tag_of[mid] = tag
        futures.append(future)
    return futures


def _frame(method: object) -> types.SimpleNamespace:
    return types.SimpleNamespace(method=method)


async def test_rabbitmq_confirm_with_multiple_settles_every_earlier_tag() -> None:
    adapter = rabbitmq.create("mq", {"url": "amqp://h"})
    futures = await _futures(adapter, ["a", "b", "c", "d"])
    adapter._on_return(None, pika.spec.Basic.Return(312, "NO_ROUTE"), pika.BasicProperties(message_id="b"), b"")
    adapter._on_confirm(_frame(pika.spec.Basic.Ack(delivery_tag=3, multiple=True)))
    assert [f.done() for f in futures] == [True, True, True, False]
    assert [f.result().outcome for f in futures[:3]] == [Outcome.ACKED, Outcome.PERMANENT, Outcome.ACKED]  # type: ignore[attr-defined]
    adapter._on_confirm(_frame(pika.spec.Basic.Nack(delivery_tag=4, multiple=False)))
    assert futures[3].result().outcome is Outcome.TRANSIENT  # type: ignore[attr-defined]
    assert adapter._unconfirmed == {}


async def test_rabbitmq_a_confirm_from_a_replaced_channel_settles_nothing() -> None:
    # Delivery tags restart at 1 on every channel: a late ack for tag 1 of the old
    # channel must not mark the new channel's tag 1 as acked.
    adapter = rabbitmq.create("mq", {"url": "amqp://h"})
    old, new = object(), object()
    adapter._channel = new  # type: ignore[assignment]
    (future,) = await _futures(adapter, ["on-the-new-channel"])
    adapter._on_confirm(_frame(pika.spec.Basic.Ack(delivery_tag=1, multiple=False)), old)
    assert not future.done() and 1 in adapter._unconfirmed
    adapter._on_confirm(_frame(pika.spec.Basic.Ack(delivery_tag=1, multiple=False)), new)
    assert future.result().outcome is Outcome.ACKED  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("reason", "expected"),
    [
        # The node went away: an outage, no attempt spent.
        (pika.exceptions.StreamLostError("Transport indicated EOF"), Outcome.UNAVAILABLE),
        (
            pika.exceptions.ConnectionClosedByBroker(320, "CONNECTION_FORCED - broker forced connection closure"),
            Outcome.UNAVAILABLE,
        ),
        (ConnectionResetError("reset by peer"), Outcome.UNAVAILABLE),
        (pika.exceptions.AMQPHeartbeatTimeout("no heartbeat"), Outcome.UNAVAILABLE),
        # The broker closed it for an error a message may have caused: an attempt spent.
        (
            pika.exceptions.ChannelClosedByBroker(
                406, "PRECONDITION_FAILED - message size 200 is larger than max size 100"
            ),
            Outcome.TRANSIENT,
        ),
        (pika.exceptions.ConnectionClosedByBroker(505, "UNEXPECTED_FRAME"), Outcome.TRANSIENT),
    ],
)
async def test_rabbitmq_channel_loss_fails_unconfirmed_by_why_it_closed(
    reason: BaseException, expected: Outcome
) -> None:
    adapter = rabbitmq.create("mq", {"url": "amqp://h"})
    futures = await _futures(adapter, ["a", "b"])
    adapter._on_channel_closed(None, reason)
    assert [f.result().outcome for f in futures] == [expected, expected]  # type: ignore[attr-defined]
    assert adapter._unconfirmed == {}


async def test_rabbitmq_connection_loss_fails_unconfirmed_as_unavailable() -> None:
    # pika closes the channels first with the connection's reason, then tells the
    # connection's callback: both ways, a lost node spends no attempt.
    adapter = rabbitmq.create("mq", {"url": "amqp://h"})
    futures = await _futures(adapter, ["a"])
    adapter._on_connection_closed(None, pika.exceptions.StreamLostError("Transport indicated EOF"))
    assert futures[0].result().outcome is Outcome.UNAVAILABLE  # type: ignore[attr-defined]


class _Channel:
    """Records publishes; raises for payloads marked as unencodable, like pika would."""

    is_open = True

    def __init__(self) -> None:
        self.published: list[bytes] = []

    def basic_publish(self, exchange: str, key: str, body: bytes, props: object, mandatory: bool) -> None:
        if body == b"boom":
            raise pika.exceptions.ShortStringTooLong("too long")
        self.published.append(body)


async def test_rabbitmq_failed_publish_does_not_shift_delivery_tags() -> None:
    adapter = rabbitmq.create("mq", {"url": "amqp://h"})
    adapter._channel = _Channel()  # type: ignore[assignment]
    ok1 = outgoing(1, destination="x")
    bad = outgoing(2, b"boom", topic="t", destination="x")
    ok2 = outgoing(3, destination="x")
    first = await adapter._publish_one(ok1)
    failed = await adapter._publish_one(bad)
    second = await adapter._publish_one(ok2)
    assert isinstance(failed, rabbitmq.PublishResult) and failed.outcome is Outcome.PERMANENT
    # The broker numbers only what it received: tags 1 and 2 are ok1 and ok2.
    tagged = [adapter._unconfirmed[t][1] for t in (1, 2)]
    assert tagged == [str(ok1.message_id), str(ok2.message_id)]
    adapter._on_confirm(_frame(pika.spec.Basic.Ack(delivery_tag=2, multiple=True)))
    assert first.result().outcome is Outcome.ACKED and second.result().outcome is Outcome.ACKED  # type: ignore[union-attr]


async def test_rabbitmq_a_copy_of_an_unconfirmed_message_id_waits_for_its_confirm() -> None:
    # A basic.return names the message (its message_id), not its delivery tag: with two
    # copies of one id unconfirmed (`replay --again`), the return of an unroutable copy
    # could settle the other one, and the unroutable copy was marked acked. The second
    # copy goes out once the first is confirmed; the return finds the one unconfirmed.
    adapter = rabbitmq.create("mq", {"url": "amqp://h"})
    channel = _Channel()
    adapter._channel = channel  # type: ignore[assignment]
    message_id = uuid.uuid4()
    first = await adapter._publish_one(outgoing(1, destination="x", message_id=message_id))
    second = asyncio.ensure_future(adapter._publish_one(outgoing(2, destination="x", message_id=message_id)))
    done, _ = await asyncio.wait({second}, timeout=0.2)
    assert not done and len(channel.published) == 1, "a second copy went out while the first was unconfirmed"
    adapter._on_confirm(_frame(pika.spec.Basic.Ack(delivery_tag=1, multiple=False)))
    returned = await asyncio.wait_for(second, 5)
    assert len(channel.published) == 2
    properties = pika.BasicProperties(message_id=str(message_id))
    adapter._on_return(channel, pika.spec.Basic.Return(312, "NO_ROUTE"), properties, b"")
    adapter._on_confirm(_frame(pika.spec.Basic.Ack(delivery_tag=2, multiple=False)))
    assert first.result().outcome is Outcome.ACKED  # type: ignore[union-attr]
    assert returned.result().outcome is Outcome.PERMANENT  # type: ignore[union-attr]
    assert adapter._tag_of == {} and adapter._unconfirmed == {}


async def test_rabbitmq_refuses_what_amqp_cannot_carry() -> None:
    adapter = rabbitmq.create("mq", {"url": "amqp://h"})
    adapter._channel = _Channel()  # type: ignore[assignment]
    long_type = outgoing(1, b"{}", topic="t", content_type="x/" + "y" * 300, destination="x")
    wide_header = outgoing(2, b"{}", topic="t", headers={"é" * 200: "v"}, destination="x")
    for out, why in ((long_type, "content type"), (wide_header, "header name")):
        result = await adapter._publish_one(out)
        assert isinstance(result, rabbitmq.PublishResult) and result.outcome is Outcome.PERMANENT
        assert why in (result.reason or "")
    assert adapter._unconfirmed == {} and adapter._next_tag == 0


# --- Kafka topic metadata: unknown topics probed together, missing ones remembered ---------


async def test_missing_topics_are_probed_together_under_one_deadline_and_remembered() -> None:
    import time

    from outbox_relay_adapters._topics import TopicMetadata

    probed: list[str] = []

    async def probe(topic: str) -> None:
        probed.append(topic)
        if topic.startswith("missing"):
            await asyncio.sleep(60)  # metadata never comes

    topics = TopicMetadata(0.3, remember_missing=60)
    wanted = {f"missing-{i}" for i in range(6)} | {"present"}
    started = time.monotonic()
    answers = await topics.missing(wanted, probe)
    took = time.monotonic() - started
    assert sorted(answers) == sorted(t for t in wanted if t != "present")
    assert all(a.outcome.value == "transient" and "no metadata for topic" in (a.reason or "") for a in answers.values())
    assert took < 0.3 * 3, f"six missing topics took {took:.2f}s: probed one after another"
    # Right after: the missing ones are answered from memory, the present one is known.
    probed.clear()
    started = time.monotonic()
    again = await topics.missing(wanted, probe)
    assert sorted(again) == sorted(answers) and probed == []
    assert time.monotonic() - started < 0.05


async def test_a_remembered_missing_topic_is_probed_again_later() -> None:
    from outbox_relay_adapters._topics import TopicMetadata

    exists = False

    async def probe(topic: str) -> None:
        if not exists:
            raise LookupError("unknown topic")

    topics = TopicMetadata(1.0, remember_missing=0.0)
    assert "t" in await topics.missing({"t"}, probe)
    exists = True
    assert await topics.missing({"t"}, probe) == {}


async def test_probes_end_with_a_cancelled_call() -> None:
    from outbox_relay_adapters._topics import TopicMetadata

    started = asyncio.Event()
    cancelled = asyncio.Event()

    async def probe(topic: str) -> None:
        started.set()
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    call = asyncio.ensure_future(TopicMetadata(30.0).missing({"t"}, probe))
    await asyncio.wait_for(started.wait(), 5)
    call.cancel()  # the publish call ended at publish_timeout
    await asyncio.wait_for(cancelled.wait(), 5)  # the probe task ended with it


@pytest.mark.parametrize(("given", "sent"), [("500ms", None), ("0s", 0), ("1s", 1), ("1500ms", 2), ("30s", 30)])
def test_rabbitmq_heartbeat_is_whole_seconds_never_silently_off(given: str, sent: int | None) -> None:
    options = {"url": "amqp://guest:guest@127.0.0.1:5672/%2F", "heartbeat": given}
    if sent is None:
        with pytest.raises(AdapterOptionsError, match="at least 1s"):
            rabbitmq.create("mq", options)
        return
    adapter = rabbitmq.create("mq", options)
    assert rabbitmq.connection_parameters(adapter.options).heartbeat == sent


# --- Kafka producer life cycle -------------------------------------------------------------


def test_client_errors_keep_only_lines_about_this_adapters_servers() -> None:
    import logging

    with kafka_aiokafka._ClientErrors("kafka-a:9093,[::1]:9094,kafka-c") as errors:
        logger = logging.getLogger("aiokafka")
        logger.error('Unable connect to "%s:%s": %s', "kafka-b", 9092, "another broker's refusal")
        logger.error('Unable connect to "%s:%s": %s', "kafka-a", 9092, "the same host, another listener")
        assert errors.last is None, "another adapter's line is not this one's cause"
        logger.error('Unable connect to "%s:%s": %s', "kafka-c", 9092, "no port given: 9092")
        assert errors.last == "no port given: 9092"
        logger.error('Unable connect to "%s:%s": %s', "kafka-a", 9093, "SASL authentication failed")
        assert errors.last == "SASL authentication failed"
        logger.error('Unable connect to "%s:%s": %s', "::1", 9094, "certificate verify failed")
        assert errors.last == "certificate verify failed"
    assert errors not in logging.getLogger("aiokafka").handlers


async def test_a_producer_stuck_in_stop_has_its_sender_and_connections_ended() -> None:
    # aiokafka's stop() can hang past failing its buffered records: what it would
    # have ended (the sender task retrying records, the client's connections) must end.
    class Client:
        closed = False

        async def close(self) -> None:
            self.closed = True

    class Accumulator:
        def fail_all(self, exc: BaseException) -> None:
            pass

    sender_task = asyncio.ensure_future(asyncio.sleep(3600))
    producer = types.SimpleNamespace(
        stop=lambda: asyncio.sleep(3600),
        client=Client(),
        _message_accumulator=Accumulator(),
        _sender=types.SimpleNamespace(sender_task=sender_task),
    )
    await kafka.stop_within(producer, 0.05)  # type: ignore[arg-type]
    await asyncio.wait([sender_task], timeout=5)  # the positive signal: the sender task has ended
    assert sender_task.cancelled(), "the sender task would keep retrying records"
    assert producer.client.closed, "the connections would stay open"


async def test_a_producer_whose_stop_fails_is_dropped_with_its_connections_closed() -> None:
    # Seen in CI (tests/faults/test_exactly_once_faults.py, Kafka killed): aiokafka's
    # sender re-enqueued a batch that fail_all had failed, and stop() raised KeyError;
    # raised on from here, it ended the relay's exactly-once abort and the relay.
    class Client:
        closed = False

        async def close(self) -> None:
            self.closed = True

    async def failing_stop() -> None:
        raise KeyError("<MessageBatch>")

    producer = types.SimpleNamespace(stop=failing_stop, client=Client())
    await kafka.stop_within(producer, 0.05)  # type: ignore[arg-type]
    assert producer.client.closed, "the dropped producer's connections would stay open"


def test_an_old_rabbitmq_channel_closing_late_fails_nothing_of_the_current_one() -> None:
    # A channel replaced while it was closing finishes its close later: the futures
    # waiting then belong to the new channel, whose confirms are still to come.
    adapter = rabbitmq.create("mq", {"url": "amqp://guest:guest@127.0.0.1:5672/%2F"})
    old, current = object(), object()
    adapter._channel = current  # type: ignore[assignment]
    loop = asyncio.new_event_loop()
    try:
        waiting: asyncio.Future[object] = loop.create_future()
        adapter._unconfirmed[1] = (waiting, "m-1", "{}")  # type: ignore[assignment]
        adapter._on_channel_closed(old, pika.exceptions.ChannelClosedByBroker(404, "NOT_FOUND"))
        assert not waiting.done() and adapter._channel is current
        adapter._on_channel_closed(current, pika.exceptions.ChannelClosedByBroker(320, "CONNECTION_FORCED"))
        assert waiting.done() and adapter._channel is None, "the current channel's close fails its messages"
    finally:
        loop.close()


@pytest.mark.parametrize("client", ["aiokafka", "librdkafka"])
async def test_a_kafka_adapter_without_a_producer_starts_one_once_or_says_why_not(client: str) -> None:
    # After a reset whose new producer failed to start, publish starts one first: once,
    # however many workers publish at the same time; while it cannot, every message of
    # the batch is `unavailable` with the cause (no attempt spent).
    from outbox_relay import adapter as registry

    adapter = registry.create("kafka", "events", {"bootstrap_servers": "127.0.0.1:1", "client": client})
    starts: list[int] = []

    async def refused() -> None:
        starts.append(1)
        raise ConnectionRefusedError("connect call failed ('127.0.0.1', 1)")

    adapter.connect = refused  # type: ignore[method-assign]
    batch = [outgoing(topic="t", destination="t")]
    (result,) = await adapter.publish(batch)
    assert result.outcome is Outcome.UNAVAILABLE
    assert result.reason is not None and result.reason.startswith("kafka producer not connected: ")
    assert "connect call failed" in result.reason

    gate = asyncio.Event()

    async def slow_start() -> None:
        starts.append(2)
        await gate.wait()
        adapter._producer = object()  # type: ignore[attr-defined]  # started

    adapter.connect = slow_start  # type: ignore[method-assign]
    calls = [asyncio.ensure_future(adapter._reconnect()) for _ in range(3)]  # type: ignore[attr-defined]
    await asyncio.sleep(0)
    gate.set()
    # Three workers at once: one start, under the lifecycle lock; the others find it done.
    assert await asyncio.gather(*calls) == [None, None, None]
    assert starts.count(2) == 1


class _Silent:
    """A connection or channel that looks open and never answers (a frozen node)."""

    is_open = True

    def __init__(self) -> None:
        self.closed = False

    def channel(self, on_open_callback: object) -> None:
        pass  # the channel never opens

    def close(self) -> None:
        self.closed = True


async def test_a_rabbitmq_probe_that_opens_no_channel_gives_the_connection_up() -> None:
    # Only the heartbeat would close it (up to two heartbeats); until then every probe
    # and publish would wait on it instead of trying the next address.
    adapter = rabbitmq.create("mq", {"urls": ["amqp://a/%2F", "amqp://b/%2F"], "connect_timeout": "50ms"})
    frozen = _Silent()
    adapter._connection = frozen  # type: ignore[assignment]
    assert await adapter.ready() is False
    assert adapter._connection is None and frozen.closed, "the silent connection is given up"
    assert adapter._next_address == 1, "the next connect starts with the next node"


async def test_after_a_rabbitmq_nack_the_next_batch_goes_on_a_new_channel() -> None:
    # RabbitMQ 3.10 can leave a channel bound to a quorum queue leader that is gone,
    # nacking every publish (tests/clusters/test_rabbitmq_cluster.py, the partition).
    adapter = rabbitmq.create("mq", {"url": "amqp://guest:guest@127.0.0.1:5672/%2F"})
    old, new = _Silent(), _Silent()
    adapter._connection = _Silent()  # type: ignore[assignment]  # open
    adapter._channel = old  # type: ignore[assignment]
    nacked: asyncio.Future[object] = asyncio.get_running_loop().create_future()
    adapter._unconfirmed[1] = (nacked, "m-1", "{}")  # type: ignore[assignment]
    adapter._on_confirm(types.SimpleNamespace(method=pika.spec.Basic.Nack(delivery_tag=1)), old)
    assert nacked.done()

    async def opened() -> None:
        adapter._channel = new  # type: ignore[assignment]

    async def already_open() -> None:
        return None

    adapter._ensure_open = already_open  # type: ignore[method-assign]
    adapter._open_channel = opened  # type: ignore[method-assign]
    assert await adapter.publish([]) == []
    assert adapter._channel is new and old.closed, "the nacking channel is replaced and closed"
    adapter._open_channel = None  # type: ignore[assignment,method-assign]  # not called again
    assert await adapter.publish([]) == [], "one new channel per nack, not per batch"


class _ConfirmingChannel:
    """A publishing channel that records publishes; its confirms are sent by the test."""

    is_open = True

    def __init__(self) -> None:
        self.published = 0
        self.closed = False
        self.on_confirm: Any = None

    def basic_publish(self, *args: object, **kwargs: object) -> None:
        self.published += 1

    def add_on_close_callback(self, callback: object) -> None: ...

    def add_on_return_callback(self, callback: object) -> None: ...

    def confirm_delivery(self, on_confirm: Any, callback: Any) -> None:
        self.on_confirm = on_confirm
        callback(None)

    def close(self) -> None:
        self.closed, self.is_open = True, False

    def confirm(self, tag: int, *, nack: bool = False) -> None:
        method = (pika.spec.Basic.Nack if nack else pika.spec.Basic.Ack)(delivery_tag=tag, multiple=False)
        self.on_confirm(types.SimpleNamespace(method=method))


class _OpeningConnection:
    is_open = True

    def __init__(self) -> None:
        self.channels: list[_ConfirmingChannel] = []

    def channel(self, on_open_callback: Any) -> None:
        self.channels.append(_ConfirmingChannel())
        on_open_callback(self.channels[-1])


async def test_a_rabbitmq_channel_renewed_after_a_nack_first_lets_other_calls_confirms_arrive() -> None:
    # Calls await their confirms outside the adapter's lock, so another worker's call may
    # still wait on the old channel when the next call renews it after a nack; failed
    # there, its answers were all "unavailable", which the engine takes for an outage.
    adapter = rabbitmq.create("mq", {"url": "amqp://guest:guest@127.0.0.1:5672/%2F"})
    connection = _OpeningConnection()
    adapter._connection = connection  # type: ignore[assignment]
    await adapter._open_channel()  # type: ignore[attr-defined]
    [old] = connection.channels
    nacked = asyncio.ensure_future(adapter.publish([outgoing(1, destination="x"), outgoing(2, destination="x")]))
    waiting = asyncio.ensure_future(adapter.publish([outgoing(3, destination="x"), outgoing(4, destination="x")]))
    await wait_until(lambda: old.published == 4, timeout=5)
    old.confirm(1, nack=True)
    old.confirm(2)
    assert [r.outcome for r in await nacked] == [Outcome.TRANSIENT, Outcome.ACKED]
    renewing = asyncio.ensure_future(adapter.publish([outgoing(5, destination="x")]))
    # The renewing call holds the lock, waiting for the confirms still due on the old channel.
    await wait_until(lambda: adapter._lock.locked() and not renewing.done(), timeout=5)  # type: ignore[attr-defined]
    old.confirm(3)
    old.confirm(4)
    assert [r.outcome for r in await waiting] == [Outcome.ACKED, Outcome.ACKED]
    await wait_until(lambda: len(connection.channels) == 2 and connection.channels[1].published == 1, timeout=5)
    assert old.closed
    connection.channels[1].confirm(1)
    assert [r.outcome for r in await renewing] == [Outcome.ACKED]


async def test_a_rabbitmq_connection_lost_while_a_renewal_waits_is_reconnected_with_a_reason() -> None:
    # Lost in the wait, the renewal opened no channel on it: the call answered
    # "RabbitMQ unreachable: " with nothing after it (an assertion's empty message).
    adapter = rabbitmq.create("mq", {"url": "amqp://guest:guest@127.0.0.1:1/%2F", "connect_timeout": "1s"})
    connection = _OpeningConnection()
    adapter._connection = connection  # type: ignore[assignment]
    await adapter._open_channel()  # type: ignore[attr-defined]
    [old] = connection.channels
    waiting = asyncio.ensure_future(adapter.publish([outgoing(1, destination="x")]))
    await wait_until(lambda: old.published == 1, timeout=5)
    adapter._renew_channel = True  # type: ignore[attr-defined]  # a nack came
    renewing = asyncio.ensure_future(adapter.publish([outgoing(2, destination="x")]))
    await wait_until(lambda: adapter._lock.locked() and not renewing.done(), timeout=5)  # type: ignore[attr-defined]
    adapter._on_connection_closed(connection, pika.exceptions.StreamLostError("lost"))  # type: ignore[attr-defined]
    assert [r.outcome for r in await waiting] == [Outcome.UNAVAILABLE]
    [answer] = await renewing
    assert answer.outcome is Outcome.UNAVAILABLE
    assert answer.reason is not None and answer.reason.startswith("RabbitMQ unreachable: cannot connect"), answer.reason


async def test_a_rabbitmq_renewal_cancelled_in_its_wait_is_left_to_the_next_call() -> None:
    # The dispatcher's publish_timeout may cancel the call that waits to renew: the
    # nacking channel must still be replaced, by the next call.
    adapter = rabbitmq.create("mq", {"url": "amqp://guest:guest@127.0.0.1:5672/%2F", "connect_timeout": "30s"})
    connection = _OpeningConnection()
    adapter._connection = connection  # type: ignore[assignment]
    await adapter._open_channel()  # type: ignore[attr-defined]
    [old] = connection.channels
    waiting = asyncio.ensure_future(adapter.publish([outgoing(1, destination="x")]))
    await wait_until(lambda: old.published == 1, timeout=5)
    adapter._renew_channel = True  # type: ignore[attr-defined]  # a nack came
    cancelled = asyncio.ensure_future(adapter.publish([outgoing(2, destination="x")]))
    await wait_until(lambda: adapter._lock.locked() and not cancelled.done(), timeout=5)  # type: ignore[attr-defined]
    cancelled.cancel()
    with pytest.raises(asyncio.CancelledError):
        await cancelled
    old.confirm(1)
    assert [r.outcome for r in await waiting] == [Outcome.ACKED]
    renewing = asyncio.ensure_future(adapter.publish([outgoing(3, destination="x")]))
    await wait_until(lambda: len(connection.channels) == 2 and connection.channels[1].published == 1, timeout=5)
    assert old.closed, "the nacking channel is replaced by the next call"
    connection.channels[1].confirm(1)
    assert [r.outcome for r in await renewing] == [Outcome.ACKED]


def test_kafka_partitions_keyed_as_the_producer_keyless_one_per_call() -> None:
    from aiokafka.partitioner import DefaultPartitioner

    class Metadata:
        def partitions_for_topic(self, topic: str) -> set[int]:
            return {0, 1, 2, 3, 4, 5}

        def available_partitions_for_topic(self, topic: str) -> set[int]:
            return {0, 1, 2, 3, 4, 5}

    producer = types.SimpleNamespace(_metadata=Metadata(), _partitioner=DefaultPartitioner())
    keys = [f"key-{i}".encode() for i in range(50)]
    chosen = kafka_aiokafka._Partitions(producer, 1000)  # type: ignore[arg-type]
    # Keyed: what the producer's own send() would choose (murmur2, as the Java client).
    assert [chosen.of("t", key, 10) for key in keys] == [DefaultPartitioner()(key, list(range(6)), []) for key in keys]
    assert len({chosen.of("t", key, 10) for key in keys}) > 1
    # Keyless, small records: one partition for the whole call (one record batch)...
    assert len({chosen.of("t", None, 10) for _ in range(100)}) == 1
    # ... random across calls;
    assert len({kafka_aiokafka._Partitions(producer, 1000).of("t", None, 10) for _ in range(200)}) == 6  # type: ignore[arg-type]
    # large records: a batch's worth (1000 bytes) per partition, each partition once
    # while one is left, so a round still carries a batch per partition.
    spread = kafka_aiokafka._Partitions(producer, 1000)  # type: ignore[arg-type]
    placed = [spread.of("t", None, 400) for _ in range(12)]
    assert sorted(placed) == sorted(list(range(6)) * 2)
    assert all(placed[i] == placed[i + 1] for i in range(0, 12, 2)), "two 400-byte records fill a 1000-byte batch"


class _DeclareChannel:
    """A channel whose exchange declare the broker answers by closing it with `reason`."""

    is_open = False

    def __init__(self, reason: BaseException) -> None:
        self._reason = reason
        self._on_close: Any = None

    def add_on_close_callback(self, callback: Any) -> None:
        self._on_close = callback

    def exchange_declare(self, name: str, **_options: Any) -> None:
        self._on_close(self, self._reason)


@pytest.mark.parametrize(
    ("reason", "expected"),
    [
        # Refused for the exchange itself (no configure permission, a reserved amq.*
        # name): dead-lettered with the broker's reason, not waited for forever.
        (
            pika.exceptions.ChannelClosedByBroker(403, "ACCESS_REFUSED - access to exchange 'x' refused"),
            Outcome.PERMANENT,
        ),
        (pika.exceptions.ChannelClosedByBroker(404, "NOT_FOUND - no exchange 'x'"), Outcome.PERMANENT),
        # The node went away during the declare: an outage.
        (pika.exceptions.StreamLostError("Transport indicated EOF"), Outcome.UNAVAILABLE),
        # A closure the broker chose for another error: an attempt spent.
        (pika.exceptions.ConnectionClosedByBroker(541, "INTERNAL_ERROR"), Outcome.TRANSIENT),
    ],
)
async def test_rabbitmq_a_failed_declare_counts_as_why_it_failed(reason: BaseException, expected: Outcome) -> None:
    adapter = rabbitmq.create("mq", {"url": "amqp://h", "exchange": "x"})

    async def side_channel() -> _DeclareChannel:
        return _DeclareChannel(reason)

    adapter._side_channel = side_channel  # type: ignore[method-assign,assignment]
    result = await adapter._publish_one(outgoing(destination="x", explicit_destination=True))
    assert isinstance(result, PublishResult) and result.outcome is expected, result


def test_librdkafka_logs_a_lost_connection_it_retries_by_itself_once_per_code_and_interval() -> None:
    # librdkafka reconnects and resends by itself, so a connection cut again and again
    # fails no publish: the relay must still say so (tests/clusters/test_network_faults.py,
    # a cut 2 KB into each connection, went unnoticed for 60 s with small requests).
    from confluent_kafka import KafkaError
    from outbox_relay_adapters import kafka_librdkafka
    from structlog.testing import capture_logs

    adapter = kafka_librdkafka.LibrdkafkaAdapter(
        "k", kafka.KafkaOptions(bootstrap_servers="h:9092", client="librdkafka")
    )
    with capture_logs() as logs:
        for _ in range(3):
            adapter._client_error(KafkaError(KafkaError._TRANSPORT, "127.0.0.1:9092/1: Disconnected"))
        adapter._client_error(KafkaError(KafkaError._TIMED_OUT, "request timed out"))
    lines = [(line["event"], line["code"]) for line in logs]
    assert lines == [("kafka_client_error", "_TRANSPORT"), ("kafka_client_error", "_TIMED_OUT")]
    assert "Disconnected" in logs[0]["error"] and logs[0]["log_level"] == "warning"


def test_librdkafka_configuration_warnings_are_debug_not_warnings(caplog: pytest.LogCaptureFixture) -> None:
    # A CONFWARN is about the adapter's own settings (no raw librdkafka property comes
    # from the config): `check` printed one on every run. A real one, from librdkafka:
    # a consumer's property given to a producer, beside the adapter's settings.
    from confluent_kafka import Producer
    from outbox_relay_adapters import kafka_librdkafka

    caplog.set_level(logging.DEBUG, logger=kafka_librdkafka.LIBRDKAFKA_LOG.name)
    options = kafka.KafkaOptions(bootstrap_servers="127.0.0.1:1", client="librdkafka")
    settings = {**kafka_librdkafka.producer_config(options), "fetch.wait.max.ms": 100}
    producer = Producer(settings, logger=kafka_librdkafka.LIBRDKAFKA_LOG)

    def confwarns() -> list[logging.LogRecord]:
        producer.poll(0.1)  # serves librdkafka's log lines
        return [r for r in caplog.records if "CONFWARN" in r.getMessage()]

    wait_for(confwarns, 10, "librdkafka's configuration warning")
    found = confwarns()
    assert any("fetch.wait.max.ms is a consumer property" in r.getMessage() for r in found), found
    assert {r.levelno for r in found} == {logging.DEBUG}


def test_aiokafka_topic_not_found_is_debug_while_the_topic_is_created_then_keeps_its_level() -> None:
    # A topic's first "not found" lines (auto-create answering its first request) go down
    # to debug; one still missing past the grace (deleted under a running relay, never
    # created) keeps aiokafka's level: the only line that names the topic.
    from outbox_relay_adapters.kafka_aiokafka import _TopicCreatedOnFirstUse

    lowered = _TopicCreatedOnFirstUse()

    def said(topic: str) -> int:
        record = logging.LogRecord(
            "aiokafka.cluster", logging.ERROR, __file__, 1, "Topic %s not found in cluster metadata", (topic,), None
        )
        assert lowered.filter(record)
        return record.levelno

    assert said("orders") == logging.DEBUG
    assert said("orders") == logging.DEBUG, "within the grace"
    lowered._first_missing["orders"] -= lowered.CREATION_GRACE_S
    assert said("orders") == logging.ERROR, "still missing past the grace"
    assert said("payments") == logging.DEBUG, "another topic has its own grace"
    other = logging.LogRecord("aiokafka.cluster", logging.ERROR, __file__, 1, "Unable to update metadata", (), None)
    assert lowered.filter(other) and other.levelno == logging.ERROR
