"""W3C trace context from the producer's span to the consumer's, through the outbox.

Optional: with OpenTelemetry installed (``pip install 'outbox-relay[otel]'``),
``enqueue`` records the current ``traceparent`` / ``tracestate`` in the message's
headers, which every adapter publishes (Kafka and AMQP headers, webhook headers, the
JSON-lines record); the relay, when a tracer provider is configured, records one span
per published batch linked to each message's trace; a consumer continues the trace
with :func:`consumer_span`. Without OpenTelemetry every function here is a no-op, and
the write path pays one cached ``None`` check.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator, Mapping, Sequence
from types import ModuleType
from typing import Any

TRACE_HEADERS = ("traceparent", "tracestate")


@functools.cache
def _otel() -> tuple[ModuleType, ModuleType] | None:
    """(trace, propagate) of opentelemetry, or None when it is not installed."""
    try:
        from opentelemetry import propagate, trace
    except ImportError:
        return None
    return trace, propagate


def with_trace_context(headers: Mapping[str, str] | None) -> Mapping[str, str] | None:
    """`headers` plus the current span's traceparent/tracestate, when there is a current
    span and the caller set neither (in any letter case: the two travel as a pair, and
    a caller's own trace context wins); otherwise `headers` unchanged."""
    otel = _otel()
    if otel is None or (headers is not None and not isinstance(headers, Mapping)):
        return headers  # not a mapping: the header check says so, in its own words
    if headers and any(str(name).lower() in TRACE_HEADERS for name in headers):
        return headers
    trace, propagate = otel
    if not trace.get_current_span().get_span_context().is_valid:
        return headers
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    extra = {name: value for name, value in carrier.items() if name in TRACE_HEADERS}
    if not extra:
        return headers
    return {**(headers or {}), **extra}


def _trace_headers(headers: Mapping[str, str]) -> dict[str, str]:
    """The traceparent/tracestate of `headers`, in whatever letter case they were set,
    under the lowercase names the W3C propagator reads. A caller may set `Traceparent`
    itself (with_trace_context then leaves the pair to it, header names being
    case-insensitive): read in lowercase only, its trace broke at the relay and the
    consumer. Of two spellings of one header, the lowercase one wins."""
    found: dict[str, str] = {}
    for name, value in headers.items():
        lower = str(name).lower()
        if lower in TRACE_HEADERS and (lower not in found or name == lower):
            found[lower] = value
    return found


def _provider_set(trace: ModuleType) -> bool:
    # Until an application sets one, the API hands out its proxy provider, whose
    # tracers make non-recording spans (and the explicit no-op provider does the same).
    return not isinstance(trace.get_tracer_provider(), (trace.ProxyTracerProvider, trace.NoOpTracerProvider))


def _span_context(headers: Mapping[str, str]) -> Any:
    otel = _otel()
    assert otel is not None
    trace, propagate = otel
    return trace.get_current_span(propagate.extract(headers)).get_span_context()


@contextlib.contextmanager
def batch_span(broker_headers: Sequence[Mapping[str, str]], *, attributes: Mapping[str, Any]) -> Iterator[None]:
    """The relay's span for one published batch, linked to every message's trace.

    Recorded only when OpenTelemetry is installed and the process set a tracer
    provider: without one every span is a no-op, so the publish loop does not parse
    each message's traceparent for links nobody keeps."""
    otel = _otel()
    if otel is None or not _provider_set(otel[0]):
        yield
        return
    trace = otel[0]
    links = []
    for headers in broker_headers:
        carried = _trace_headers(headers)
        if "traceparent" in carried:
            context = _span_context(carried)
            if context.is_valid:
                links.append(trace.Link(context))
    tracer = trace.get_tracer("outbox_relay")
    with tracer.start_as_current_span(
        "outbox-relay publish", kind=trace.SpanKind.PRODUCER, links=links, attributes=dict(attributes)
    ):
        yield


@contextlib.contextmanager
def consumer_span(name: str, headers: Mapping[str, str], **attributes: Any) -> Iterator[Any]:
    """A consumer's span, child of the producer's span the message was enqueued in.

    ``headers``: the message's headers as text (a Kafka record's, decoded; a pika
    message's ``properties.headers``); traceparent and tracestate are read in any
    letter case. Yields the span (None without OpenTelemetry).
    """
    otel = _otel()
    if otel is None:
        yield None
        return
    trace, propagate = otel
    parent = propagate.extract(_trace_headers(headers))
    tracer = trace.get_tracer("outbox_relay")
    with tracer.start_as_current_span(
        name, context=parent, kind=trace.SpanKind.CONSUMER, attributes=attributes
    ) as span:
        yield span
