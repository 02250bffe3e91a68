"""The offsets topic of ``exactly_once``, as both Kafka clients' transactional producers
(kafka_transactions.py, kafka_librdkafka_transactions.py) create, check and read it.
No client library here: each module brings its own calls.
"""

from __future__ import annotations

from collections.abc import Iterator

from outbox_relay.adapter import PositionsTopicError, PositionUndecided

# One partition (every position in one ordered log), compacted (the last position of
# each key kept for ever, the rest cleaned), replicated like Kafka's own
# __consumer_offsets.
OFFSETS_TOPIC_CONFIG = {"cleanup.policy": "compact", "segment.ms": str(3600 * 1000)}
READ_WINDOW = 1000  # offsets read back from the end at a time, looking for a key


def new_topic_settings(brokers: int) -> tuple[int, dict[str, str]]:
    """The replication factor and topic configs of a new offsets topic on a cluster of
    `brokers`: up to 3 copies, and a write needs 2 of them where there are 2."""
    replicas = min(3, brokers)
    return replicas, {**OFFSETS_TOPIC_CONFIG, "min.insync.replicas": str(min(2, replicas))}


def check_cleanup_policy(broker: str, topic: str, policy: str) -> None:
    """Refuse an existing offsets topic that is not compacted, in one line."""
    if "compact" not in policy.split(","):
        raise PositionsTopicError(
            f"broker {broker!r}: offsets_topic {topic!r} has cleanup.policy={policy}: retention"
            " would delete the positions exactly-once depends on; use a compacted topic"
            " (cleanup.policy=compact) or a new name, which outbox-relay creates"
        )


def windows(first: int, end: int) -> Iterator[tuple[int, int]]:
    """The offsets [first, end) of the offsets topic as (start, stop) windows, read from
    the end until one holds the key wanted, each four times the last (compaction keeps
    the topic short, so the first nearly always does)."""
    window = READ_WINDOW
    while end > first:
        start = max(first, end - window)
        yield start, end
        end, window = start, window * 4


def undecided(topic: str, high: int, timeout: float) -> PositionUndecided:
    """position()'s error when a transaction stays open on the offsets partition (before
    its high watermark `high`) past request_timeout: the relay retries it."""
    return PositionUndecided(
        f"offsets topic {topic!r}: a transaction open before offset {high} for over"
        f" {timeout:g}s (another relay's: Kafka aborts it at its transaction timeout)"
    )


def not_read_back(topic: str, timeout: float) -> TimeoutError:
    """position()'s error when a window of the offsets topic is not read within request_timeout."""
    return TimeoutError(f"offsets topic {topic!r} not read back within {timeout:g}s")
