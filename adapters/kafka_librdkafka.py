"""``type: kafka`` with ``client: librdkafka``: publishes with confluent-kafka.

librdkafka builds and sends record batches in C threads, so the Python side of a
message is one ``produce()`` call (a fraction of aiokafka's per-message CPU:
docs/explanation/performance-kafka.md). Same guarantees as the aiokafka client: idempotent producer,
``acks=all``, a row marked only on its delivery report, a key's run in one call, the
same record layout and the same error classes.

Key order (adapters/_rounds.py): librdkafka decides itself where one record batch ends
and the next begins, and a broker that refused one batch writes the next. So records go
out in rounds, one round of the adapter at a time: a round holds at most one batch's
worth (``max_batch_size``) and is produced while librdkafka holds everything back
(``linger.ms`` far above any round), then sent at once by ``flush()``, which overrides
the linger. Each partition's part of the round is then one record batch, whose records
share its fate; the next round leaves out the keys that failed. A round that gets no
answer in time is purged, so nothing of it is sent later beside another round's records.

Made transactional (``transactional_id``, for exactly once:
kafka_librdkafka_transactions.py), the adapter never replaces its producer itself: a
new one would abort the transaction the relay is filling. Its owner does, between
transactions.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from typing import Any

import structlog

from outbox_relay.errors import first_line
from outbox_relay.models import Outcome, OutgoingMessage, PublishResult

from ._kafka_common import CLOSE_WAIT_S, KafkaClientBase, KafkaOptions, start_if_missing, too_large
from ._options import TlsOptions
from ._rounds import Batch, Entry, Rounds
from ._topics import METADATA_WAIT_S, valid_topic

try:
    from confluent_kafka import KafkaError, KafkaException, Producer
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "the kafka adapter's librdkafka client needs confluent-kafka: pip install 'outbox-relay[librdkafka]'"
    ) from exc

log = structlog.get_logger("outbox_relay.kafka")


class _ConfigWarnings(logging.Filter):
    """librdkafka's CONFWARN lines (a property that does not apply to this kind of
    client, a deprecated one) are about the settings this adapter chose: KafkaOptions
    passes no raw librdkafka property through. An operator can do nothing about them,
    and `check` printed them on every run: they go down to debug."""

    def filter(self, record: logging.LogRecord) -> bool:
        # confluent-kafka logs ("%s [%s] %s", facility, client name, message).
        if isinstance(record.args, tuple) and record.args[:1] == ("CONFWARN",):
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        return True


# Every librdkafka client of the adapter logs here (not raw lines on stderr): the
# producer, and exactly once's consumer and admin client.
LIBRDKAFKA_LOG = logging.getLogger("outbox_relay.librdkafka")
LIBRDKAFKA_LOG.addFilter(_ConfigWarnings())

ROUND_LINGER_MS = 600_000  # far above any round: librdkafka sends a round when flush() says so
ROUND_MAX_RECORDS = 10_000  # librdkafka's batch.num.messages, set explicitly: a round stays under it
# A record's size in a batch, over-estimated (a record's framing is at most about 20
# bytes, a header's about 10): a round that librdkafka measured as larger than its
# batch.size would be split into two batches.
RECORD_OVERHEAD, HEADER_OVERHEAD, BATCH_OVERHEAD = 64, 16, 128

# The broker will refuse these however often we try: dead-letter them with its reason.
PERMANENT_CODES = frozenset(
    {
        KafkaError.MSG_SIZE_TOO_LARGE,
        KafkaError.RECORD_LIST_TOO_LARGE,
        KafkaError.INVALID_MSG_SIZE,
        KafkaError.TOPIC_EXCEPTION,
        KafkaError.TOPIC_AUTHORIZATION_FAILED,
        KafkaError.CLUSTER_AUTHORIZATION_FAILED,
        KafkaError.UNSUPPORTED_FOR_MESSAGE_FORMAT,
        KafkaError.INVALID_MSG,
        KafkaError.INVALID_RECORD,
        KafkaError._INVALID_ARG,
    }
)

# A non-fatal client error (a lost connection) is logged at most once per code this often.
CLIENT_ERROR_EVERY_S = 10.0

# The broker is not answering at all: waiting spends none of the message's attempts.
AWAY_CODES = frozenset(
    {
        KafkaError._TRANSPORT,
        KafkaError._ALL_BROKERS_DOWN,
        KafkaError._MSG_TIMED_OUT,
        KafkaError._TIMED_OUT,
        KafkaError.REQUEST_TIMED_OUT,
        KafkaError.NETWORK_EXCEPTION,
        KafkaError._RESOLVE,
        KafkaError.BROKER_NOT_AVAILABLE,
        KafkaError._WAIT_COORD,
    }
)


SIZE_CODES = frozenset({KafkaError.MSG_SIZE_TOO_LARGE, KafkaError.RECORD_LIST_TOO_LARGE})

# A newer producer with the same transactional id started: librdkafka's own fatal
# error for it, and the broker's (Kafka 2.7 and later).
FENCED_CODES = frozenset({KafkaError._FENCED, KafkaError.PRODUCER_FENCED})

# Failed because of another record: the producer stopped (a gap another record left)
# or its queue was purged when it was replaced. Nothing is wrong with the message: it
# waits, without spending an attempt, for the new producer.
COLLATERAL_CODES = frozenset(
    {KafkaError._FATAL, KafkaError._PURGE_QUEUE, KafkaError._PURGE_INFLIGHT, KafkaError._GAPLESS_GUARANTEE}
)


def classify(error: Any) -> PublishResult:
    """A KafkaError, as the engine should treat it. Reasons name the error the way the
    aiokafka client does (MessageSizeTooLarge ...), with librdkafka's code after it."""
    code = error.code()
    reason = f"{error.name()}: {error.str()}"
    if code in SIZE_CODES:
        reason = f"MessageSizeTooLarge ({error.name()}): {error.str()}"
    if code in COLLATERAL_CODES or (error.fatal() and code not in PERMANENT_CODES):
        return PublishResult.unavailable(reason)
    if code in PERMANENT_CODES:
        return PublishResult.permanent(reason)
    if code in AWAY_CODES:
        return PublishResult.unavailable(reason)
    return PublishResult.transient(reason)


def producer_config(options: KafkaOptions) -> dict[str, Any]:
    """librdkafka settings equivalent to the aiokafka client's (kafka_aiokafka.producer_settings)."""
    timeout_ms = int(options.request_timeout * 1000)
    return {
        **client_config(options),
        "enable.idempotence": True,
        "acks": "all",
        "compression.type": options.compression,
        # Nothing leaves before the round is complete: flush() sends it (module docstring).
        "linger.ms": ROUND_LINGER_MS,
        "batch.size": options.max_batch_size,
        "batch.num.messages": ROUND_MAX_RECORDS,
        "message.max.bytes": options.max_request_size,
        "request.timeout.ms": timeout_ms,
        # Never give a record up: a record that timed out is not covered by the gapless
        # guarantee (a later one of its partition could be delivered before it is sent
        # again). The relay's publish_timeout decides how long a call may take.
        "message.timeout.ms": 0,
        # Same key, same partition as aiokafka and the Java client (murmur2), so switching
        # clients, or replicas on both, never splits a key over two partitions.
        "partitioner": "murmur2_random",
        "queue.buffering.max.messages": 1_000_000,
        # One request in flight per broker, as aiokafka (a round is one request per
        # broker anyway).
        "max.in.flight.requests.per.connection": 1,
    }


def client_config(options: KafkaOptions) -> dict[str, Any]:
    """What every librdkafka client of the broker block shares (the producer, and the
    admin client and consumer of exactly once): servers, client id, TLS, SASL."""
    servers = options.bootstrap_servers
    config: dict[str, Any] = {
        "bootstrap.servers": servers if isinstance(servers, str) else ",".join(servers),
        "client.id": options.client_id,
    }
    tls = options.tls
    if tls:
        settings = tls if isinstance(tls, TlsOptions) else TlsOptions()
        config.update(
            {
                "ssl.ca.location": settings.ca_file,
                "ssl.certificate.location": settings.cert_file,
                "ssl.key.location": settings.key_file,
                "ssl.key.password": settings.key_password.get_secret_value() if settings.key_password else None,
                "ssl.endpoint.identification.algorithm": "https" if settings.check_hostname else "none",
            }
        )
    if options.sasl:
        config.update(
            {
                "security.protocol": "SASL_SSL" if tls else "SASL_PLAINTEXT",
                "sasl.mechanism": options.sasl.mechanism,
                "sasl.username": options.sasl.username,
                "sasl.password": options.sasl.password.get_secret_value(),
            }
        )
    elif tls:
        config["security.protocol"] = "SSL"
    return {k: v for k, v in config.items() if v is not None}


_NO_REPORT = object()
NO_REPORT_REASON = "no delivery report within request_timeout"


def fatal_error(exc: BaseException) -> Any:
    """The fatal KafkaError behind `exc`, or None. confluent-kafka raises a fatal error
    from the call that served it (flush, commit_transaction) instead of calling
    error_cb, and a delivery callback run after it in the same call turns it into a
    SystemError whose cause it is."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, KafkaException) and seen.args and isinstance(seen.args[0], KafkaError):
            return seen.args[0] if seen.args[0].fatal() else None
        seen = seen.__cause__ or seen.__context__
    return None


def _too_large(error: Any) -> bool:
    return error is not None and not isinstance(error, PublishResult) and error.code() in SIZE_CODES


async def _drop(producer: Any, wait: float) -> None:
    """Close `producer`: deliver what it holds within `wait`, purge the rest (their rows
    are still pending in the outbox and go again: during an outage flush() would wait
    for them until request_timeout, holding up a reset or the relay's exit)."""
    left = await asyncio.to_thread(producer.flush, wait)
    if left:
        log.warning("kafka_producer_close_purging", records=left)
        producer.purge()
        await asyncio.to_thread(producer.flush, 0)


def _record_bytes(entry: Entry) -> int:
    """A record's size in a batch, over-estimated (RECORD_OVERHEAD says why)."""
    size = RECORD_OVERHEAD + len(entry.out.message.payload) + len(entry.key or b"")
    return size + sum(HEADER_OVERHEAD + len(name) + len(value) for name, value in entry.headers)


def _too_large_alone(entry: Entry, options: KafkaOptions, *, by_broker: bool) -> PublishResult:
    """The answer for a record refused for its size, in a batch of its own."""
    return too_large(BATCH_OVERHEAD + _record_bytes(entry), options, by_broker=by_broker)


class _Fill:
    """What a round holds so far (bytes as librdkafka counts them, over-estimated)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.size = BATCH_OVERHEAD
        self.count = 0

    def add(self, entry: Entry) -> bool:
        size = _record_bytes(entry)
        if self.count and (self.size + size > self.limit or self.count >= ROUND_MAX_RECORDS):
            return False
        self.size += size
        self.count += 1
        return True


class LibrdkafkaAdapter(KafkaClientBase):
    def __init__(self, name: str, options: KafkaOptions, *, transactional_id: str | None = None):
        super().__init__(name, options, transactional_id=transactional_id)
        self._producer: Any = None
        self._fatal: str | None = None  # the producer's fatal error, from its error callback
        self._client_errors_logged: dict[str, float] = {}  # error code -> when last logged
        self._round = asyncio.Lock()  # one round in the producer at a time (module docstring)
        # librdkafka ends a record batch at batch.size or message.max.bytes, whichever is
        # smaller: a round over either would be two batches of one partition.
        self._round_bytes = min(options.max_batch_size, options.max_request_size)

    async def connect(self) -> None:
        early: list[str] = []  # errors before the producer is ours: why a connect failed

        def on_error(error: Any) -> None:
            # Served by flush() and list_topics(); a fatal error stops the producer.
            if producer is self._producer:
                if error.fatal():
                    self.fell(error)
                else:
                    self._client_error(error)
            else:
                early.append(str(error.str()))

        config = {**producer_config(self.options), "error_cb": on_error}
        if self._transactional_id is not None:
            config["transactional.id"] = self._transactional_id
        producer = Producer(config, logger=LIBRDKAFKA_LOG)
        try:
            # Connected and the cluster's metadata fetched, as the aiokafka client does.
            await asyncio.to_thread(producer.list_topics, timeout=self.options.request_timeout)
        except KafkaException as exc:
            why = early[-1] if early else (exc.args[0].str() if exc.args else str(exc))
            raise ConnectionError(f"kafka unreachable: {first_line(why)[:500]}") from exc
        self._producer, self._fatal = producer, None

    def _client_error(self, error: Any) -> None:
        """Log a non-fatal error librdkafka reports (a connection to a broker lost, a
        request timed out): it retries by itself, and an idempotent producer delivers
        the record in the end, so no publish may fail; without this line a connection
        cut again and again (a proxy, a firewall's idle timeout) left no trace but
        slower acks. At most one line per error code every CLIENT_ERROR_EVERY_S."""
        code = str(error.name())
        now = time.monotonic()
        if now - self._client_errors_logged.get(code, -CLIENT_ERROR_EVERY_S) < CLIENT_ERROR_EVERY_S:
            return
        self._client_errors_logged[code] = now
        log.warning("kafka_client_error", broker=self.name, code=code, error=first_line(str(error.str()))[:500])

    async def close(self) -> None:
        producer, self._producer = self._producer, None
        if producer is not None:
            await _drop(producer, min(CLOSE_WAIT_S, self.options.request_timeout))

    async def ready(self) -> bool:
        # Starts a producer if there is none, as publish would: the engine probes a
        # broker that stopped answering with ready() before it sends it messages again.
        if await self._reconnect() is not None or self._producer is None:
            return False
        try:
            # /readyz waits 2 s: a probe must not hold a pool thread longer than that.
            wait = min(2.0, self.options.request_timeout)
            metadata = await asyncio.to_thread(self._producer.list_topics, timeout=wait)
        except KafkaException:
            return False
        return bool(metadata.brokers)

    async def _reconnect(self) -> str | None:
        if self._transactional_id is not None:
            # Its owner restarts it, between transactions (kafka_librdkafka_transactions.py).
            return None if self._producer is not None else "transactional producer not started"
        return await start_if_missing(self, str)

    def fell(self, error: Any) -> None:
        """Note a fatal error of the producer: it refuses everything from now on."""
        self._fatal = str(error.str())
        if self._transactional_id is not None and error.code() in FENCED_CODES:
            self.fenced = True

    async def publish(self, batch: Sequence[OutgoingMessage]) -> Sequence[PublishResult]:
        problem = await self._reconnect()
        if problem is not None:
            return [PublishResult.unavailable(problem)] * len(batch)
        producer = self._producer
        if producer is None:
            return [PublishResult.unavailable("kafka producer not connected")] * len(batch)
        missing = await self._topics_without_metadata(producer, batch)
        rounds = Rounds(batch)
        for index, out in enumerate(batch):
            early = missing.get(out.destination)
            if not valid_topic(out.destination):
                early = PublishResult.permanent(f"invalid Kafka topic name {out.destination!r}")
            rounds.queue(None, Entry(index, out, early))  # one group: a round bounds every partition
        while rounds:
            batches = rounds.next_round(lambda _group: _Fill(self._round_bytes), _Fill.add)  # type: ignore[arg-type]
            if not batches:
                break
            [sent] = batches
            problem = await self._reconnect()  # a reset in an earlier round may have failed
            async with self._round:
                producer = self._producer
                if producer is not None:
                    errors = await self._send_round(producer, sent.entries)
            if producer is None:
                gone = PublishResult.unavailable(problem or "kafka producer not connected")
                for entry in sent.entries:
                    rounds.settle(entry, gone)
                rounds.answer_the_rest(gone)
                break
            self._settle(rounds, sent, errors)
            if self._fatal is not None and self._transactional_id is None:
                await self._new_producer(producer, self._fatal)
        return rounds.final()

    def _settle(self, rounds: Rounds, sent: Batch, errors: list[Any]) -> None:
        refused = [_too_large(error) for error in errors]
        again: list[Entry] = []
        if len(sent.entries) > 1 and any(refused):
            # "Too large" is about a whole record batch (a partition's part of the round):
            # maybe a neighbour's fault. The refused records go again, each on its own,
            # and with them what their keys had after them in the round (answered
            # not_sent here, or refused by librdkafka at once: that answer stands, in turn).
            keys = {e.out.message.key for e, r in zip(sent.entries, refused, strict=True) if r}
            for entry, error, too_large in zip(sent.entries, errors, refused, strict=True):
                key = entry.out.message.key
                if too_large or (key is not None and key in keys and not _was_delivered(error)):
                    if isinstance(error, PublishResult) and error.outcome is not Outcome.NOT_SENT:
                        entry.early = error
                    again.append(entry)
            log.info("kafka_batch_too_large", broker=self.name, records=len(again))
            rounds.again_alone(Batch(None, again, None))
        going_again = {id(entry) for entry in again}
        for entry, error in zip(sent.entries, errors, strict=True):
            if id(entry) in going_again:
                continue
            if isinstance(error, PublishResult):
                rounds.settle(entry, error)
            elif error is not None and error.code() == KafkaError.MSG_SIZE_TOO_LARGE:  # alone in its batch
                rounds.settle(entry, _too_large_alone(entry, self.options, by_broker=True))
            else:
                rounds.settle(entry, PublishResult.acked() if error is None else classify(error))

    async def _send_round(self, producer: Any, entries: list[Entry]) -> list[Any]:
        """Produce the round, send it with flush(), and return each record's answer: a
        PublishResult (acked with its receipt, or decided here) or a KafkaError. Holds the round lock
        (the caller's) until librdkafka holds nothing of the round any more."""
        reports: dict[int, Any] = {}  # filled by flush() on its thread, read after it returned
        answers: list[Any] = [None] * len(entries)
        refused_keys: set[str] = set()
        for position, entry in enumerate(entries):
            key = entry.out.message.key
            if key is not None and key in refused_keys:
                answers[position] = PublishResult.not_sent(f"not sent: an earlier message of key {key!r} failed")
                continue
            refused = self._produce(producer, entry, reports, position)
            if refused is not None:
                answers[position] = refused
                if key is not None:
                    refused_keys.add(key)
        flushing = asyncio.ensure_future(asyncio.to_thread(producer.flush, self.options.request_timeout))
        unreported: Any = _NO_REPORT
        try:
            left = await asyncio.shield(flushing)
        except asyncio.CancelledError:
            # Cancelled (publish_timeout): nothing of the round may stay queued to go out
            # beside a later round, and the round lock is held until flush() returned.
            producer.purge()
            await asyncio.wait({flushing})
            raise
        except (KafkaException, SystemError) as exc:
            # A fatal error (fencing, a broken sequence) raised by the flush that served
            # it: the producer refuses everything from now on.
            unreported = fatal_error(exc)
            if unreported is None:
                raise
            self.fell(unreported)
            left = len(producer)
        if left:
            producer.purge()  # no answer in time: drop the rest, it goes again in a later call
            await asyncio.to_thread(producer.flush, CLOSE_WAIT_S)
        for position, answer in enumerate(answers):
            if answer is None:
                answers[position] = reports.get(position, unreported)
        return [PublishResult.unavailable(NO_REPORT_REASON) if a is _NO_REPORT else a for a in answers]

    def _produce(self, producer: Any, entry: Entry, reports: dict[int, Any], position: int) -> Any:
        """Queue one record; None, or its answer if librdkafka refused it at once."""
        try:
            producer.produce(
                entry.out.destination,
                value=entry.out.message.payload,
                key=entry.key,
                headers=entry.headers,
                on_delivery=lambda error, message: reports.__setitem__(
                    position, error if error is not None else _delivered(message)
                ),
            )
        except BufferError:  # the local queue is full: not the record's fault
            return PublishResult.unavailable("librdkafka's local queue is full")
        except KafkaException as exc:  # refused alone (over message.max.bytes): its own answer
            if exc.args[0].code() == KafkaError.MSG_SIZE_TOO_LARGE:
                return _too_large_alone(entry, self.options, by_broker=False)
            return classify(exc.args[0])
        return None

    async def _new_producer(self, seen: Any, why: str) -> None:
        """After a fatal error the producer refuses everything: start a new one (a new
        producer id), once, whichever worker sees it first. If the new one cannot connect
        now, the next publish connects (or answers "unavailable" until it can)."""
        async with self._lifecycle:
            if self._producer is not seen or seen is None:
                return
            log.info("kafka_producer_reset", broker=self.name, error=why)
            self._producer = None
            async with self._round:  # no round of another call is still in the old one
                await _drop(seen, 0)
            try:
                await self.connect()
            except BaseException as exc:
                log.warning("kafka_producer_reset_failed", broker=self.name, error=repr(exc))
                if not isinstance(exc, Exception):
                    raise

    async def _topics_without_metadata(
        self, producer: Any, batch: Sequence[OutgoingMessage]
    ) -> dict[str, PublishResult]:
        """Topics of the batch without metadata: their messages fail alone and early
        (adapters/_topics.py) instead of holding the whole call until publish_timeout."""
        topics = {out.destination for out in batch if valid_topic(out.destination)}
        wait = min(METADATA_WAIT_S, self.options.request_timeout)
        return await self._topics.missing(
            topics, lambda topic: asyncio.to_thread(self._wait_for_topic, producer, topic, wait)
        )

    @staticmethod
    def _wait_for_topic(producer: Any, topic: str, wait: float) -> None:
        """Metadata for `topic`, asking again while the broker creates it (auto-creation
        answers "leader not available" at first); KafkaException if it never comes."""
        deadline = time.monotonic() + wait
        while True:
            metadata = producer.list_topics(topic, timeout=max(0.1, deadline - time.monotonic()))
            found = metadata.topics.get(topic)
            if found is not None and found.error is None and found.partitions:
                return
            if time.monotonic() >= deadline:
                raise KafkaException(found.error if found is not None else "no such topic")
            time.sleep(0.1)


def _delivered(message: Any) -> PublishResult:
    """A delivered record's answer, with where it landed (its delivery report's; an
    offset librdkafka does not know, below 0, is left out)."""
    offset = message.offset()
    if offset is None or offset < 0:
        return PublishResult.acked(f'{{"partition":{message.partition()}}}')
    return PublishResult.acked(f'{{"partition":{message.partition()},"offset":{offset}}}')


def _was_delivered(answer: Any) -> bool:
    return answer is None or (isinstance(answer, PublishResult) and answer.outcome is Outcome.ACKED)
