"""The relay's SQS identity refused for real: a wrong secret and an unknown access key id.

ElasticMQ checks no request signature (it takes any keys), so these tests put a gate in
front of it that does what AWS does with a request's Signature Version 4
(tests/support/sigv4_gate.py): it knows one access key id and its secret, recomputes
each request's signature and refuses, as SQS answers in the JSON protocol botocore
speaks to it, what does not match (SignatureDoesNotMatch), an access key id it does not
know (InvalidClientTokenId), a request without a signature (MissingAuthenticationToken);
what passes goes on to ElasticMQ unchanged. The refusals' statuses, types and wording
are AWS's as documented, not captured from SQS: no AWS account is used here.

What is checked: `outbox-relay check` says so in one line naming the code, and neither
its output nor a running relay's logs hold the secret; the relay's messages wait (no
attempt spent, nothing dead-lettered, with max_attempts 1) until the relay is started
again with the right secret, which delivers them all; a key refused while the relay
runs (rotated, deleted) opens the circuit and makes its messages wait (one request
refused, not one per message), ready() false, and its return lets them go; and the gate
itself passes what botocore signed and refuses a body, a header or a date other than
the ones signed, so passing it means a signature was checked. SQS's refusal of a wrong
signature runs over several lines (the canonical request it expected): `check` and the
logs show its first."""

from __future__ import annotations

import datetime
import http.client
import json
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import botocore.auth
import psycopg
import pytest
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials
from outbox_relay_adapters.sqs import create as create_sqs

from outbox_relay import enqueue
from outbox_relay.models import Outcome, OutgoingMessage
from tests.consumers import SqsQueue, sqs_read
from tests.services import SqsServer
from tests.support.cli import RelayProcess, run_cli
from tests.support.configs import write_config
from tests.support.factories import message
from tests.support.outbox import pending
from tests.support.sigv4_gate import Gate, sigv4_gate
from tests.support.waiting import wait_for

pytestmark = pytest.mark.timeout(300)

ISOLATED = {
    # Nothing but the environment's keys for boto3's chain: no profile files, no role.
    "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent/credentials",
    "AWS_CONFIG_FILE": "/nonexistent/config",
    "AWS_EC2_METADATA_DISABLED": "true",
}


@dataclass
class Gated:
    """ElasticMQ behind the gate, and the identity the gate knows (tests.consumers.SqsEndpoint)."""

    gate: Gate
    endpoint_url: str
    access_key: str
    secret_key: str
    region: str

    def env(self, access_key: str | None = None, secret_key: str | None = None) -> dict[str, str]:
        """A relay process's environment: this identity, or the one given."""
        return {
            **ISOLATED,
            "AWS_ACCESS_KEY_ID": access_key or self.access_key,
            "AWS_SECRET_ACCESS_KEY": secret_key or self.secret_key,
            "AWS_REGION": self.region,
        }


@pytest.fixture
def gated(sqs_server: SqsServer, monkeypatch: pytest.MonkeyPatch) -> Iterator[Gated]:
    # Nothing of the machine's own identity may reach a relay process or the adapter.
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION"):
        monkeypatch.delenv(name, raising=False)
    secret = f"right-{uuid.uuid4().hex}"  # the test's own: the gate knows it, ElasticMQ takes any
    port = int(sqs_server.endpoint_url.rsplit(":", 1)[1])
    with sigv4_gate(port, {sqs_server.access_key: secret}, sqs_server.region) as gate:
        yield Gated(gate, gate.endpoint_url, sqs_server.access_key, secret, sqs_server.region)


def relay_config(tmp_path: Path, db: str, gated: Gated, queue: str) -> Path:
    block = {"type": "sqs", "endpoint_url": gated.endpoint_url, "connect_timeout": "2s", "request_timeout": "3s"}
    return write_config(
        tmp_path / "relay.yaml",
        db,
        brokers={"b": block},
        max_attempts=1,  # one attempt spent would dead-letter a message
        routes=[{"topic": "*", "broker": "b", "destination": queue}],
    )


def outbox_state(db: str) -> tuple[int, int, int]:
    """(waiting, dead-lettered, most attempts of any message)."""
    with psycopg.connect(db) as conn:
        row = conn.execute(
            "SELECT count(*) FILTER (WHERE dispatched_at IS NULL AND dead_lettered_at IS NULL),"
            " count(*) FILTER (WHERE dead_lettered_at IS NOT NULL), coalesce(max(attempts), 0) "
            "FROM outbox.messages"
        ).fetchone()
    assert row is not None
    return row[0], row[1], row[2]


def refusals_logged(relay: RelayProcess, code: str) -> int:
    return sum(1 for e in relay.logs() if e.get("event") == "broker_unreachable" and code in str(e.get("error")))


@pytest.mark.parametrize(
    ("fault", "code"),
    [("wrong secret", "SignatureDoesNotMatch"), ("unknown access key id", "InvalidClientTokenId")],
)
async def test_a_refused_identity_is_one_line_without_the_secret_and_the_messages_wait_for_the_right_one(
    db: str, gated: Gated, tmp_path: Path, fault: str, code: str
) -> None:
    queue = SqsQueue(gated, f"sig-{uuid.uuid4().hex[:8]}.fifo")  # made, and read below, through the gate
    wrong_secret = f"wrong-{uuid.uuid4().hex}"
    if fault == "wrong secret":
        bad = gated.env(secret_key=wrong_secret)
    else:  # the right secret under an id the gate does not know: the id alone is refused
        bad = gated.env(access_key=f"AKIA{uuid.uuid4().hex[:16].upper()}")
    secrets = {wrong_secret, gated.secret_key}
    path = relay_config(tmp_path, db, gated, queue.name)

    checked = run_cli("check", "--config", str(path), env=bad, timeout=120)
    output = checked.stdout + checked.stderr
    assert checked.returncode == 1, output
    lines = [line for line in checked.stdout.splitlines() if line.startswith("broker")]
    assert len(lines) == 1 and lines[0].startswith("broker    FAIL  b (sqs): "), checked.stdout
    assert code in lines[0] and "refuses the relay's credentials" in lines[0], lines[0]
    assert "Traceback" not in output and "Canonical String" not in output, output  # SQS's first line only
    assert not any(secret in output for secret in secrets), "a secret in check's output"
    assert code in gated.gate.refused and gated.gate.passed == 1, (
        gated.gate.refused,
        gated.gate.passed,
    )  # 1: the queue

    with psycopg.connect(db) as conn:
        ids = [str(enqueue(conn, "t", {"i": i}, key="k")) for i in range(3)]
        conn.commit()
    relay = RelayProcess(path, env=bad)
    try:
        # The positive signal first: the relay has asked, been refused, and asked again.
        wait_for(lambda: refusals_logged(relay, code) >= 2, 60, f"two refusals ({code}) logged")
        assert outbox_state(db) == (3, 0, 0), "the messages wait, spending no attempt (max_attempts is 1)"
        errors = [str(e.get("error")) for e in relay.logs() if e.get("event") == "broker_unreachable"]
        assert all("\n" not in error for error in errors), errors
        relay.terminate()
    finally:
        relay.close()
    logged = relay.log_path.read_text()
    assert not any(secret in logged for secret in secrets), "a secret in the relay's logs"
    assert outbox_state(db) == (3, 0, 0)

    relay = RelayProcess(path, env=gated.env())  # started again with the right identity
    try:
        wait_for(lambda: pending(db) == 0, 60, "every message dispatched")
        assert relay.terminate() == 0
    finally:
        relay.close()
    assert not any(secret in relay.log_path.read_text() for secret in secrets), "a secret in the relay's logs"
    assert outbox_state(db)[:2] == (0, 0), "all dispatched, none dead-lettered"
    received = await sqs_read(queue, 3)
    assert [r.message_id for r in received] == ids


async def test_a_key_rotated_away_under_a_running_relay_makes_its_messages_wait_until_it_is_back(
    db: str, gated: Gated, tmp_path: Path
) -> None:
    # The relay connected with a key that SQS stops taking while it runs (the secret
    # rotated on AWS's side): the publish path's refusal, not connect()'s.
    queue = SqsQueue(gated, f"run-{uuid.uuid4().hex[:8]}.fifo")
    path = relay_config(tmp_path, db, gated, queue.name)
    relay = RelayProcess(path, env=gated.env())
    try:
        relay.wait_started()
        wait_for(lambda: any(e.get("event") == "broker_connected" for e in relay.logs()), 60, "the broker connected")
        gated.gate.keys[gated.access_key] = f"rotated-{uuid.uuid4().hex}"
        with psycopg.connect(db) as conn:
            ids = [str(enqueue(conn, "t", {"i": i}, key="k")) for i in range(3)]
            conn.commit()

        def circuit_opened() -> bool:
            return any(
                e.get("event") == "broker_circuit_open" and "SignatureDoesNotMatch" in str(e.get("reason"))
                for e in relay.logs()
            )

        # The positive signal: a publish refused (the circuit opened on it), and the
        # circuit's probe refused after it.
        wait_for(circuit_opened, 60, "the circuit opened on SignatureDoesNotMatch")
        wait_for(lambda: gated.gate.refused.count("SignatureDoesNotMatch") >= 2, 60, "two refusals")
        assert outbox_state(db) == (3, 0, 0), "the messages wait, spending no attempt (max_attempts is 1)"
        gated.gate.keys[gated.access_key] = gated.secret_key  # the key taken again
        wait_for(lambda: pending(db) == 0, 60, "every message dispatched")
        assert relay.terminate() == 0
    finally:
        relay.close()
    assert gated.secret_key not in relay.log_path.read_text(), "the secret in the relay's logs"
    assert outbox_state(db)[:2] == (0, 0), "all dispatched, none dead-lettered"
    received = await sqs_read(queue, 3)
    assert [r.message_id for r in received] == ids


@pytest.mark.parametrize("query_error_header", [True, False], ids=["query-compatible", "type-only"])
async def test_a_key_refused_while_the_relay_runs_waits_and_goes_on_when_it_is_back(
    gated: Gated, monkeypatch: pytest.MonkeyPatch, query_error_header: bool
) -> None:
    # The adapter on the real answers after it connected: its key rotated away (the gate
    # knows another secret for it), then deleted (the gate knows no such id). Each is
    # every message's problem: unavailable (no attempt spent), the batch not split into
    # one request per entry, ready() false; the key back, the same messages go.
    # "type-only": the refusals without x-amzn-query-error, so botocore's code is the
    # JSON protocol's __type (InvalidSignatureException, UnrecognizedClientException), the
    # type SQS's JSON endpoint was reported to answer (async-aws/aws#1948): the adapter
    # must read both spellings, or a key rotated away dead-letters every message.
    for name, value in gated.env().items():
        monkeypatch.setenv(name, value)
    queue = SqsQueue(gated, f"rot-{uuid.uuid4().hex[:8]}.fifo")
    adapter = create_sqs("sqs", {"endpoint_url": gated.endpoint_url, "request_timeout": "3s"})
    await adapter.connect()
    gate = gated.gate
    gate.query_error_header = query_error_header
    try:
        first = [OutgoingMessage(message(0, key="k0"), queue.name, True)]
        assert [r.outcome for r in await adapter.publish(first)] == [Outcome.ACKED]
        later = [OutgoingMessage(message(i, key=f"k{i}"), queue.name, True) for i in (1, 2, 3)]
        for answered, seen, change in (
            (
                "SignatureDoesNotMatch",
                "SignatureDoesNotMatch" if query_error_header else "InvalidSignatureException",
                lambda: gate.keys.update({gated.access_key: f"rotated-{uuid.uuid4().hex}"}),
            ),
            (
                "InvalidClientTokenId",
                "InvalidClientTokenId" if query_error_header else "UnrecognizedClientException",
                lambda: gate.keys.clear(),
            ),
        ):
            change()
            before = len(gate.refused)
            refused = await adapter.publish(later)
            assert [r.outcome for r in refused] == [Outcome.UNAVAILABLE] * 3, refused
            assert all(f"({seen})" in (r.reason or "") for r in refused), refused
            assert all("\n" not in (r.reason or "") for r in refused), "one line each"
            assert gate.refused[before:] == [answered], "one request refused: not split per entry, not retried"
            unresolved = [OutgoingMessage(message(9, key="k9"), f"other-{uuid.uuid4().hex[:8]}", True)]
            assert [r.outcome for r in await adapter.publish(unresolved)] == [Outcome.UNAVAILABLE]  # GetQueueUrl
            with pytest.raises(ConnectionError, match=seen):
                await adapter.ready()
        gate.keys[gated.access_key] = gated.secret_key  # back
        assert await adapter.ready()
        assert [r.outcome for r in await adapter.publish(later)] == [Outcome.ACKED] * 3
    finally:
        await adapter.close()
    received = await sqs_read(queue, 4)
    assert sorted(r.message_id for r in received) == sorted(str(out.message_id) for out in first + later)


def signed(gated: Gated, body: bytes, *, secret: str | None = None, target: str = "AmazonSQS.ListQueues") -> AWSRequest:
    """A ListQueues request signed by botocore's own SigV4 signer (not the gate's code)."""
    request = AWSRequest(
        method="POST",
        url=f"{gated.endpoint_url}/",
        data=body,
        headers={"Content-Type": "application/x-amz-json-1.0", "X-Amz-Target": target},
    )
    credentials = Credentials(gated.access_key, secret or gated.secret_key)
    SigV4Auth(credentials, "sqs", gated.region).add_auth(request)
    return request


def send(
    gated: Gated, request: AWSRequest, body: bytes | None = None, headers: dict[str, str] | None = None
) -> tuple[int, Any, str | None]:
    """Send `request` to the gate (with another body or headers if given): (status, the
    JSON answer, x-amzn-query-error)."""
    connection = http.client.HTTPConnection("127.0.0.1", gated.gate.port, timeout=30)
    try:
        all_headers = {**dict(request.headers.items()), **(headers or {})}
        connection.request("POST", "/", body=request.body if body is None else body, headers=all_headers)
        answer = connection.getresponse()
        text = answer.read()
        try:
            content = json.loads(text or b"{}")
        except ValueError:  # not SQS's JSON (e.g. ElasticMQ's answer to a forwarded bad request)
            content = {"text": text.decode(errors="replace")}
        return answer.status, content, answer.getheader("x-amzn-query-error")
    finally:
        connection.close()


def test_the_gate_passes_a_signed_request_and_refuses_what_the_signature_does_not_cover(
    gated: Gated, monkeypatch: pytest.MonkeyPatch
) -> None:
    queue = SqsQueue(gated, f"gate-{uuid.uuid4().hex[:8]}")
    body = json.dumps({"QueueNamePrefix": queue.name}).encode()
    status, answer, _ = send(gated, signed(gated, body))
    assert status == 200 and answer.get("QueueUrls") == [queue.url], (status, answer)  # ElasticMQ's answer

    refused = {
        # A body other than the one signed (same length: only the signature tells).
        "tampered body": send(gated, signed(gated, body), body=body.replace(b"gate-", b"evil-")),
        # A signed header changed after signing: here the operation.
        "other operation": send(gated, signed(gated, body), headers={"X-Amz-Target": "AmazonSQS.PurgeQueue"}),
        "wrong secret": send(gated, signed(gated, body, secret="not-the-secret")),
    }
    for case, (status, answer, query_error) in refused.items():
        assert status == 403, (case, status, answer)
        assert query_error == "SignatureDoesNotMatch;Sender", (case, query_error)
        assert answer["__type"] == "com.amazon.coral.service#InvalidSignatureException", (case, answer)

    unsigned = AWSRequest(method="POST", url=f"{gated.endpoint_url}/", data=body, headers={"X-Amz-Target": "x"})
    status, answer, query_error = send(gated, unsigned)
    assert (status, query_error) == (403, "MissingAuthenticationToken;Sender"), (status, answer)

    # Signed 20 minutes ago (botocore's clock set back): AWS allows 15.
    now = botocore.auth.get_current_datetime
    monkeypatch.setattr(botocore.auth, "get_current_datetime", lambda: now() - datetime.timedelta(minutes=20))
    status, answer, query_error = send(gated, signed(gated, body))
    monkeypatch.setattr(botocore.auth, "get_current_datetime", now)
    assert (status, query_error) == (403, "SignatureDoesNotMatch;Sender"), (status, answer)
    assert answer["message"].startswith("Signature expired"), answer

    assert gated.gate.passed == 2, "the queue's creation and the signed ListQueues only"
