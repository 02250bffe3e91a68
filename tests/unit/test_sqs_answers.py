"""How the SQS adapter classifies answers ElasticMQ cannot give (AWS's error codes for a
queue's KMS key, SQS's own fault on an entry), with botocore's Stubber standing in for
SQS's answers: the adapter's code path is the real one, from the request botocore
builds to the outcome. What a real server answers is tests/contract and tests/e2e."""

from __future__ import annotations

from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor

import boto3
import pytest
from botocore.stub import ANY, Stubber
from outbox_relay_adapters.sqs import SqsAdapter, SqsOptions, create

from outbox_relay.errors import AdapterOptionsError
from outbox_relay.models import Outcome
from tests.support.factories import outgoing

QUEUE = "https://sqs.us-east-1.amazonaws.com/123456789012/orders.fifo"
KMS_CODES = [
    "KmsDisabled",
    "KmsNotFound",
    "KmsInvalidState",
    "KmsInvalidKeyUsage",
    "KmsOptInRequired",
    "KMS.DisabledException",
    "KMS.NotFoundException",
    "KMS.InvalidStateException",
    "KMS.InvalidKeyUsageException",
    "KMS.OptInRequired",
    "InvalidAddress",
]


@pytest.fixture
async def stubbed() -> AsyncIterator[tuple[SqsAdapter, Stubber]]:
    client = boto3.client("sqs", region_name="us-east-1", aws_access_key_id="test", aws_secret_access_key="test-secret")
    adapter = SqsAdapter("sqs", SqsOptions())
    pool = ThreadPoolExecutor(2)
    adapter._client, adapter._pool = client, pool
    with Stubber(client) as stubber:
        yield adapter, stubber
        stubber.assert_no_pending_responses()
    pool.shutdown()


def batch(n: int) -> list:  # type: ignore[type-arg]
    return [outgoing(i, {"i": i}, key=f"k{i}", destination=QUEUE, explicit_destination=True) for i in range(n)]


@pytest.mark.parametrize("code", KMS_CODES)
async def test_a_queues_kms_key_or_address_refused_waits_and_is_not_split_per_entry(
    stubbed: tuple[SqsAdapter, Stubber], code: str
) -> None:
    adapter, stubber = stubbed
    # One answer stubbed: a split into one request per entry would find none (and fail
    # transient); the answer is the whole batch's, unavailable, no attempt spent.
    stubber.add_client_error(
        "send_message_batch", service_error_code=code, service_message="key disabled", http_status_code=400
    )
    results = await adapter.publish(batch(3))
    assert [r.outcome for r in results] == [Outcome.UNAVAILABLE] * 3, results
    assert all("KMS key or address" in (r.reason or "") for r in results), results


async def test_an_entry_failed_by_sqs_itself_waits_one_failed_by_the_sender_is_dead_lettered(
    stubbed: tuple[SqsAdapter, Stubber],
) -> None:
    adapter, stubber = stubbed
    stubber.add_response(
        "send_message_batch",
        {
            "Successful": [{"Id": "0", "MessageId": "m0", "MD5OfMessageBody": "x", "SequenceNumber": "1"}],
            "Failed": [
                {"Id": "1", "SenderFault": False, "Code": "InternalError", "Message": "try later"},
                {"Id": "2", "SenderFault": True, "Code": "InvalidParameterValue", "Message": "bad"},
            ],
        },
        {"QueueUrl": QUEUE, "Entries": ANY},
    )
    results = await adapter.publish(batch(3))
    assert [r.outcome for r in results] == [Outcome.ACKED, Outcome.UNAVAILABLE, Outcome.PERMANENT], results
    assert "InternalError" in (results[1].reason or "") and "InvalidParameterValue" in (results[2].reason or "")


def test_a_request_timeout_that_makes_a_call_too_long_is_refused_naming_the_key() -> None:
    create("sqs", {"request_timeout": "30s", "connect_timeout": "5s"})  # 30 + 2 x 35 = 100 s: allowed
    with pytest.raises(AdapterOptionsError) as refused:
        create("sqs", {"request_timeout": "40s"})  # 40 + 2 x 45 = 130 s
    assert str(refused.value).startswith("request_timeout: ") and "publish_timeout" in str(refused.value)
