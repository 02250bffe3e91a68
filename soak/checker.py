"""The soak's independent checker: once the outbox has drained and the relays have
stopped, it reads the broker back to its end offsets with a consumer of its own and
holds every record against the writers' ledger (tests/faults/harness.py: audit):
lost (committed, never delivered), phantom (rolled back, yet delivered), unknown
(delivered, never written), duplicates (against the bound of what the faults had in
flight) and per-key order violations (first deliveries, in each partition's order).
Then the relays' memory, over the run: flat within RSS_GROWTH and RSS_SLACK_KB."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

from aiokafka import ConsumerRecord

from soak.environment import BATCH, WORKERS
from soak.faults import Executed
from soak.sampling import Sample
from tests.consumers import RabbitQueue, Received, kafka_scan_to_end
from tests.faults.harness import Audit, Delivery, appended_around, delivery

# The relays' memory is flat when the largest RSS of any replica in the last third of
# the run is at most RSS_GROWTH times the largest in the first third, plus RSS_SLACK_KB
# (a generous bound: it catches a leak that grows with messages or faults, not the
# allocator's noise; replicas are restarted by the faults, so a replica's peak comes
# back whenever it has worked a while).
RSS_GROWTH = 1.25
RSS_SLACK_KB = 16 * 1024


@dataclass
class ReadBack:
    deliveries: list[Delivery] = field(default_factory=list)
    appended: list[float] = field(default_factory=list)  # each record's broker append time, s

    queued: list[Delivery] = field(default_factory=list)  # RabbitMQ's, in queue order

    def add(self, record: ConsumerRecord) -> None:
        headers = {k: v.decode() for k, v in record.headers}
        self.deliveries.append(delivery(headers.get("message-id", ""), record.value or b""))
        self.appended.append(record.timestamp / 1000)

    def add_queued(self, message: Received) -> None:
        self.queued.append(delivery(message.message_id, message.payload))

    def every(self) -> list[Delivery]:
        """Kafka's records, then RabbitMQ's (a key goes to one broker only)."""
        return self.deliveries + self.queued

    def first_appended(self) -> list[float]:
        """The append time of each message's first copy, sorted."""
        first: dict[str, float] = {}
        for d, t in zip(self.deliveries, self.appended, strict=True):
            first[d.message_id] = min(t, first.get(d.message_id, t))
        return sorted(first.values())


def read_back(bootstrap: str, topic: str, timeout: float, queue: RabbitQueue | None = None) -> ReadBack:
    """Every record of `topic`, partition by partition in offset order, and every
    message in `queue`, payloads dropped once their key and number are read (a long
    soak's large payloads would not fit)."""
    found = ReadBack()
    asyncio.run(kafka_scan_to_end(bootstrap, topic, found.add, isolation_level="read_uncommitted", timeout=timeout))
    if queue is not None:
        queue.scan(found.add_queued)
    return found


def duplicate_bound(source: str, executed: list[Executed], first_appended: list[float], replicas: int) -> int:
    """How many copies the executed faults may cause: what each had in flight (its
    kind's `in_flight`). The table source: a relay's claimed batches (batch x workers),
    every relay's for a PostgreSQL restart, every relay's twice for a broker outage.
    The WAL source (one replica streams): a relay's unconfirmed transactions, counted
    from the broker's append times around the fault (harness.wal_in_flight); after a
    PostgreSQL restart the slot may go back as far as its creation, so everything
    committed before it once more (tests/faults/test_outages.py)."""
    per_relay = BATCH * WORKERS
    bound = 0
    for fault in executed:
        if source == "table":
            per_fault = {"relay": per_relay, "relays": replicas * per_relay, "broker": 2 * replicas * per_relay}
            bound += per_fault[fault.in_flight] * fault.outages
        elif fault.in_flight == "relay":
            bound += appended_around(first_appended, [fault.wall_injected])
        elif fault.in_flight == "relays":
            bound += fault.committed_before + per_relay
        else:
            bound += 2 * per_relay * fault.outages
    return bound


def rss_check(samples: list[Sample]) -> dict[str, Any]:
    """The largest RSS of any replica in the first and the last third of the run."""
    peaks = [max((v for v in s.rss_kb.values() if v), default=0) for s in samples]
    peaks = [p for p in peaks if p]
    if len(peaks) < 6:
        return {"checked": False, "reason": f"{len(peaks)} samples with a running relay, 6 needed"}
    third = len(peaks) // 3
    first, last = max(peaks[:third]), max(peaks[-third:])
    bound = int(first * RSS_GROWTH + RSS_SLACK_KB)
    return {
        "checked": True,
        "first_third_max_kb": first,
        "last_third_max_kb": last,
        "bound_kb": bound,
        "rule": f"last third's max <= {RSS_GROWTH} x first third's max + {RSS_SLACK_KB} kB",
        "ok": last <= bound,
    }


def failures(
    found: Audit,
    bound: int,
    rss: dict[str, Any],
    *,
    executed: list[Executed],
    sigterm_exits: list[tuple[str, int | None]],
    unexpected_exits: list[dict[str, Any]],
    drained: bool,
    dead_lettered: int,
) -> list[str]:
    """Each way the soak failed, one line each; empty when it passed."""
    out = []
    for what, n in (
        ("lost", len(found.lost)),
        ("phantom (rolled back, yet published)", len(found.phantom)),
        ("unknown (published, never written)", len(found.unknown)),
        ("per-key order violations", found.order_violations),
        ("dead-lettered", dead_lettered),
    ):
        if n:
            out.append(f"{n} {what}")
    if found.duplicates > bound:
        out.append(f"{found.duplicates} duplicates, more than the faults had in flight ({bound})")
    if rss.get("checked") and not rss["ok"]:
        out.append(f"relay RSS grew: {rss['last_third_max_kb']} kB > {rss['bound_kb']} kB ({rss['rule']})")
    out += [f"replica {name} exited {code} on SIGTERM" for name, code in sigterm_exits if code != 0]
    out += [f"replica {e['replica']} exited by itself ({e['code']}) at {e['t']} s" for e in unexpected_exits]
    out += [f"fault {f.kind} at {f.t_injected} s: {f.error}" for f in executed if f.error]
    if not drained:
        out.append("the outbox did not drain after the writers stopped")
    return out
