"""The S3 object store of the tests (SeaweedFS, tests/services.py `seaweedfs()`): a real
S3 endpoint over HTTP and over HTTPS, that checks signatures and keeps its objects
across a stop and a start, as the fault tests will need it to."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Iterator

import boto3
import pytest
from botocore.client import BaseClient
from botocore.config import Config
from botocore.exceptions import ClientError, EndpointConnectionError, SSLError

from tests import services


@contextlib.contextmanager
def s3_client(
    store: services.S3Store, *, tls: bool = False, verify: str | bool | None = None, secret_key: str | None = None
) -> Iterator[BaseClient]:
    endpoint = store.tls_endpoint_url if tls else store.endpoint_url
    assert endpoint is not None
    client = boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id=store.access_key,
        aws_secret_access_key=secret_key or store.secret_key,
        region_name="us-east-1",
        # The CA of the store's certificate, not the machine's bundle (nor AWS_CA_BUNDLE).
        verify=(store.ca_file if tls else None) if verify is None else verify,
        # Path-style (http://host/bucket/key): no bucket.127.0.0.1 host names. A refused
        # request fails at once, not after the default retries.
        config=Config(
            s3={"addressing_style": "path"}, retries={"total_max_attempts": 1}, connect_timeout=5, read_timeout=30
        ),
    )
    try:
        yield client
    finally:
        client.close()


@pytest.fixture
def bucket(s3_store: services.S3Store) -> Iterator[str]:
    """A new bucket of the session's store, emptied and deleted after the test."""
    name = f"t-{uuid.uuid4().hex[:16]}"
    with s3_client(s3_store) as client:
        client.create_bucket(Bucket=name)
        yield name
        for each in client.list_objects_v2(Bucket=name).get("Contents", []):
            client.delete_object(Bucket=name, Key=each["Key"])
        client.delete_bucket(Bucket=name)


@pytest.fixture(scope="module")
def local_store(s3_store: services.S3Store) -> Iterator[services.S3Store]:
    """A store this process started (the session's if it is local, else one of this
    module's): its TLS listener and its process are known."""
    if s3_store.broker is not None:
        yield s3_store
        return
    with services.local_seaweedfs() as store:
        yield store


def test_put_and_get_over_http(s3_store: services.S3Store, bucket: str) -> None:
    with s3_client(s3_store) as client:
        client.put_object(Bucket=bucket, Key="dir/one.json", Body=b'{"n": 1}', ContentType="application/json")
        got = client.get_object(Bucket=bucket, Key="dir/one.json")
        assert got["Body"].read() == b'{"n": 1}'
        assert got["ContentType"] == "application/json"
        listed = client.list_objects_v2(Bucket=bucket, Prefix="dir/")
        assert [each["Key"] for each in listed["Contents"]] == ["dir/one.json"]
        assert bucket in [each["Name"] for each in client.list_buckets()["Buckets"]]


def test_put_and_get_over_https_verified_by_the_test_ca(local_store: services.S3Store) -> None:
    name = f"t-{uuid.uuid4().hex[:16]}"
    with s3_client(local_store, tls=True) as client:
        assert local_store.tls_endpoint_url is not None and local_store.tls_endpoint_url.startswith("https://")
        client.create_bucket(Bucket=name)
        client.put_object(Bucket=name, Key="secret", Body=b"over TLS")
        assert client.get_object(Bucket=name, Key="secret")["Body"].read() == b"over TLS"
        client.delete_object(Bucket=name, Key="secret")
        client.delete_bucket(Bucket=name)
    # The certificate is the test CA's: a client with the usual CAs (verify=True: botocore's
    # bundle, never AWS_CA_BUNDLE) refuses it.
    with s3_client(local_store, tls=True, verify=True) as client, pytest.raises(SSLError):
        client.list_buckets()


def test_a_wrong_secret_key_is_refused(s3_store: services.S3Store, bucket: str) -> None:
    with s3_client(s3_store) as client:
        client.put_object(Bucket=bucket, Key="kept", Body=b"x")
    with s3_client(s3_store, secret_key="not-" + s3_store.secret_key) as client:
        with pytest.raises(ClientError) as refused:
            client.put_object(Bucket=bucket, Key="forged", Body=b"y")
        assert refused.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403
        assert refused.value.response["Error"]["Code"] == "SignatureDoesNotMatch"
        with pytest.raises(ClientError) as refused_read:
            client.get_object(Bucket=bucket, Key="kept")
        assert refused_read.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403
    with s3_client(s3_store) as client:
        assert [each["Key"] for each in client.list_objects_v2(Bucket=bucket)["Contents"]] == ["kept"]


@pytest.mark.slow
def test_a_stopped_and_restarted_store_keeps_its_objects(local_store: services.S3Store) -> None:
    assert local_store.broker is not None
    name = f"t-{uuid.uuid4().hex[:16]}"
    body = uuid.uuid4().bytes * 1000  # 16 kB
    with s3_client(local_store) as client:
        client.create_bucket(Bucket=name)
        client.put_object(Bucket=name, Key="durable", Body=body)
    local_store.broker.stop()
    try:
        with s3_client(local_store) as client, pytest.raises(EndpointConnectionError):
            client.list_buckets()
    finally:
        local_store.broker.start()
    with s3_client(local_store) as client:
        assert client.get_object(Bucket=name, Key="durable")["Body"].read() == body
        # And it still takes writes: a new bucket (a new volume) and an object in it.
        client.put_object(Bucket=name, Key="after", Body=b"after restart")
        client.create_bucket(Bucket=name + "-2")
        client.put_object(Bucket=name + "-2", Key="k", Body=b"v")
        for bucket_name, key in ((name, "durable"), (name, "after"), (name + "-2", "k")):
            client.delete_object(Bucket=bucket_name, Key=key)
        client.delete_bucket(Bucket=name)
        client.delete_bucket(Bucket=name + "-2")
