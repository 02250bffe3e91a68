"""`outbox-relay audit`: are the messages the outbox marked dispatched where their
receipts say they landed?

The latest `sample` messages dispatched in the window (and whose topic matches) are
read back from their brokers at the places their receipts name, through each broker
type's optional ``read_back`` hook (outbox_relay/adapter.py; Kafka has one), with the
broker block's own connection options. What is reported, with counts and the first
examples:

- missing: no record where the receipt says (deleted by the broker's retention or
  compaction, a topic recreated), or one that carries another message id;
- without a receipt: dispatched with `relay.receipts` off, or before receipts existed;
- delivered twice: a message id met more than once among the records read (at least
  once delivery does that, and so does a replay; reported, not an error);
- undecided: behind a transaction still open on their partition (not counted as
  checked, nor as missing);
- not audited: receipts of brokers without a hook (RabbitMQ, webhooks, files) or of a
  broker no longer in the config.

The audit passes (exit 0) when nothing is missing and every message had a receipt.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import asdict, dataclass, field
from typing import Any

import psycopg

from outbox_relay.adapter import read_back_hook
from outbox_relay.config import Config
from outbox_relay.errors import OutboxRelayError, first_line
from outbox_relay.operations.dead_letters import glob_to_regex
from outbox_relay.sqlfiles import Queries

EXAMPLES = 5


@dataclass
class Finding:
    message_id: str
    topic: str
    where: str  # the receipt's place, or why none


@dataclass
class AuditReport:
    since_s: float
    checked: int = 0  # messages read back at their receipt's place
    matched: int = 0
    missing: int = 0
    without_receipt: int = 0
    not_audited: int = 0
    undecided: int = 0  # behind a transaction still open on their partition
    delivered_twice: int = 0
    records_read: int = 0  # from the brokers, to check what was checked (the cost)
    examples: dict[str, list[Finding]] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.missing == 0 and self.without_receipt == 0

    def note(self, kind: str, finding: Finding) -> None:
        found = self.examples.setdefault(kind, [])
        if len(found) < EXAMPLES:
            found.append(finding)

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ok": self.ok}


def topic_pattern(glob: str | None) -> str | None:
    """A topic glob as an anchored PostgreSQL regular expression, meaning what it means
    in routes and in `dead-letters --topic` (dead_letters.glob_to_regex)."""
    return None if glob is None else glob_to_regex(glob)


async def audit(
    conn: psycopg.Connection[Any], config: Config, *, since_s: float, topic: str | None, sample: int
) -> AuditReport:
    report = AuditReport(since_s)
    rows = conn.execute(
        Queries(config.database.schema_name)["audit_dispatched"],
        {"since_s": since_s, "topic_re": topic_pattern(topic), "limit": sample},
    ).fetchall()
    conn.rollback()
    places: dict[str, list[tuple[str, str, tuple[str, int, int]]]] = defaultdict(list)
    for message_id, topic_name, receipt in rows:
        mid = str(message_id)
        if not receipt:
            report.without_receipt += 1
            report.note("without_receipt", Finding(mid, topic_name, "no receipt"))
            continue
        broker = receipt.get("broker")
        block = config.brokers.get(str(broker))
        place = _place(receipt)
        if block is None or place is None or read_back_hook(block.type) is None:
            report.not_audited += 1
            continue
        places[str(broker)].append((mid, topic_name, place))
    for broker, wanted in places.items():
        block = config.brokers[broker]
        hook = read_back_hook(block.type)
        assert hook is not None
        try:
            back = await hook(block.options, [place for _, _, place in wanted])
        except Exception as exc:  # the broker away, refusing us, too slow: one line
            text = first_line(exc)
            shown = text if text.startswith(type(exc).__name__) else f"{type(exc).__name__}: {text}"
            raise OutboxRelayError(f"broker {broker}: cannot read back: {shown}") from exc
        for mid, topic_name, place in wanted:
            where = f"{broker}: {place[0]}[{place[1]}]@{place[2]}"
            if place in back.undecided:
                report.undecided += 1
                continue
            report.checked += 1
            there = back.found.get(place)
            if there == mid:
                report.matched += 1
            else:
                report.missing += 1
                why = "no record there" if there is None else f"the record there is message {there}"
                report.note("missing", Finding(mid, topic_name, f"{where}: {why}"))
        report.records_read += back.records_read
        for mid, times in back.repeated.items():
            report.delivered_twice += 1
            report.note("delivered_twice", Finding(mid, "", f"{broker}: {times} records"))
    return report


def _place(receipt: dict[str, Any]) -> tuple[str, int, int] | None:
    destination, partition, offset = receipt.get("destination"), receipt.get("partition"), receipt.get("offset")
    if not isinstance(destination, str) or not isinstance(partition, int) or not isinstance(offset, int):
        return None
    return destination, partition, offset


def render(report: AuditReport) -> str:
    lines = [
        f"audit of the last {report.since_s:g}s: {'ok' if report.ok else 'FAIL'}",
        f"  checked at the broker  {report.checked} ({report.matched} where their receipt says;"
        f" {report.records_read} records read)",
        f"  missing                {report.missing}",
        f"  without a receipt      {report.without_receipt}",
        f"  delivered twice        {report.delivered_twice} (at least once, or a replay: not an error)",
        f"  undecided              {report.undecided} (behind a transaction still open on their partition)",
        f"  not audited            {report.not_audited} (brokers without a read-back: RabbitMQ, webhooks, files)",
    ]
    for kind, found in report.examples.items():
        for finding in found:
            lines.append(f"  {kind}: {finding.message_id} {finding.topic} {finding.where}".rstrip())
    return "\n".join(lines)
