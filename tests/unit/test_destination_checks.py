"""The naming rules `outbox-relay check` applies to routes (issue 17, item 9): a topic
pattern's literal characters, Kafka's topic names, and where an adapter's rules are found."""

from __future__ import annotations

import fnmatch

import pytest
from outbox_relay_adapters._topics import topic_name_problem

from outbox_relay.adapter import destination_check
from outbox_relay.engine.routing import literal_text
from outbox_relay.operations.check import check_routes
from tests.support.configs import make_config


@pytest.mark.parametrize(
    ("pattern", "literal"),
    [
        ("tenant:*", "tenant:"),
        ("files/*/created", "files//created"),
        ("a[bc]d", "ad"),
        ("a[!b]c", "ac"),
        ("a[]]b", "ab"),  # `]` first in a class is a member
        ("a[b", "a[b"),  # an unclosed `[` is a literal
        ("?x*", "x"),
        ("*", ""),
        ("orders.created", "orders.created"),
    ],
)
def test_literal_text_is_what_every_matching_topic_contains(pattern: str, literal: str) -> None:
    assert literal_text(pattern) == literal
    # What fnmatch (routes' own matching) matches holds those characters, in order.
    for topic in ("tenant:1", "files/a/created", "abd", "acc", "a]b", "a[b", "yx", "orders.created"):
        if fnmatch.fnmatchcase(topic, pattern):
            rest = iter(topic)
            assert all(c in rest for c in literal), (topic, pattern)


def test_kafka_topic_names() -> None:
    assert topic_name_problem("orders.created_v2-eu") is None
    bad = topic_name_problem("ux bad topic!")
    assert bad is not None and "' ', '!'" in bad
    assert "':'" in (topic_name_problem("tenant:", whole=False) or "")
    assert "249" in (topic_name_problem("a" * 250) or "")
    assert topic_name_problem("a" * 249) is None
    # "." is no topic, but a pattern's literal "." (`*.*`) is part of good names.
    assert topic_name_problem(".") is not None and topic_name_problem(".", whole=False) is None


def test_naming_rules_are_found_beside_the_adapter_factory_and_optional() -> None:
    kafka = destination_check("kafka")
    assert kafka is not None and kafka("a:b", True) is not None and kafka("ab", True) is None
    rabbitmq = destination_check("rabbitmq")
    assert rabbitmq is not None and "255 bytes" in (rabbitmq("é" * 128, True) or "")
    assert rabbitmq("x" * 255, True) is None
    assert rabbitmq("x" * 300, False) is None, "without a destination the exchange is the option"
    sqs = destination_check("sqs")
    assert sqs is not None and sqs("orders.created", True) is not None and sqs("orders.fifo", True) is None
    for kind in ("file", "stdout", "webhook", "no-such-adapter"):
        assert destination_check(kind) is None


def test_check_routes_names_the_route_and_its_broker() -> None:
    config = make_config(
        "postgresql://unused",
        brokers={"events": {"type": "kafka", "bootstrap_servers": "127.0.0.1:1"}, "sink": {"type": "stdout"}},
        routes=[
            {"topic": "a.*", "broker": "events"},
            {"topic": "b:*", "broker": "events"},
            {"topic": "c", "broker": "events", "destination": "c d"},
            {"topic": "d:*", "broker": "sink"},  # stdout has no naming rules
        ],
    )
    lines: list[str] = []
    assert check_routes(config, lines.append) is False
    assert [line.split(" -> ")[0] for line in lines] == [
        "route     FAIL  routes[1] 'b:*'",
        "route     FAIL  routes[2] 'c'",
    ]
    assert all("events (kafka)" in line for line in lines)
    assert "give the route a destination" in lines[0] and "destination 'c d'" in lines[1]
