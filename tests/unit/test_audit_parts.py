"""The audit's pure parts: topic globs as PostgreSQL patterns, runs of offsets to read."""

from __future__ import annotations

import re

import pytest
from outbox_relay_adapters.kafka_read_back import GAP, _runs

from outbox_relay.operations.audit import AuditReport, Finding, topic_pattern


@pytest.mark.parametrize(
    ("glob", "topic", "matches"),
    [
        ("orders.*", "orders.created", True),
        ("orders.*", "ordersXcreated", False),  # the dot is a dot
        ("orders.?", "orders.a", True),
        ("orders.?", "orders.ab", False),
        ("tenant:a/b-c", "tenant:a/b-c", True),
        ("a", "ab", False),  # anchored
    ],
)
def test_a_topic_glob_becomes_an_anchored_pattern(glob: str, topic: str, matches: bool) -> None:
    pattern = topic_pattern(glob)
    assert pattern is not None
    assert bool(re.match(pattern, topic)) is matches


def test_nearby_offsets_are_read_as_one_run_and_a_gap_starts_another() -> None:
    assert _runs([]) == []
    assert _runs([5, 6, 7]) == [(5, 7)]
    assert _runs([0, GAP, GAP * 2 + 1]) == [(0, GAP), (GAP * 2 + 1, GAP * 2 + 1)]


def test_the_report_fails_on_a_missing_message_or_a_missing_receipt_not_on_a_duplicate() -> None:
    report = AuditReport(60.0, checked=3, matched=3, delivered_twice=1)
    assert report.ok
    report.without_receipt = 1
    assert not report.ok
    report = AuditReport(60.0, missing=1)
    for n in range(7):
        report.note("missing", Finding(str(n), "t", "there"))
    assert not report.ok and len(report.as_dict()["examples"]["missing"]) == 5
