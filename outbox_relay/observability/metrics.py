"""Prometheus metrics, all prefixed ``outbox_relay_``, in a registry per relay.

The engine reports facts here (a batch recorded, a publish call's duration, a
wake-up); maintenance sets the gauges it reads from the database (pending, lag, the
oldest open transaction). ``/metrics`` on the health port serves the registry.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)
BATCH_BUCKETS = (1, 2, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000)


class RelayMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.published = Counter(
            "outbox_relay_messages_published", "Messages acknowledged by a broker.",
            ["broker", "destination"], registry=r)
        self.publish_failures = Counter(
            "outbox_relay_publish_failures", "Messages a broker did not acknowledge, by kind "
            "(transient, unavailable, permanent).", ["broker", "kind"], registry=r)
        self.dead_lettered = Counter(
            "outbox_relay_messages_dead_lettered", "Messages dead-lettered.", ["broker"], registry=r)
        self.pending = Gauge(
            "outbox_relay_pending_messages", "Messages neither dispatched nor dead-lettered.", registry=r)
        self.oldest_pending_age = Gauge(
            "outbox_relay_oldest_pending_age_seconds", "Age of the oldest pending message (the lag).", registry=r)
        self.in_flight = Gauge(
            "outbox_relay_messages_in_flight", "Messages claimed by this relay and not yet recorded.", registry=r)
        self.batch_size = Histogram(
            "outbox_relay_batch_size", "Messages per claimed batch.", buckets=BATCH_BUCKETS, registry=r)
        self.publish_duration = Histogram(
            "outbox_relay_publish_duration_seconds", "Duration of one publish call to a broker.",
            ["broker"], buckets=LATENCY_BUCKETS, registry=r)
        self.ack_latency = Histogram(
            "outbox_relay_commit_to_ack_seconds", "From enqueue (the row's created_at) to the recorded "
            "broker ack.", buckets=LATENCY_BUCKETS, registry=r)
        self.database_connected = Gauge(
            "outbox_relay_database_connected", "1 when the relay's database connections are up.", registry=r)
        self.broker_connected = Gauge(
            "outbox_relay_broker_connected", "1 when the broker's adapter is connected and ready.",
            ["broker"], registry=r)
        self.broker_circuit_open = Gauge(
            "outbox_relay_broker_circuit_open", "1 while the relay sends nothing to a broker that answered "
            "nothing (its messages wait, spending no attempt) and probes it until it answers.",
            ["broker"], registry=r)
        self.wakeups = Counter(
            "outbox_relay_wakeups", "Why idle workers woke: notify, poll or backlog.", ["reason"], registry=r)
        self.oldest_transaction_age = Gauge(
            "outbox_relay_oldest_transaction_age_seconds", "Age of the oldest open transaction in the "
            "database (it holds back vacuum and slows claims).", registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)
