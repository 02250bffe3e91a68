"""One trace from the producer's span to the consumer's, through the outbox, the relay
and a real Kafka broker (OpenTelemetry's SDK with its in-memory exporter)."""

from __future__ import annotations

import subprocess
import sys
import uuid
from collections.abc import Iterator
from types import SimpleNamespace

import psycopg
import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from outbox_relay import enqueue, inbox
from outbox_relay.assembly import build_adapters
from outbox_relay.tracing import consumer_span
from tests.consumers import kafka_create_topic, kafka_read
from tests.support.configs import make_config
from tests.support.outbox import pending
from tests.support.relay import running_relay
from tests.support.waiting import wait_until

OWN_TRACE_ID = 0x0AF7651916CD43DD8448EB211C80319C
OWN_SPAN_ID = 0xB7AD6B7169203331


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    # The global tracer provider can be set once per process. Set here, then shut down
    # after the test, so that the rest of the suite exports nothing (a shut-down
    # processor drops spans) and holds no growing list of them.
    assert not isinstance(trace.get_tracer_provider(), TracerProvider), "set once, by this test only"
    provider = TracerProvider()
    exporter = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    try:
        yield exporter
    finally:
        provider.shutdown()
        exporter.clear()


async def test_one_trace_from_the_producer_to_the_consumer_through_kafka(
    db: str, kafka_bootstrap: str, spans: InMemorySpanExporter
) -> None:
    topic = f"traced-{uuid.uuid4().hex[:10]}"
    await kafka_create_topic(kafka_bootstrap, topic, partitions=1)
    tracer = trace.get_tracer("shop")
    with psycopg.connect(db) as conn, tracer.start_as_current_span("place order") as producer:
        message_id = enqueue(conn, "orders.created", {"order": 1}, key="order-1", headers={"source": "shop"})
        conn.commit()
    with psycopg.connect(db) as conn:  # no span: no trace headers
        untraced = enqueue(conn, "orders.created", {"order": 2}, key="order-2")
        conn.commit()
    own_trace = {"Traceparent": f"00-{OWN_TRACE_ID:032x}-{OWN_SPAN_ID:016x}-01", "TraceState": "shop=forwarded"}
    with psycopg.connect(db) as conn, tracer.start_as_current_span("forward"):
        # A caller's own trace context (any letter case) wins, as a pair.
        own = enqueue(conn, "orders.created", {"order": 3}, key="order-3", headers=own_trace)
        row = conn.execute("SELECT headers FROM outbox.messages WHERE message_id = %s", (own,)).fetchone()
        conn.commit()
    assert row is not None and row[0] == own_trace
    config = make_config(
        db,
        brokers={"events": {"type": "kafka", "bootstrap_servers": kafka_bootstrap}},
        routes=[{"topic": "*", "broker": "events", "destination": topic}],
        workers=1,
    )
    async with running_relay(config, build_adapters(config)):
        await wait_until(lambda: pending(db) == 0, timeout=60)
    received = {r.message_id: r for r in await kafka_read(kafka_bootstrap, topic, 3)}
    record = received[str(message_id)]
    assert record.headers["source"] == "shop", "the application's own headers are kept"
    assert "traceparent" in record.headers
    assert "traceparent" not in received[str(untraced)].headers

    with consumer_span("handle order", record.headers, **{"messaging.message.id": record.message_id}):
        pass
    # The caller's own pair, capitalised, is read like the lowercase one: by the relay's
    # batch span (a link) and the consumer's (its parent).
    forwarded = received[str(own)]
    assert {k: v for k, v in forwarded.headers.items() if k.lower() in {"traceparent", "tracestate"}} == own_trace
    with consumer_span("handle forwarded order", forwarded.headers):
        pass
    # The inbox's helper does the same around the handler it runs once per message.
    kafka_record = SimpleNamespace(
        topic=topic, partition=0, offset=0, headers=[(k, v.encode()) for k, v in record.headers.items()]
    )
    with psycopg.connect(db) as conn:
        inbox.install(conn)
        ran = [inbox.process_message(conn, kafka_record, lambda c: None, span_name="bill order") for _ in range(2)]
        forwarded_record = SimpleNamespace(
            topic=topic, partition=0, offset=2, headers=[(k, v.encode()) for k, v in forwarded.headers.items()]
        )
        inbox.process_message(conn, forwarded_record, lambda c: None, span_name="bill forwarded order")
    assert ran == [True, False], "once per message"

    finished = {span.name: span for span in spans.get_finished_spans()}
    produced = producer.get_span_context()
    consumed = finished["handle order"]
    assert consumed.context.trace_id == produced.trace_id, "the consumer continues the producer's trace"
    assert consumed.parent is not None and consumed.parent.span_id == produced.span_id
    assert consumed.kind is trace.SpanKind.CONSUMER
    billed = [span for span in spans.get_finished_spans() if span.name == "bill order"]
    assert len(billed) == 2 and all(
        span.parent is not None
        and span.parent.span_id == produced.span_id
        and span.context.trace_id == produced.trace_id
        for span in billed
    )
    for name in ("handle forwarded order", "bill forwarded order"):
        span = finished[name]
        assert span.context.trace_id == OWN_TRACE_ID, f"{name}: the caller's capitalised Traceparent is not read"
        assert span.parent is not None and span.parent.span_id == OWN_SPAN_ID, name
        assert span.context.trace_state.get("shop") == "forwarded", f"{name}: TraceState is not read"
    published = finished["outbox-relay publish"]
    assert produced.span_id in {link.context.span_id for link in published.links}, (
        "the relay's batch span links to the message's trace"
    )
    assert OWN_SPAN_ID in {link.context.span_id for link in published.links}, (
        "the relay's batch span links to the trace of a capitalised Traceparent"
    )
    assert published.attributes is not None and published.attributes["messaging.batch.message_count"] == 3


def test_without_opentelemetry_enqueue_adds_nothing_and_works(db: str) -> None:
    # A process where OpenTelemetry cannot be imported: enqueue works, no trace headers.
    script = (
        "import sys; sys.modules['opentelemetry'] = None\n"
        "import psycopg\n"
        "from outbox_relay import enqueue, tracing\n"
        "assert tracing._otel() is None\n"
        f"conn = psycopg.connect({db!r})\n"
        "enqueue(conn, 't', {'a': 1}, headers={'h': 'v'})\n"
        "conn.commit()\n"
        "print(conn.execute('SELECT headers FROM outbox.messages').fetchone()[0])\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "{'h': 'v'}"
