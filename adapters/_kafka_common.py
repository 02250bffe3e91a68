"""What both Kafka clients share (kafka_aiokafka.py, kafka_librdkafka.py): the broker
block's options, and the producer's lifecycle helpers.

Its own module so that neither client imports the other: kafka.py, the ``type:
kafka`` entry point, chooses the client; each client imports this and the other
shared modules (_options.py, _topics.py, _rounds.py), never the other client.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, Literal, Protocol

from pydantic import Field, SecretStr, field_validator

from outbox_relay.durations import Duration
from outbox_relay.models import PublishResult

from ._options import Options, TlsOptions
from ._topics import METADATA_WAIT_S, TopicMetadata, topic_name_problem

# The options' compression check needs aiokafka's codecs, whichever client publishes
# (the librdkafka extra installs aiokafka too).
NEEDS_AIOKAFKA = "the kafka adapter needs aiokafka: pip install 'outbox-relay[kafka]'"

try:
    from aiokafka.codec import has_gzip, has_lz4, has_snappy, has_zstd
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError(NEEDS_AIOKAFKA) from exc

CODECS = {"gzip": has_gzip, "snappy": has_snappy, "lz4": has_lz4, "zstd": has_zstd}

# How long closing a producer waits for the records it still holds (at shutdown, or a
# reset). The rows of records it then drops are still pending in the outbox: they go
# again, nothing is lost.
CLOSE_WAIT_S = 2.0


class SaslOptions(Options):
    # How the relay authenticates: PLAIN sends the password itself (use it with tls),
    # SCRAM never does. SASL_SSL with tls, else SASL_PLAINTEXT.
    mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"]
    # The SASL user, as the brokers' ACLs name it.
    username: str
    # Its password, from the environment (`${KAFKA_PASSWORD}`).
    password: SecretStr


class KafkaOptions(Options):
    # The brokers the client learns the cluster from: host:port (9092 when left out),
    # comma-separated or a list.
    bootstrap_servers: str | list[str]
    # aiokafka (pure Python, the default) or librdkafka (confluent-kafka, C; faster:
    # docs/explanation/performance-kafka.md). Same guarantees, same records, same errors.
    client: Literal["aiokafka", "librdkafka"] = "aiokafka"
    # Sent with every request: how the brokers' logs, metrics and quotas name the relay.
    client_id: str = "outbox-relay"
    # The record batches' codec. snappy, lz4 and zstd need their library (cramjam), with
    # either client: checked when the broker block is read.
    compression: Literal["none", "gzip", "snappy", "lz4", "zstd"] = "none"
    # aiokafka only: how long a record batch waits in the producer before it is sent. The
    # adapter hands over whole batches, so more only adds latency; librdkafka ignores it.
    linger: Duration = 0.0
    # Bytes of one record batch, a partition's part of a round; keyless records move on
    # to another partition after about this much.
    max_batch_size: int = Field(default=256 * 1024, ge=1024)
    # The largest record the producer sends, in bytes (also its cap on a request): a
    # larger one is dead-lettered unsent. Raise it with the topic's max.message.bytes.
    max_request_size: int = Field(default=1024 * 1024, ge=1024)
    # How long a broker may take to answer a request (a produce, metadata, a step of a
    # transaction); past it the messages wait as unavailable, spending no attempt.
    request_timeout: Duration = 30.0
    sasl: SaslOptions | None = None
    # true: TLS, the broker verified against the system's CAs; a block: TLS with its CA
    # and client certificate; false: plaintext.
    tls: TlsOptions | bool = False
    # Exactly once for the WAL source (adapters/kafka_transactions.py): each batch one
    # Kafka transaction that also writes the position it reaches to `offsets_topic`.
    exactly_once: bool = False
    # With exactly_once: the compacted topic the positions are written to, one key per
    # database and slot; created if missing, refused if it is not compacted.
    offsets_topic: str = "outbox-relay-offsets"
    # With exactly_once: the producer's transactional id. Null: derived from the database
    # and the slot (the same for every replica and a promoted standby, so a newer relay
    # fences an older one).
    transactional_id: str | None = Field(default=None, min_length=1, max_length=200)

    @field_validator("offsets_topic")
    @classmethod
    def _offsets_topic(cls, value: str) -> str:
        problem = topic_name_problem(value, whole=True)
        if problem is not None:
            raise ValueError(problem)
        return value

    @field_validator("bootstrap_servers")
    @classmethod
    def _servers(cls, value: str | list[str]) -> str | list[str]:
        servers = value.split(",") if isinstance(value, str) else value
        if not servers or not all(s.strip() for s in servers):
            raise ValueError("give host:port[,host:port...]")
        return value

    @field_validator("compression")
    @classmethod
    def _codec(cls, value: str) -> str:
        if value != "none" and not CODECS[value]():
            raise ValueError(f"compression {value!r} needs its library installed (e.g. pip install cramjam)")
        return value


class _Restartable(Protocol):
    """What start_if_missing needs of either Kafka adapter."""

    @property
    def _producer(self) -> object | None: ...

    @property
    def _lifecycle(self) -> asyncio.Lock: ...

    async def connect(self) -> None: ...


async def start_if_missing(adapter: _Restartable, cause: Callable[[Exception], str]) -> str | None:
    """Start a producer if the adapter has none (a reset that failed), under its
    lifecycle lock; the reason it cannot, for the batch's `unavailable` results."""
    if adapter._producer is None:
        try:
            async with adapter._lifecycle:
                if adapter._producer is None:
                    await adapter.connect()
        except Exception as exc:
            return f"kafka producer not connected: {cause(exc)}"
    return None


def too_large(size: int, options: KafkaOptions, *, by_broker: bool) -> PublishResult:
    """A record refused for its size (either client), saying its size and the limit it
    is over: the broker's refusal names neither, and the fix depends on which it was.
    `size` is the client's estimate of the record in a batch of its own."""
    if not by_broker:  # refused before it was sent
        return PublishResult.permanent(
            f"MessageSizeTooLargeError: the record is {size:,} bytes, larger than the producer's max_request_size"
            f" {options.max_request_size:,} (raise max_request_size in the broker block, and the topic's"
            " max.message.bytes with it)"
        )
    compressed = "" if options.compression == "none" else " before compression"
    return PublishResult.permanent(
        f"MessageSizeTooLargeError: the broker refused the record of {size:,} bytes{compressed} as larger than the"
        " topic's max.message.bytes (by default the broker's message.max.bytes; the producer's max_request_size"
        f" is {options.max_request_size:,})"
    )


class KafkaClientBase:
    """What an adapter of either client is before its own producer: its name, options,
    the exactly-once factory kafka.create hands it, and the fencing flag."""

    keeps_key_order = True  # same key, same partition; rounds keep a failed key's rest back
    # The exactly-once producer's factory, set by kafka.create when the broker block
    # says exactly_once (outbox_relay/adapter.py, transactions_of): each transactions
    # module builds on its client's module, so the client cannot import it back.
    transactions: Callable[[str], Any] | None = None

    def __init__(self, name: str, options: KafkaOptions, *, transactional_id: str | None = None):
        self.name = name
        self.options = options
        self.exactly_once = options.exactly_once
        # Set: the producer of one relay's transactions (kafka_transactions.py,
        # kafka_librdkafka_transactions.py), never replaced by the adapter itself: a new
        # one would abort the transaction the relay is filling.
        self._transactional_id = transactional_id
        self.fenced = False  # a transactional producer was fenced by a newer one
        self._lifecycle = asyncio.Lock()  # connect and reset, one at a time
        self._topics = TopicMetadata(min(METADATA_WAIT_S, options.request_timeout))
