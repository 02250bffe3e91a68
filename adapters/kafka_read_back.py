"""`outbox-relay audit` for Kafka: read the records at the partitions and offsets that
receipts name, with the broker block's own connection options (TLS, SASL).

Offsets are read partition by partition, in order, read committed: a run of nearby
offsets is one seek and one sequential read (the records between them are read too,
which is where a message delivered twice shows up); a gap larger than GAP starts a new
seek, so the cost follows what is checked, not the partition's size. A place has no
record when its partition no longer exists (a topic deleted or recreated with fewer
partitions), when its offset is below the partition's first (deleted by retention or
compaction) or at or past its end. An offset between the last stable offset and the
end is behind a transaction still open on the partition (another producer's, or an
exactly-once relay's): undecided, neither there nor missing.
"""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any

from outbox_relay.adapter import ReadBack

from ._options import parse_options

# Records between two checked offsets read through rather than seeking again.
GAP = 500
# A read that makes no progress for this long is given up (the broker is away).
STALL_S = 30.0


async def read_back(options: Mapping[str, Any], places: Sequence[tuple[str, int, int]]) -> ReadBack:
    """The message id (header `message-id`) of the record at each (topic, partition,
    offset); see the module docstring."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    from ._kafka_common import KafkaOptions
    from .kafka_aiokafka import client_settings

    settings = client_settings(parse_options(KafkaOptions, options))
    consumer = AIOKafkaConsumer(**settings, enable_auto_commit=False, group_id=None, isolation_level="read_committed")
    wanted: dict[tuple[str, int], list[int]] = defaultdict(list)
    for topic, partition, offset in places:
        wanted[(topic, partition)].append(offset)
    result = ReadBack(dict.fromkeys(places))
    seen: dict[str, int] = defaultdict(int)
    # The client's own log lines (a refused connection, retried) would add to the
    # command's one line; what failed is raised.
    logging.getLogger("aiokafka").setLevel(logging.CRITICAL)
    await _start(consumer)
    try:
        # The log's end (the high watermark), which read committed does not report.
        ends_reader = AIOKafkaConsumer(**settings, enable_auto_commit=False, group_id=None)
        await _start(ends_reader)
        try:
            # Which partitions exist now (the consumer's own metadata holds only the
            # topics it was asked about).
            cluster = await consumer._client.fetch_all_metadata()
            parts = [
                TopicPartition(topic, partition)
                for topic, partition in wanted
                if partition in (cluster.partitions_for_topic(topic) or set())
            ]
            firsts = await consumer.beginning_offsets(parts) if parts else {}
            stable = await consumer.end_offsets(parts) if parts else {}
            ends = await ends_reader.end_offsets(parts) if parts else {}
        finally:
            await ends_reader.stop()
        for tp in parts:
            offsets = sorted(set(wanted[(tp.topic, tp.partition)]))
            result.undecided.update((tp.topic, tp.partition, o) for o in offsets if stable[tp] <= o < ends[tp])
            present = [o for o in offsets if firsts[tp] <= o < stable[tp]]
            consumer.assign([tp])
            for start, stop in _runs(present):
                consumer.seek(tp, start)
                result.records_read += await _read_run(consumer, tp, stop, result.found, seen)
    finally:
        await consumer.stop()
    result.repeated = {mid: n for mid, n in seen.items() if n > 1}
    return result


async def _read_run(
    consumer: Any, tp: Any, stop: int, found: dict[tuple[str, int, int], str | None], seen: dict[str, int]
) -> int:
    """Read from the consumer's position through offset `stop`; how many records that
    took. Give up once STALL_S pass without the position moving (each wait bounded by
    it too)."""
    loop = asyncio.get_running_loop()
    last, progressed = -1, loop.time()
    read = 0
    while True:
        async with asyncio.timeout(STALL_S):
            position = await consumer.position(tp)
        if position > stop:
            return read
        if position != last:
            last, progressed = position, loop.time()
        elif loop.time() - progressed > STALL_S:
            raise TimeoutError(
                f"reading {tp.topic}[{tp.partition}] made no progress at offset {position} for {STALL_S:g}s"
            )
        async with asyncio.timeout(STALL_S):
            batches = await consumer.getmany(tp, timeout_ms=500)
        for record in batches.get(tp, []):
            if record.offset > stop:
                break
            read += 1
            message_id = _message_id(record.headers)
            if message_id is not None:
                seen[message_id] += 1
            if (tp.topic, tp.partition, record.offset) in found:
                found[(tp.topic, tp.partition, record.offset)] = message_id


async def _start(consumer: Any) -> None:
    """Start `consumer`; stopped again if it cannot (nothing left open behind an error)."""
    try:
        await consumer.start()
    except BaseException:
        await consumer.stop()
        raise


def _runs(offsets: list[int]) -> list[tuple[int, int]]:
    """Sorted offsets as (first, last) runs whose neighbours are at most GAP apart."""
    runs: list[tuple[int, int]] = []
    for offset in offsets:
        if runs and offset - runs[-1][1] <= GAP:
            runs[-1] = (runs[-1][0], offset)
        else:
            runs.append((offset, offset))
    return runs


def _message_id(headers: Sequence[tuple[str, bytes]]) -> str | None:
    for name, value in headers:
        if name == "message-id":
            return value.decode("utf-8", "replace")
    return None
