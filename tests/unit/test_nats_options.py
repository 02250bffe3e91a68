"""The NATS adapter's options and naming rules, without a server: one line naming the
key, no secret shown; how a publish failure counts."""

from __future__ import annotations

import nats.errors
import nats.js.errors
import pytest
from outbox_relay_adapters import nats as nats_adapter
from outbox_relay_adapters.nats import check_destination, classify, subject_problem

from outbox_relay.errors import AdapterOptionsError
from outbox_relay.models import Outcome


@pytest.mark.parametrize(
    ("options", "path", "message"),
    [
        ({}, "servers", "required option is missing"),
        ({"servers": ["http://h:4222"]}, "servers", "nats://host:port"),
        ({"servers": ["nats://relay:hunter2@h:4222"]}, "servers", "may not hold credentials"),
        ({"servers": ["nats://h:4222"], "password": "p"}, "password", "password needs user"),
        ({"servers": ["nats://h:4222"], "user": "u", "token": "t"}, "user", "one way to authenticate"),
        ({"servers": ["nats://h:4222"], "create_stream": True}, "create_stream", "needs stream and stream_subjects"),
        ({"servers": ["nats://h:4222"], "subject": "{nope}"}, "subject", "invalid template"),
        ({"servers": ["nats://h:4222"], "timeout": "soon"}, "timeout", "invalid duration"),
    ],
)
def test_option_errors_name_the_key_and_show_no_secret(options: dict[str, object], path: str, message: str) -> None:
    with pytest.raises(AdapterOptionsError) as info:
        nats_adapter.create("stream", options)
    assert message in str(info.value)
    assert "hunter2" not in str(info.value)
    # A check across options names the block's first key it concerns, or none.
    assert info.value.path is None or info.value.path.split(".")[0] in {path, "servers", "user", "password"}


def test_servers_as_one_comma_separated_string() -> None:
    adapter = nats_adapter.create("s", {"servers": "nats://a:4222, tls://b:4222"})
    assert adapter.options.servers == ["nats://a:4222", "tls://b:4222"]
    assert adapter.keeps_key_order is False


@pytest.mark.parametrize(
    ("subject", "refused"),
    [
        ("orders.created", False),
        ("orders", False),
        ("", True),
        ("orders..created", True),
        (".orders", True),
        ("orders.", True),
        ("orders.*", True),
        ("orders.>", True),
        ("orders created", True),
        ("$JS.API.INFO", True),
    ],
)
def test_subject_rules(subject: str, refused: bool) -> None:
    assert (subject_problem(subject) is not None) is refused
    assert (check_destination(subject, True) is not None) is refused


def test_a_topic_patterns_literal_characters_are_checked_for_what_breaks_every_subject() -> None:
    assert check_destination("tenant.", False) is None  # `tenant.*` routes `tenant.a`: fine
    assert check_destination("a..b", False) is not None
    assert check_destination("with space", False) is not None


def test_how_failures_count() -> None:
    subject = "s.t"
    assert classify(nats.js.errors.NoStreamResponseError(), subject).outcome is Outcome.UNAVAILABLE
    too_big = nats.js.errors.BadRequestError(
        code=400, err_code=10054, description="message size exceeds maximum allowed"
    )
    assert classify(too_big, subject).outcome is Outcome.PERMANENT
    other_stream = nats.js.errors.BadRequestError(
        code=400, err_code=10060, description="expected stream does not match"
    )
    assert classify(other_stream, subject).outcome is Outcome.UNAVAILABLE
    full = nats.js.errors.ServiceUnavailableError(code=503, err_code=10077, description="maximum messages exceeded")
    assert classify(full, subject).outcome is Outcome.UNAVAILABLE
    assert classify(nats.js.errors.ServerError(code=500), subject).outcome is Outcome.TRANSIENT
    assert classify(nats.errors.ConnectionClosedError(), subject).outcome is Outcome.UNAVAILABLE
