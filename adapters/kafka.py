"""``type: kafka``: the entry point (pyproject.toml) that chooses the client.

Two clients publish the same records with the same guarantees: aiokafka
(``client: aiokafka``, the default: kafka_aiokafka.py) and librdkafka through
confluent-kafka (``client: librdkafka``: kafka_librdkafka.py, faster:
docs/explanation/performance-kafka.md). Only this module knows both, so neither client imports the other;
what they share is _kafka_common.py. Beside ``create``, the hooks that
outbox_relay/adapter.py looks for next to it: ``check_destination`` and the audit's
``read_back``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any

from ._kafka_common import CODECS, KafkaOptions, SaslOptions
from ._options import parse_options
from ._topics import topic_name_problem
from .kafka_aiokafka import KafkaAdapter, classify, client_settings, producer_settings, stop_within
from .kafka_read_back import read_back
from .kafka_transactions import KafkaTransactions

# Importable from here as before the clients had modules of their own (the benchmarks
# and tests use them).
__all__ = [
    "CODECS",
    "KafkaAdapter",
    "KafkaOptions",
    "SaslOptions",
    "check_destination",
    "classify",
    "client_settings",
    "create",
    "producer_settings",
    "read_back",
    "stop_within",
]


def create(name: str, options: Mapping[str, Any]) -> KafkaAdapter | Any:
    parsed = parse_options(KafkaOptions, options)
    if parsed.client == "librdkafka":
        from .kafka_librdkafka import LibrdkafkaAdapter  # optional: confluent-kafka
        from .kafka_librdkafka_transactions import LibrdkafkaTransactions

        adapter: Any = LibrdkafkaAdapter(name, parsed)
        transactions: Callable[[str, KafkaOptions, str], Any] = LibrdkafkaTransactions
    else:
        adapter, transactions = KafkaAdapter(name, parsed), KafkaTransactions
    if parsed.exactly_once:
        # Here, not in the client's module: each transactions module builds on its
        # client's, and a client importing it back would close a cycle.
        adapter.transactions = functools.partial(_transactions, transactions, name, parsed)
    return adapter


def _transactions(
    transactions: Callable[[str, KafkaOptions, str], Any], name: str, options: KafkaOptions, transactional_id: str
) -> Any:
    """The exactly-once producer for one WAL relay (outbox_relay/adapter.py): its
    transactional id the broker block's, else the one the relay derives for its slot."""
    return transactions(name, options, options.transactional_id or transactional_id)


def check_destination(destination: str, explicit: bool) -> str | None:
    """Why Kafka (either client) would refuse `destination` as a topic, or None: the
    naming hook `outbox-relay check` calls for every route (outbox_relay/adapter.py).
    Without a route destination, the topic is the message's own (`explicit` False)."""
    return topic_name_problem(destination, whole=explicit)
