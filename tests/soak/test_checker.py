"""The soak's checker must be able to fail: crafted broker read-backs (records as the
Kafka consumer hands them over) with one message lost, one phantom, one reordered,
one unknown, too many copies, and a relay whose memory grows, each caught; and the
fault suite's check_delivery, which shares its audit, still refuses each of them."""

from __future__ import annotations

import json

import pytest
from aiokafka import ConsumerRecord

from soak import checker
from soak.faults import Executed
from soak.sampling import Sample
from tests.consumers import Received
from tests.faults.harness import Ledger, audit, check_delivery

COMMITTED = {f"m{n}": ("k", n) for n in range(4)} | {"solo": ("u-1", 0), "free": ("", 0)}
ROLLED_BACK = {"r0"}


def ledger() -> Ledger:
    return Ledger(committed=dict(COMMITTED), rolled_back=set(ROLLED_BACK))


def record(mid: str, key: str | None, n: int, offset: int) -> ConsumerRecord:
    value = json.dumps({"key": key, "n": n, "pad": "x"}).encode()
    headers = [("message-id", mid.encode())]
    return ConsumerRecord("t", 0, offset, 1_000_000 + offset, 1, key and key.encode(), value, None, 0, 0, headers)


GOOD = [("m0", "k", 0), ("solo", "u-1", 0), ("m1", "k", 1), ("free", None, 0), ("m2", "k", 2), ("m3", "k", 3)]


def read_back(rows: list[tuple[str, str | None, int]]) -> checker.ReadBack:
    found = checker.ReadBack()
    for offset, (mid, key, n) in enumerate(rows):
        found.add(record(mid, key, n, offset))
    return found


def verdict(rows: list[tuple[str, str | None, int]], bound: int = 0, samples: list[Sample] | None = None) -> list[str]:
    found = audit(read_back(rows).deliveries, ledger())
    rss = checker.rss_check(samples or [])
    return checker.failures(
        found, bound, rss, executed=[], sigterm_exits=[], unexpected_exits=[], drained=True, dead_lettered=0
    )


def received(rows: list[tuple[str, str | None, int]]) -> list[Received]:
    return [Received(mid, key, json.dumps({"key": key, "n": n}).encode()) for mid, key, n in rows]


def test_a_clean_read_back_passes() -> None:
    assert verdict(GOOD) == []
    assert verdict([*GOOD, ("m1", "k", 1)], bound=1) == [], "a copy within the bound"
    check_delivery(received(GOOD), ledger())


@pytest.mark.parametrize(
    ("defect", "rows", "finding", "assertion"),
    [
        ("lost", [r for r in GOOD if r[0] != "m2"], "1 lost", "1 committed messages never arrived"),
        ("phantom", [*GOOD, ("r0", "k", 2)], "1 phantom", "a rolled-back message was published"),
        ("unknown", [*GOOD, ("zz", "k", 9)], "1 unknown", "1 messages arrived that nobody committed"),
        (
            "reordered",
            [GOOD[0], GOOD[1], GOOD[4], GOOD[3], GOOD[2], GOOD[5]],
            "1 per-key order violations",
            "first deliveries of k out of order",
        ),
        ("copies", [*GOOD, ("m1", "k", 1), ("m1", "k", 1)], "2 duplicates, more than", "2 duplicates, at most 1"),
    ],
)
def test_each_defect_is_caught(
    defect: str, rows: list[tuple[str, str | None, int]], finding: str, assertion: str
) -> None:
    found = verdict(rows, bound=1)
    assert len(found) == 1 and found[0].startswith(finding), found
    with pytest.raises(AssertionError, match=assertion):
        check_delivery(received(rows), ledger(), max_duplicates=1)


def test_keyless_messages_carry_no_order_and_a_late_copy_is_no_violation() -> None:
    rows = [("free", None, 5), *GOOD[:3], ("m0", "k", 0), *GOOD[4:]]
    assert verdict(rows, bound=1) == []


def sample(t: float, rss: int) -> Sample:
    return Sample(t, 0, 0, 0.0, 0, 0, {"r0": rss, "r1": None})


def test_relay_memory_that_grows_fails_and_flat_memory_passes() -> None:
    flat = [sample(t, 60_000 + (t % 3) * 500) for t in range(12)]
    assert verdict(GOOD, samples=flat) == []
    growing = [sample(t, 60_000 + t * 5_000) for t in range(12)]
    found = verdict(GOOD, samples=growing)
    assert len(found) == 1 and found[0].startswith("relay RSS grew"), found


def test_the_duplicate_bound_follows_what_each_fault_had_in_flight() -> None:
    def executed(in_flight: str, committed: int = 0, at: float = 0.0) -> Executed:
        return Executed("f", in_flight, 0.0, at, 1.0, committed)

    faults = [executed("relay"), executed("relays"), executed("broker")]
    per_relay = checker.BATCH * checker.WORKERS
    assert checker.duplicate_bound("table", faults, [], 3) == per_relay * (1 + 3 + 6)
    # WAL: the records first appended in the quarter second before a relay's kill; a
    # PostgreSQL restart may replay everything committed before it.
    appended = [99.5, 99.8, 99.9, 100.0, 100.2]
    wal = [executed("relay", at=100.0), executed("relays", committed=1_000)]
    assert checker.duplicate_bound("wal", wal, appended, 3) == 3 + 1_000 + per_relay
