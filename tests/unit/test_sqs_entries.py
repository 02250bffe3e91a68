"""How an outbox message becomes an SQS batch entry (adapters/sqs_entries.py), the SQS
adapter's option errors and naming rules, and how a round becomes requests: what needs
no server. What the server does with them is tests/contract (ElasticMQ)."""

from __future__ import annotations

import base64
import json

import pytest
from outbox_relay_adapters.sqs import SqsAdapter, SqsOptions, check_destination, create
from outbox_relay_adapters.sqs_entries import Entry, entry_for, group_id, name_problem

from outbox_relay.errors import AdapterOptionsError
from tests.support.factories import outgoing


def entry(fifo: bool = True, max_bytes: int = 262_144, **fields: object) -> Entry:
    made = entry_for(outgoing(**fields), fifo, max_bytes)
    assert isinstance(made, Entry), made
    return made


def attributes(made: Entry) -> dict[str, str]:
    return {name: value["StringValue"] for name, value in made.fields["MessageAttributes"].items()}


def test_text_goes_as_it_is_binary_as_base64_with_an_attribute_saying_so() -> None:
    text = entry(payload=b'{"a":"\xc3\xa9"}')
    assert text.fields["MessageBody"] == '{"a":"é"}' and "body-encoding" not in attributes(text)
    for payload in (b"\x00\xffbinary", b"text with a \x01 control character"):
        binary = entry(payload=payload, content_type="application/octet-stream")
        assert attributes(binary)["body-encoding"] == "base64"
        assert base64.b64decode(binary.fields["MessageBody"]) == payload


def test_at_most_six_attributes_whatever_the_headers() -> None:
    headers = {f"h{i}": str(i) for i in range(40)} | {"TraceParent": "00-abc-def-01", "tracestate": "x=1"}
    made = entry(payload=b"\x00", headers=headers)
    found = attributes(made)
    assert set(found) == {"message-id", "content-type", "traceparent", "tracestate", "headers", "body-encoding"}
    assert json.loads(found["headers"]) == headers
    assert found["traceparent"] == "00-abc-def-01"


def test_fifo_group_is_the_key_dedup_the_message_id_keyless_its_own_group() -> None:
    keyed = outgoing(key="customer-42")
    made = entry_for(keyed, True, 262_144)
    assert isinstance(made, Entry)
    assert made.fields["MessageGroupId"] == "customer-42"
    assert made.fields["MessageDeduplicationId"] == str(keyed.message_id)
    keyless = outgoing()
    made = entry_for(keyless, True, 262_144)
    assert isinstance(made, Entry) and made.fields["MessageGroupId"] == str(keyless.message_id)
    standard = entry(fifo=False, key="k")
    assert "MessageGroupId" not in standard.fields and "MessageDeduplicationId" not in standard.fields


def test_a_key_sqs_refuses_as_a_group_becomes_a_stable_hash() -> None:
    for key in ("with space", "é", "x" * 129):
        assert group_id(key) == group_id(key) and group_id(key).startswith("h-") and len(group_id(key)) == 66
    assert group_id("a" * 128) == "a" * 128
    assert group_id("with space") != group_id("with  space")


def test_size_counts_body_and_attributes_and_over_the_limit_is_a_reason() -> None:
    made = entry(payload=b"x" * 100)
    names_types_values = sum(len(n) + len("String") + len(v) for n, v in attributes(made).items())
    assert made.size == 100 + names_types_values
    too_big = entry_for(outgoing(payload=b"x" * 2000), True, 1024)
    assert isinstance(too_big, str) and "1024 bytes" in too_big and "max_message_bytes" in too_big
    assert "empty" in str(entry_for(outgoing(payload=b""), True, 1024))


def test_queue_names_and_route_checks() -> None:
    assert name_problem("orders") is None and name_problem("orders_v2-eu.fifo") is None
    assert name_problem("a" * 80) is None and name_problem("a" * 81) is not None
    assert name_problem("orders.created") is not None and name_problem("bad name") is not None
    assert check_destination("https://sqs.eu-west-1.amazonaws.com/1/q", True) is None
    assert check_destination("orders.created", True) is not None
    assert check_destination("orders.", False) is None, "orders.fifo would do"
    assert "':'" in (check_destination("tenant:", False) or "")


def test_option_errors_name_the_key() -> None:
    with pytest.raises(AdapterOptionsError) as caught:
        create("q", {"max_concurrency": 0})
    assert "max_concurrency" in str(caught.value)
    with pytest.raises(AdapterOptionsError) as caught:
        create("q", {"secret_access_key": "s3cret"})  # credentials come from the environment only
    assert "secret_access_key" in str(caught.value) and "s3cret" not in str(caught.value)


def test_a_rounds_entries_go_ten_and_max_message_bytes_at_most_per_request() -> None:
    adapter = SqsAdapter("q", SqsOptions(max_message_bytes=1024))
    small = [(i, "u1", Entry({}, 10)) for i in range(23)] + [(100, "u2", Entry({}, 10))]
    requests = adapter._requests(small)
    assert [(url, len(entries)) for url, entries in requests] == [("u1", 10), ("u1", 10), ("u1", 3), ("u2", 1)]
    large = [(i, "u", Entry({}, 400)) for i in range(5)]
    assert [len(entries) for _, entries in adapter._requests(large)] == [2, 2, 1]


def client_error(code: str, status: int) -> Exception:
    from botocore.exceptions import ClientError

    answer = {"Error": {"Code": code, "Message": f"{code} said"}, "ResponseMetadata": {"HTTPStatusCode": status}}
    return ClientError(answer, "SendMessageBatch")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("error", "waits"),
    [
        # AWS's answers ElasticMQ never gives (it checks no signature, never throttles):
        # the messages wait, spending no attempt.
        (client_error("InvalidClientTokenId", 403), True),
        (client_error("SignatureDoesNotMatch", 403), True),
        # The same refusals as the JSON protocol's __type, when SQS sends no
        # x-amzn-query-error (tests/e2e/test_sqs_signatures.py, "type-only").
        (client_error("UnrecognizedClientException", 403), True),
        (client_error("InvalidSignatureException", 403), True),
        (client_error("IncompleteSignatureException", 400), True),
        (client_error("MissingAuthenticationTokenException", 403), True),
        (client_error("ExpiredTokenException", 403), True),
        (client_error("AccessDenied", 403), True),
        (client_error("ThrottlingException", 400), True),
        (client_error("InternalError", 500), True),
        (client_error("InvalidParameterValue", 400), False),  # may be one entry's fault
        (client_error("AWS.SimpleQueueService.BatchRequestTooLong", 400), False),
    ],
)
def test_which_refusals_of_a_whole_request_are_the_brokers_or_the_relays(error: Exception, waits: bool) -> None:
    from outbox_relay_adapters.sqs import _request_failed, refusal

    assert (refusal(error) is not None) is waits
    assert (_request_failed(error).outcome.value == "unavailable") is waits


def test_no_connection_and_no_credentials_are_one_line_outages() -> None:
    from botocore.exceptions import EndpointConnectionError, NoCredentialsError
    from outbox_relay_adapters.sqs import refusal

    assert "unreachable" in (refusal(EndpointConnectionError(endpoint_url="http://127.0.0.1:1")) or "")
    assert "no AWS credentials" in (refusal(NoCredentialsError()) or "")
