"""The relay publishing to SQS (ElasticMQ, scripts/services/elasticmq.sh) end to end:
writers on several keys into a FIFO queue, read back in order; TLS verified with
`ca_file` (ElasticMQ speaks no TLS: a TLS-terminating proxy stands in front of it, as a
load balancer would); and the failures a real server can give here: no credentials at
all, and a certificate the relay does not trust. Each is one line in `check`, and the
messages wait, spending no attempt.

ElasticMQ checks no signature: it takes any access key and secret (the first test shows
it). A wrong secret and an unknown access key id are refused for real in
tests/e2e/test_sqs_signatures.py, through a gate in front of ElasticMQ that checks each
request's SigV4 signature and answers as SQS does (SignatureDoesNotMatch,
InvalidClientTokenId: the adapter treats them as it treats missing credentials,
adapters/sqs.py, REFUSES_THE_RELAY)."""

from __future__ import annotations

import subprocess
import uuid
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any

import psycopg
import pytest
from outbox_relay_adapters.sqs import create as create_sqs
from structlog.testing import capture_logs

from outbox_relay import enqueue
from outbox_relay.assembly import build_adapters
from outbox_relay.config import Config
from outbox_relay.engine.relay import Relay
from outbox_relay.models import Outcome, OutgoingMessage
from tests.consumers import SqsQueue, sqs_client, sqs_read
from tests.services import ROOT, SqsServer
from tests.support.cli import run_cli
from tests.support.configs import make_config, write_config
from tests.support.factories import message
from tests.support.outbox import count, write
from tests.support.relay import running_relay
from tests.support.tls_proxy import tls_proxy
from tests.support.waiting import wait_until

NO_CREDENTIALS = {
    # Nothing for boto3's chain to find: no keys, no profile files, no instance role.
    "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent/credentials",
    "AWS_CONFIG_FILE": "/nonexistent/config",
    "AWS_EC2_METADATA_DISABLED": "true",
}


def sqs_block(endpoint: str, **options: Any) -> dict[str, Any]:
    return {"type": "sqs", "endpoint_url": endpoint, "connect_timeout": "2s", "request_timeout": "3s", **options}


def identity(monkeypatch: pytest.MonkeyPatch, server: SqsServer, **overrides: str) -> None:
    for name, value in {**server.env, **overrides}.items():
        monkeypatch.setenv(name, value)


@pytest.mark.parametrize("tls", [False, True], ids=["http", "tls"])
async def test_the_relay_publishes_each_key_in_order_into_a_fifo_queue(
    db: str, sqs_server: SqsServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tls: bool
) -> None:
    # A secret of the test's own: ElasticMQ takes any (it checks no signature).
    identity(monkeypatch, sqs_server, AWS_SECRET_ACCESS_KEY=f"any-{uuid.uuid4().hex[:6]}")
    queue = SqsQueue(sqs_server, f"e2e-{uuid.uuid4().hex[:8]}.fifo")
    port = int(sqs_server.endpoint_url.rsplit(":", 1)[1])
    with tls_proxy(port, tmp_path / "tls") as (tls_port, ca_file):
        block = (
            sqs_block(f"https://127.0.0.1:{tls_port}", ca_file=ca_file) if tls else sqs_block(sqs_server.endpoint_url)
        )
        config = make_config(
            db, brokers={"sqs": block}, routes=[{"topic": "*", "broker": "sqs", "destination": queue.name}]
        )
        async with running_relay_of(config):
            written = await write(db, "orders.created", ["a", "b", "c"], 20)
            await wait_until(lambda: count(db, "dispatched_at IS NULL") == 0, timeout=60)
    received = await sqs_read(queue, 60)
    assert sorted(r.message_id for r in received) == sorted(written.committed)
    for key in ("a", "b", "c"):
        assert all(r.key == written.committed[r.message_id][0] for r in received)  # the group is the key
        numbers = [written.committed[r.message_id][1] for r in received if r.key == key]
        assert numbers == sorted(numbers) and len(numbers) == 20, (key, numbers)


def running_relay_of(config: Config) -> AbstractAsyncContextManager[Relay]:
    return running_relay(config, build_adapters(config))


def stranger_ca(tmp_path: Path) -> str:
    """A CA that signed nothing the proxy uses."""
    subprocess.run([str(ROOT / "scripts" / "services" / "certs.sh"), str(tmp_path / "other")], check=True)
    return str(tmp_path / "other" / "ca.pem")


@pytest.mark.parametrize("fault", ["no credentials", "untrusted certificate"])
async def test_no_credentials_or_an_untrusted_certificate_is_one_line_and_dead_letters_nothing(
    db: str, sqs_server: SqsServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fault: str
) -> None:
    queue = SqsQueue(sqs_server, f"bad-{uuid.uuid4().hex[:8]}.fifo")
    port = int(sqs_server.endpoint_url.rsplit(":", 1)[1])
    if fault == "no credentials":
        for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
            monkeypatch.delenv(name, raising=False)
        for name, value in NO_CREDENTIALS.items():
            monkeypatch.setenv(name, value)
    else:
        identity(monkeypatch, sqs_server)
    with tls_proxy(port, tmp_path / "tls") as (tls_port, _ca_file):
        block = (
            sqs_block(sqs_server.endpoint_url)
            if fault == "no credentials"
            else sqs_block(f"https://127.0.0.1:{tls_port}", ca_file=stranger_ca(tmp_path))
        )
        settings: dict[str, Any] = {
            "brokers": {"b": block},
            "max_attempts": 1,
            "routes": [{"topic": "*", "broker": "b", "destination": queue.name}],
        }
        path = write_config(tmp_path / "relay.yaml", db, **settings)
        checked = run_cli("check", "--config", str(path), timeout=120)
        assert checked.returncode == 1, checked.stdout + checked.stderr
        line = [line for line in checked.stdout.splitlines() if line.startswith("broker")]
        assert len(line) == 1 and line[0].startswith("broker    FAIL  b (sqs): "), checked.stdout
        expected = "no AWS credentials" if fault == "no credentials" else "CERTIFICATE_VERIFY_FAILED"
        assert expected in line[0], line[0]

        config = make_config(db, **settings)
        with psycopg.connect(db) as conn:
            for i in range(3):
                enqueue(conn, "t", {"i": i}, key="k")
            conn.commit()
        with capture_logs() as logs:
            async with running_relay_of(config):
                # The positive signal: the relay has tried the broker, and failed, twice.
                await wait_until(lambda: sum(e["event"] == "broker_unreachable" for e in logs) >= 2, timeout=60)
                with psycopg.connect(db) as conn:
                    row = conn.execute(
                        "SELECT count(*) FILTER (WHERE dispatched_at IS NULL AND dead_lettered_at IS NULL),"
                        " count(*) FILTER (WHERE dead_lettered_at IS NOT NULL), max(attempts) "
                        "FROM outbox.messages"
                    ).fetchone()
    assert row == (3, 0, 0), "the messages wait, spending no attempt (max_attempts is 1)"


async def test_a_hot_keys_run_longer_than_request_timeout_goes_on_in_the_next_call(
    sqs_server: SqsServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # One round per message of a key: 300 of one key cannot all go within 200 ms. What
    # was sent is a prefix of the run, acked; the rest comes back not_sent (the engine
    # leaves it due at once, no attempt spent, no backoff) and goes in later calls; the
    # queue holds the whole run once, in order.
    identity(monkeypatch, sqs_server)
    queue = SqsQueue(sqs_server, f"hot-{uuid.uuid4().hex[:8]}.fifo")
    adapter = create_sqs("sqs", {"endpoint_url": sqs_server.endpoint_url, "request_timeout": "200ms"})
    await adapter.connect()
    run = [OutgoingMessage(message(i, key="hot"), queue.name, True) for i in range(300)]
    try:
        left, calls = run, 0
        while left:
            calls += 1
            outcomes = [r.outcome for r in await adapter.publish(left)]
            acked = outcomes.count(Outcome.ACKED)
            assert acked >= 1 and outcomes[:acked] == [Outcome.ACKED] * acked, outcomes
            assert set(outcomes[acked:]) <= {Outcome.NOT_SENT}, outcomes
            left = left[acked:]
        assert calls > 1, "the run went in one call: the case proves nothing"
    finally:
        await adapter.close()
    received = await sqs_read(queue, 300)
    assert [r.message_id for r in received] == [str(out.message_id) for out in run]


async def test_a_queue_that_existed_and_is_missing_now_waits_and_ready_stays_false_until_it_is_back(
    sqs_server: SqsServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A queue resolved earlier and missing now is what a restarting server that has not
    # restored its queues yet answers: its messages wait (unavailable, not dead-lettered)
    # and every probe reads not ready until the queue is back, not only the first.
    identity(monkeypatch, sqs_server)
    name = f"gone-{uuid.uuid4().hex[:8]}.fifo"
    queue = SqsQueue(sqs_server, name)
    adapter = create_sqs("sqs", {"endpoint_url": sqs_server.endpoint_url, "request_timeout": "3s"})
    await adapter.connect()
    try:
        first = await adapter.publish([OutgoingMessage(message(1, key="k"), name, True)])
        assert [r.outcome for r in first] == [Outcome.ACKED], first
        assert await adapter.ready()
        sqs_client(sqs_server).delete_queue(QueueUrl=queue.url)
        later = [OutgoingMessage(message(i, key="k"), name, True) for i in (2, 3)]
        gone = await adapter.publish(later)
        assert [r.outcome for r in gone] == [Outcome.UNAVAILABLE, Outcome.NOT_SENT], gone
        for _ in range(3):
            with pytest.raises(ConnectionError, match=name):
                await adapter.ready()
        still = await adapter.publish(later)  # asked again, still missing: still waiting
        assert [r.outcome for r in still] == [Outcome.UNAVAILABLE, Outcome.NOT_SENT], still
        queue = SqsQueue(sqs_server, name)  # back
        assert await adapter.ready()
        back = await adapter.publish(later)
        assert [r.outcome for r in back] == [Outcome.ACKED, Outcome.ACKED], back
    finally:
        await adapter.close()
    received = await sqs_read(queue, 2)
    assert [r.message_id for r in received] == [str(out.message_id) for out in later]


async def test_ready_asks_for_no_queue_while_nothing_went_wrong(
    sqs_server: SqsServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # /readyz asks every second within 2 s: with many queues, one GetQueueUrl each per
    # probe would read not ready and load the server. While nothing went wrong, ready()
    # is one ListQueues whatever the number of queues resolved.
    identity(monkeypatch, sqs_server)
    tag = uuid.uuid4().hex[:8]
    queues = [SqsQueue(sqs_server, f"many-{tag}-{i}") for i in range(20)]
    adapter = create_sqs("sqs", {"endpoint_url": sqs_server.endpoint_url, "request_timeout": "3s"})
    await adapter.connect()
    try:
        sent = await adapter.publish([OutgoingMessage(message(i), q.name, True) for i, q in enumerate(queues)])
        assert [r.outcome for r in sent] == [Outcome.ACKED] * len(queues), sent
        operations: list[str] = []
        adapter._client.meta.events.register("before-call.sqs", lambda model, **_: operations.append(model.name))
        assert await adapter.ready()
        assert operations == ["ListQueues"], operations
    finally:
        await adapter.close()
