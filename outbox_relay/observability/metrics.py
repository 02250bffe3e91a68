"""Prometheus metrics, all prefixed ``outbox_relay_``, in a registry per relay.

The engine reports facts here (a batch recorded, a publish call's duration, a
wake-up, a worker's connection); maintenance sets the gauges it reads from the
database (pending, lag, the oldest open transaction); the health probes set the
connected gauges. ``/metrics`` on the health port serves the registry.
"""

from __future__ import annotations

from bisect import bisect_left
from collections import Counter as Tally
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime

import structlog
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from outbox_relay.models import Message, Record, RecordKind

log = structlog.get_logger("outbox_relay.metrics")

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)
BATCH_BUCKETS = (1, 2, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000)
# outbox_relay_messages_published{destination}: at most this many label values per broker;
# the rest are counted under OTHER_DESTINATIONS.
MAX_DESTINATION_LABELS = 100
OTHER_DESTINATIONS = "(other)"
# The WAL source's states and park reasons (sources/wal/lag.py says what each means):
# every label value exists from the start, so a relay in table mode serves them too.
WAL_STATES = ("off", "starting", "streaming", "paused", "standby", "restarting", "stopped")
WAL_PARK_REASONS = ("transient", "unavailable", "permanent", "held")


KAFKA_TRANSACTION_OUTCOMES = ("committed", "aborted", "unsure", "fenced")


def _total(counter: Counter) -> int:
    """A counter's value summed over all its labels."""
    return int(
        sum(sample.value for metric in counter.collect() for sample in metric.samples if sample.name.endswith("_total"))
    )


def observe_many(histogram: Histogram, amounts: Iterable[float]) -> None:
    """`histogram.observe(a)` for each amount, in one update per bucket.

    A batch's ack latencies are hundreds of observations, each taking the histogram's
    locks and walking its buckets: per message, the largest part of the engine's own
    bookkeeping (benchmarks/results/relay_profile.md). prometheus_client has no bulk
    observe, so this sorts the amounts into the buckets itself (a bucket holds what is
    at most its bound and above the previous one, as observe() does) and adds each
    bucket's count once. It reads the histogram's private fields; a prometheus_client
    without them gets the per-amount observe() (tests/unit/test_metrics_bulk.py checks
    both give the same exposition).
    """
    bounds = getattr(histogram, "_upper_bounds", None)
    buckets = getattr(histogram, "_buckets", None)
    total = getattr(histogram, "_sum", None)
    if bounds is None or buckets is None or total is None or len(bounds) != len(buckets):
        for amount in amounts:
            histogram.observe(amount)
        return
    amounts = list(amounts)
    if not amounts:
        return
    total.inc(sum(amounts))
    for index, count in Tally(bisect_left(bounds, amount) for amount in amounts).items():
        buckets[index].inc(count)


class RelayMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.published = Counter(
            "outbox_relay_messages_published",
            "Messages acknowledged by a broker.",
            ["broker", "destination"],
            registry=r,
        )
        self.publish_failures = Counter(
            "outbox_relay_publish_failures",
            "Messages a broker did not acknowledge, by kind (transient, unavailable, permanent).",
            ["broker", "kind"],
            registry=r,
        )
        self.dead_lettered = Counter(
            "outbox_relay_messages_dead_lettered", "Messages dead-lettered.", ["broker"], registry=r
        )
        self.dead_letters_published = Counter(
            "outbox_relay_dead_letters_published",
            "Dead letters a dead-letter topic acknowledged (dead_letters.publish_to).",
            registry=r,
        )
        self.dead_letter_publish_failures = Counter(
            "outbox_relay_dead_letter_publish_failures",
            "Dead letters a dead-letter topic did not acknowledge (tried again).",
            registry=r,
        )
        self.pending = Gauge(
            "outbox_relay_pending_messages", "Messages neither dispatched nor dead-lettered.", registry=r
        )
        self.oldest_pending_age = Gauge(
            "outbox_relay_oldest_pending_age_seconds", "Age of the oldest pending message (the lag).", registry=r
        )
        self.in_flight = Gauge(
            "outbox_relay_messages_in_flight", "Messages claimed by this relay and not yet recorded.", registry=r
        )
        self.batch_size = Histogram(
            "outbox_relay_batch_size", "Messages per claimed batch.", buckets=BATCH_BUCKETS, registry=r
        )
        self.publish_duration = Histogram(
            "outbox_relay_publish_duration_seconds",
            "Duration of one publish call to a broker.",
            ["broker"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.ack_latency = Histogram(
            "outbox_relay_commit_to_ack_seconds",
            "From enqueue (the row's created_at) to the recorded broker ack.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.database_connected = Gauge(
            "outbox_relay_database_connected", "1 when the relay's database connections are up.", registry=r
        )
        self.broker_connected = Gauge(
            "outbox_relay_broker_connected",
            "1 when the broker's adapter is connected and ready.",
            ["broker"],
            registry=r,
        )
        self.broker_circuit_open = Gauge(
            "outbox_relay_broker_circuit_open",
            "1 while the relay sends nothing to a broker that answered "
            "nothing (its messages wait, spending no attempt) and probes it until it answers.",
            ["broker"],
            registry=r,
        )
        self.wakeups = Counter(
            "outbox_relay_wakeups", "Why idle workers woke: notify, poll or backlog.", ["reason"], registry=r
        )
        self.oldest_transaction_age = Gauge(
            "outbox_relay_oldest_transaction_age_seconds",
            "Age of the oldest open transaction in the database (it holds back vacuum and slows claims).",
            registry=r,
        )
        # The WAL source (sources/wal/lag.py); in table mode 0, and state "off".
        self.wal_slot_lag_bytes = Gauge(
            "outbox_relay_wal_slot_lag_bytes",
            "WAL written since the position the relay last confirmed to the WAL source's slot "
            "(current LSN - confirmed_flush_lsn).",
            registry=r,
        )
        self.wal_slot_retained_bytes = Gauge(
            "outbox_relay_wal_slot_retained_bytes",
            "WAL the WAL source's slot keeps on disk (current LSN - restart_lsn), what max_slot_wal_keep_size limits.",
            registry=r,
        )
        self.wal_slot_lag_seconds = Gauge(
            "outbox_relay_wal_slot_lag_seconds",
            "Age of the oldest committed transaction the WAL source read and has not confirmed (0: all confirmed).",
            registry=r,
        )
        self.wal_source_state = Gauge(
            "outbox_relay_wal_source_state",
            "1 for the WAL source's state (off, starting, streaming, paused for a broker, standby, restarting, "
            "stopped), 0 for the others.",
            ["state"],
            registry=r,
        )
        self.wal_parked = Counter(
            "outbox_relay_wal_messages_parked",
            "Messages the WAL source parked into the outbox table, by reason (transient, unavailable, permanent, "
            "held).",
            ["reason"],
            registry=r,
        )
        for reason in WAL_PARK_REASONS:
            self.wal_parked.labels(reason)
        # One exactly-once broker per relay (assembly.py), so no broker label; every
        # outcome shown from the start, 0 until it happens (a family with no sample
        # reads as missing to the dashboards and alerts).
        self.kafka_transactions = Counter(
            "outbox_relay_kafka_transactions",
            "Kafka transactions of the exactly-once WAL relay, by outcome: committed, aborted (a message "
            "refused or not acked: the batch goes again), unsure (a commit without an answer, settled by the "
            "position read back), fenced.",
            ["outcome"],
            registry=r,
        )
        for outcome in KAFKA_TRANSACTION_OUTCOMES:
            self.kafka_transactions.labels(outcome)
        self.wal_state_now = "off"
        self.wal_state("off")
        self._connected_workers = 0
        self._destination_labels: dict[str, set[str]] = {}
        self._destination_cap_logged: set[str] = set()

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def published_total(self) -> int:
        """Messages acknowledged so far, over every broker and destination."""
        return _total(self.published)

    def totals(self) -> tuple[int, int, int]:
        """Published, failed (any kind) and dead-lettered so far: what the heartbeat's
        samples count the differences of (the console's chart)."""
        return _total(self.published), _total(self.publish_failures), _total(self.dead_lettered)

    def wal_lag_seconds(self) -> float:
        """The WAL source's lag as its gauge reads it now (sources/wal/lag.py; 0 in table
        mode): the console's chart shows it when the relay streams from the WAL."""
        (family,) = self.wal_slot_lag_seconds.collect()
        return float(family.samples[0].value)

    def wal_state(self, state: str) -> None:
        """The WAL source is now in `state` (one of WAL_STATES)."""
        if state not in WAL_STATES:
            raise ValueError(f"unknown WAL source state {state!r}")
        self.wal_state_now = state
        for name in WAL_STATES:
            self.wal_source_state.labels(name).set(1 if name == state else 0)

    def worker_connected(self, delta: int) -> None:
        """A worker's database connection opened (+1) or was closed (-1): database_connected
        is 1 while any is open."""
        self._connected_workers = max(0, self._connected_workers + delta)
        self.database_connected.set(1 if self._connected_workers else 0)

    def batch_recorded(self, messages: Sequence[Message], records: Sequence[Record]) -> None:
        """Metrics for a committed batch (the relay's first RelayObserver)."""
        self.batch_size.observe(len(messages))
        created = {m.id: m.created_at for m in messages}
        now = datetime.now(UTC)
        published: Tally[tuple[str, str]] = Tally()
        latencies: list[float] = []
        for record in records:
            if record.kind is RecordKind.ACKED:
                published[(record.broker or "", record.destination or "")] += 1
                latencies.append(max(0.0, (now - created[record.id]).total_seconds()))
            elif record.kind is RecordKind.DEAD:
                self.dead_lettered.labels(record.broker or "").inc()
        observe_many(self.ack_latency, latencies)
        # One labelled increment per destination, not per message: this is the hot loop.
        for (broker, destination), n in published.items():
            self.published.labels(broker, self._destination_label(broker, destination)).inc(n)
        log.debug("batch_recorded", claimed=len(messages), acked=sum(published.values()))

    def _destination_label(self, broker: str, destination: str) -> str:
        """`destination`, or OTHER_DESTINATIONS once a broker has MAX_DESTINATION_LABELS:
        a route without a destination sends each topic to a destination of its name, and
        topics can be many (one per tenant): a label set per topic would grow the metrics
        without bound."""
        seen = self._destination_labels.setdefault(broker, set())
        if destination in seen:
            return destination
        if len(seen) < MAX_DESTINATION_LABELS:
            seen.add(destination)
            return destination
        if broker not in self._destination_cap_logged:
            self._destination_cap_logged.add(broker)
            log.warning(
                "metric_destinations_capped", broker=broker, limit=MAX_DESTINATION_LABELS, label=OTHER_DESTINATIONS
            )
        return OTHER_DESTINATIONS
