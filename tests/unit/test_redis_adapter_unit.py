"""The Redis Streams adapter without a server: option errors (one line naming the key,
no secret shown), how error replies count, the entry's fields and the plan of a call
(which messages go as one script). Against the real server: tests/contract, tests/e2e
and tests/faults."""

from __future__ import annotations

import json

import pytest
from outbox_relay_adapters import redis_streams
from redis import exceptions as redis_errors

from outbox_relay.errors import AdapterOptionsError
from outbox_relay.models import Outcome, PublishResult
from tests.support.factories import outgoing


@pytest.mark.parametrize(
    ("options", "path", "message"),
    [
        ({"url": "http://h:6379"}, "url", "redis:// or rediss://"),
        ({"url": "redis://u:hunter2@h:6379", "tls": {"ca_file": "ca.pem"}}, "", "tls needs a rediss:// url"),
        ({"maxlen": 0}, "maxlen", "greater than or equal to 1"),
        ({"wait": {"timeout": "1s"}}, "wait.replicas", "required"),
        ({"timeout": "soon"}, "timeout", ""),
        ({"tls": {"cert_file": "c.pem"}}, "tls", "cert_file and key_file go together"),
        ({"streams": "x"}, "streams", ""),
        # WAIT must answer before the socket times out (the connection would drop on
        # every call), and WAIT N 0 blocks forever.
        ({"wait": {"replicas": 1, "timeout": "5s"}}, "wait.timeout", "below timeout (5s)"),
        ({"wait": {"replicas": 1, "timeout": "6s"}, "timeout": "5s"}, "wait.timeout", "below timeout"),
        ({"wait": {"replicas": 1, "timeout": "0s"}}, "wait.timeout", "at least 1ms"),
        ({"wait": {"replicas": 1, "timeout": "2s"}, "timeout": "2s"}, "wait.timeout", "below timeout (2s)"),
    ],
)
def test_option_errors_name_the_key_and_show_no_secret(options: dict[str, object], path: str, message: str) -> None:
    with pytest.raises(AdapterOptionsError) as raised:
        redis_streams.create("r", options)
    text = str(raised.value)
    assert "\n" not in text and message in text, text
    assert path in text
    assert "hunter2" not in text


def test_secrets_and_where_never_show_the_password() -> None:
    options = redis_streams.RedisOptions(url="rediss://relay:p%40ss@cache:6380/2", password="s3cret")
    assert options.where == "cache:6380"
    assert sorted(options.secrets) == ["p@ss", "s3cret"]
    assert "s3cret" not in repr(options)


@pytest.mark.parametrize(
    ("error", "outcome"),
    [
        ("WRONGTYPE Operation against a key holding the wrong kind of value", Outcome.PERMANENT),
        ("OOM command not allowed when used memory > 'maxmemory'.", Outcome.UNAVAILABLE),
        ("NOPERM this user has no permissions to access one of the keys", Outcome.UNAVAILABLE),
        ("READONLY You can't write against a read only replica.", Outcome.UNAVAILABLE),
        (redis_errors.NoPermissionError("this user has no permissions"), Outcome.UNAVAILABLE),
        (redis_errors.OutOfMemoryError("command not allowed"), Outcome.UNAVAILABLE),
        (redis_errors.ReadOnlyError("You can't write against a read only replica."), Outcome.UNAVAILABLE),
        (redis_errors.ResponseError("ERR something else"), Outcome.TRANSIENT),
    ],
)
def test_error_replies_count_by_whose_fault_they_are(error: str | Exception, outcome: Outcome) -> None:
    assert redis_streams.answer_to_error("s", error).outcome is outcome


def test_an_entry_carries_id_topic_key_content_type_headers_and_the_payload() -> None:
    out = outgoing(1, b"\x00bin", "application/octet-stream", key="k", headers={"traceparent": "00-ab-cd-01"})
    fields = redis_streams.entry_fields(out)
    entry = dict(zip(fields[::2], fields[1::2], strict=True))
    assert entry["message_id"] == str(out.message_id) and entry["key"] == "k"
    assert entry["content_type"] == "application/octet-stream" and entry["payload"] == b"\x00bin"
    assert json.loads(entry["headers"]) == {"traceparent": "00-ab-cd-01"}
    assert "key" not in redis_streams.entry_fields(outgoing(2))[::2]


def test_a_keys_run_is_one_group_and_a_refused_message_stops_its_key() -> None:
    adapter = redis_streams.create("r", {"max_entry_bytes": 10})
    batch = [
        outgoing(1, b"a", key="k"),
        outgoing(2, b"b"),
        outgoing(3, b"x" * 11, key="k"),  # refused before sending, after k's run
        outgoing(4, b"c", key="k"),
        outgoing(5, b"d", key="j"),
        outgoing(6, b"e", key="j"),
        outgoing(7, b"x" * 11, key="i"),  # refused before sending, first of its key
        outgoing(8, b"f", key="i"),
    ]
    results: list[PublishResult | None] = [None] * len(batch)
    groups = adapter._plan(batch, results)
    assert [g.indexes for g in groups] == [[0], [1], [4, 5]]
    # k-3's answer waits for k-1's; i-7 has no earlier message in the call: dead-lettered.
    assert groups[0].refused is not None and groups[0].refused[0] == 2
    assert [r.outcome if r else None for r in results] == [
        None,
        None,
        None,
        Outcome.NOT_SENT,
        None,
        None,
        Outcome.PERMANENT,
        Outcome.NOT_SENT,
    ]


@pytest.mark.parametrize(
    ("earlier", "refused"),
    [
        ([PublishResult.acked('{"id":"1-0"}'), PublishResult.acked('{"id":"1-1"}')], Outcome.PERMANENT),
        ([PublishResult.acked('{"id":"1-0"}'), PublishResult.permanent("WRONGTYPE")], Outcome.NOT_SENT),
        ([PublishResult.transient("ERR"), PublishResult.not_sent("after ERR")], Outcome.NOT_SENT),
        ([PublishResult.unavailable("connection lost"), PublishResult.unavailable("lost")], Outcome.NOT_SENT),
        ([None, None], Outcome.NOT_SENT),  # no reply for the run at all
    ],
)
def test_a_message_refused_after_its_keys_run_is_dead_lettered_only_if_the_run_was_acked(
    earlier: list[PublishResult | None], refused: Outcome
) -> None:
    # The keeps_key_order rule: once a message of a key is not acked, no later one of
    # that key in the call is decided; a dead letter would overtake the one that goes again.
    group = redis_streams._Group([0, 1], ["s", "s"], (2, PublishResult.permanent("payload too large")))
    results = redis_streams.RedisStreamsAdapter._decide_refusals([group], [*earlier, None])
    assert results[2].outcome is refused, results


def test_wait_below_the_socket_timeout_is_accepted() -> None:
    adapter = redis_streams.create("r", {"timeout": "5s", "wait": {"replicas": 1, "timeout": "4s"}})
    assert adapter.options.wait is not None and adapter.options.wait.timeout == 4.0
    assert redis_streams.create("r", {"wait": {"replicas": 1, "timeout": "1ms"}}).options.wait is not None


def test_the_destination_else_the_stream_option_else_the_topic() -> None:
    adapter = redis_streams.create("r", {"stream": "events"})
    assert adapter._stream(outgoing(destination="d", explicit_destination=True)) == "d"
    assert adapter._stream(outgoing(destination="orders.created")) == "events"
    assert redis_streams.create("r", {})._stream(outgoing(destination="orders.created")) == "orders.created"
