"""Where the tests get their services: PostgreSQL, Kafka, RabbitMQ, Redis, NATS with
JetStream and ElasticMQ (an SQS-compatible server; and toxiproxy, to put network faults
between the relay and any of them, and SeaweedFS, an S3-compatible object store).

For each, in order:
1. an environment variable naming a running one
   (``OUTBOX_RELAY_TEST_DSN``, ``OUTBOX_RELAY_TEST_KAFKA``, ``OUTBOX_RELAY_TEST_AMQP_URL``,
   ``OUTBOX_RELAY_TEST_REDIS_URL``, ``OUTBOX_RELAY_TEST_SQS_ENDPOINT``);
2. testcontainers, when a Docker engine answers;
3. local processes from this machine's binaries: PostgreSQL via
   outbox_relay.demo.local_postgres, Kafka, RabbitMQ, Redis, NATS and
   ElasticMQ via scripts/services/*.sh (scripts/test installs what they need first).

No path skips: when none works, the tests that need the service fail with the reason.
Local brokers can be stopped and started again (the fault tests do).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from outbox_relay.demo import local_postgres
from tests.support.toxiproxy import Toxiproxy

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = ROOT / "scripts" / "services"


def docker_engine_answers() -> bool:
    if not shutil.which("docker"):
        return False
    try:
        result = subprocess.run(["docker", "info"], capture_output=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return result.returncode == 0


@contextlib.contextmanager
def _quiet_deprecations() -> Iterator[None]:
    # testcontainers warns about its own API at import; the suite turns warnings into errors.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        yield


# Logical decoding for the WAL source's tests (tests/integration/test_wal_stream.py):
# the demo's settings (replication slots and walsenders for the tests that stream),
# and prepared transactions for the one that checks COMMIT PREPARED. A server named by
# OUTBOX_RELAY_TEST_DSN needs them too (the WAL tests say so in one line when they are
# missing).
LOGICAL_DECODING = {**local_postgres.LOGICAL_DECODING, "max_prepared_transactions": "10"}


@contextlib.contextmanager
def postgres() -> Iterator[tuple[str, local_postgres.LocalPostgres | None]]:
    """Yield (superuser DSN, local cluster or None)."""
    dsn = os.environ.get("OUTBOX_RELAY_TEST_DSN")
    if dsn:
        yield dsn, None
        return
    if docker_engine_answers():
        with _quiet_deprecations():
            from testcontainers.postgres import PostgresContainer

        # The same server settings as the local cluster's below, where they matter.
        flags = " ".join(f"-c {name}={value}" for name, value in LOGICAL_DECODING.items())
        with PostgresContainer("postgres:16-alpine", driver=None).with_command(f"postgres {flags}") as container:
            yield container.get_connection_url(), None
        return
    # Durability off: these clusters are thrown away, and it makes the suite faster.
    # A short autovacuum naptime lets the short soak see several vacuum cycles (the
    # soak's bounds are computed from whatever naptime the server has).
    settings = {"fsync": "off", "full_page_writes": "off", "autovacuum_naptime": "2s", **LOGICAL_DECODING}
    with local_postgres.running(settings) as cluster:
        yield cluster.dsn, cluster


@dataclass
class LocalBroker:
    """A broker process started by scripts/services/<script>; stop() and start() again."""

    script: Path
    directory: Path
    port: int
    env: dict[str, str] = field(default_factory=dict)  # for the script, on top of os.environ

    def _call(self, *args: str) -> None:
        result = subprocess.run(
            [str(self.script), *args], capture_output=True, text=True, check=False, env={**os.environ, **self.env}
        )
        if result.returncode != 0:
            tail = (result.stderr or result.stdout).strip().splitlines()[-15:]
            raise RuntimeError(f"{self.script.name} {args[0]} failed:\n" + "\n".join(tail))

    def start(self) -> None:
        self._call("start", str(self.directory), str(self.port))

    def stop(self) -> None:
        self._call("stop", str(self.directory))

    def kill(self) -> None:
        """SIGKILL the broker: no clean shutdown at all."""
        import signal

        for pid_file in self.directory.glob("*.pid"):
            with contextlib.suppress(ValueError, ProcessLookupError):
                os.kill(int(pid_file.read_text().split()[0]), signal.SIGKILL)


@contextlib.contextmanager
def local_broker(script: str, port_span: int, *, env: dict[str, str] | None = None) -> Iterator[LocalBroker]:
    port = stable_port_block(port_span)
    broker = LocalBroker(SCRIPTS / script, Path(tempfile.mkdtemp(prefix=f"outbox-relay-{script}-")), port, env or {})
    try:
        broker.start()
        yield broker
    finally:
        with contextlib.suppress(RuntimeError):
            broker.stop()
        shutil.rmtree(broker.directory, ignore_errors=True)


def stable_port_block(span: int) -> int:
    """A port p such that p .. p+span-1 are free on loopback now and below the kernel's
    ephemeral range. A broker stopped and started again (the fault scenarios) must find
    its ports free, and a port in the ephemeral range can meanwhile become an outgoing
    connection's local port: a client retrying a dead broker's port can even connect to
    itself on it (TCP simultaneous open on loopback). It happened: restarts failed with
    "Address already in use"."""
    import random
    import socket

    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    rng = random.Random()
    for _ in range(100):
        base = rng.randrange(10000, max(10001, low - span))
        sockets = []
        try:
            for offset in range(span):
                sock = socket.socket()
                sockets.append(sock)
                sock.bind(("127.0.0.1", base + offset))
            return base
        except OSError:
            continue
        finally:
            for sock in sockets:
                sock.close()
    raise RuntimeError("no block of free loopback ports found below the ephemeral range")


@contextlib.contextmanager
def kafka() -> Iterator[tuple[str, LocalBroker | None]]:
    """Yield (bootstrap servers, local broker or None)."""
    bootstrap = os.environ.get("OUTBOX_RELAY_TEST_KAFKA")
    if bootstrap:
        yield bootstrap, None
        return
    if docker_engine_answers():
        with _quiet_deprecations():
            from testcontainers.community.kafka import KafkaContainer

        with KafkaContainer("confluentinc/cp-kafka:7.6.0").with_kraft() as container:
            yield container.get_bootstrap_server(), None
        return
    with local_broker("kafka.sh", 3) as broker:  # PORT, PORT+1 (controller), PORT+2 (SASL_SSL)
        yield f"127.0.0.1:{broker.port}", broker


@contextlib.contextmanager
def rabbitmq() -> Iterator[tuple[str, LocalBroker | None]]:
    """Yield (AMQP URL, local broker or None)."""
    url = os.environ.get("OUTBOX_RELAY_TEST_AMQP_URL")
    if url:
        yield url, None
        return
    if docker_engine_answers():
        with _quiet_deprecations():
            from testcontainers.community.rabbitmq import RabbitMqContainer

        with RabbitMqContainer("rabbitmq:3.13") as container:
            params = container.get_connection_params()
            yield f"amqp://guest:guest@{params.host}:{params.port}/%2F", None
        return
    with local_broker("rabbitmq.sh", 4) as broker:  # AMQP, distribution, epmd, AMQPS
        yield f"amqp://guest:guest@127.0.0.1:{broker.port}/%2F", broker


# The relay user of the local Redis (scripts/services/redis.sh): handed to the script so
# that the two always agree. A loopback test server's password, not a secret.
REDIS_RELAY_USER = "relay"
REDIS_RELAY_PASSWORD = "relay-test-secret"
REDIS_RELAY_KEYS = "secure-*"  # the keys the relay user may write


def local_redis() -> contextlib.AbstractContextManager[LocalBroker]:
    """A redis-server of its own (scripts/services/redis.sh): RESP on PORT, TLS on PORT+1."""
    env = {"REDIS_RELAY_PASSWORD": REDIS_RELAY_PASSWORD, "REDIS_RELAY_KEYS": REDIS_RELAY_KEYS}
    return local_broker("redis.sh", 2, env=env)


@contextlib.contextmanager
def redis() -> Iterator[tuple[str, LocalBroker | None]]:
    """Yield (redis:// URL, local server or None)."""
    url = os.environ.get("OUTBOX_RELAY_TEST_REDIS_URL")
    if url:
        yield url, None
        return
    if docker_engine_answers():
        with _quiet_deprecations():
            from testcontainers.redis import RedisContainer

        with RedisContainer("redis:7.0") as container:
            yield f"redis://{container.get_container_host_ip()}:{container.get_exposed_port(6379)}/0", None
        return
    with local_redis() as broker:
        yield f"redis://127.0.0.1:{broker.port}/0", broker


@contextlib.contextmanager
def toxiproxy() -> Iterator[Toxiproxy]:
    """Yield the API of a toxiproxy server: the one at OUTBOX_RELAY_TEST_TOXIPROXY (its
    API URL) if set, else a local one started by scripts/services/toxiproxy.sh (which
    scripts/test builds; a missing one is built here, from the Go module proxy). Its
    proxies listen on loopback only."""
    url = os.environ.get("OUTBOX_RELAY_TEST_TOXIPROXY")
    if url:
        with Toxiproxy(url) as api:
            yield api
        return
    with local_broker("toxiproxy.sh", 1) as server, Toxiproxy(f"http://127.0.0.1:{server.port}") as api:
        yield api


# The secure listeners of the local brokers (scripts/services/*.sh): Kafka SASL_SSL with a
# SCRAM-SHA-512 user created at format time, RabbitMQ AMQPS; both with certificates from
# certs.sh, made at start. A broker named by an environment variable or run by Docker
# has neither: the secure tests then start local brokers of their own.
KAFKA_SCRAM_USER = "relay"
KAFKA_SCRAM_PASSWORD = "relay-test-secret"  # kafka.sh's default: a loopback test broker


@dataclass(frozen=True)
class Secure:
    """How to reach a broker's TLS listener: where, with which CA, and its credentials."""

    address: str  # Kafka: host:port; RabbitMQ: an amqps:// URL
    ca_file: str
    plain: str  # the same broker's plain listener, for test consumers


def kafka_sasl_ssl(broker: LocalBroker) -> Secure:
    return Secure(f"127.0.0.1:{broker.port + 2}", str(broker.directory / "tls" / "ca.pem"), f"127.0.0.1:{broker.port}")


def redis_tls(broker: LocalBroker) -> Secure:
    """The TLS port of a local Redis; the relay user's password is REDIS_RELAY_PASSWORD."""
    return Secure(
        f"rediss://127.0.0.1:{broker.port + 1}/0",
        str(broker.directory / "tls" / "ca.pem"),
        f"redis://127.0.0.1:{broker.port}/0",
    )


def rabbitmq_amqps(broker: LocalBroker) -> Secure:
    return Secure(
        f"amqps://guest:guest@127.0.0.1:{broker.port + 3}/%2F",
        str(broker.directory / "tls" / "ca.pem"),
        f"amqp://guest:guest@127.0.0.1:{broker.port}/%2F",
    )


# The S3 identity of the local object store (scripts/services/seaweedfs.sh): handed to the
# script, so that the two always agree. A loopback test store's keys, not a secret.
S3_ACCESS_KEY = "outbox-relay-test"
S3_SECRET_KEY = "Qm9XbGF5LXRlc3Qtc2VjcmV0LWtleS0wMDAx"


@dataclass(frozen=True)
class S3Store:
    """How to reach an S3-compatible object store, and the local one's process if it is
    local (stop() and start() it again: its buckets and objects stay)."""

    endpoint_url: str  # S3 over plain HTTP
    tls_endpoint_url: str | None  # the same store over HTTPS, its certificate signed by ca_file
    ca_file: str | None
    access_key: str
    secret_key: str
    broker: LocalBroker | None


@contextlib.contextmanager
def local_seaweedfs() -> Iterator[S3Store]:
    """A SeaweedFS of its own, started by scripts/services/seaweedfs.sh (which scripts/test
    builds; a missing one is built here, from the Go module proxy): S3 over HTTP on PORT,
    over HTTPS on PORT+1, its master, volume server and filer on PORT+2..PORT+8."""
    keys = {"SEAWEEDFS_ACCESS_KEY": S3_ACCESS_KEY, "SEAWEEDFS_SECRET_KEY": S3_SECRET_KEY}
    with local_broker("seaweedfs.sh", 10, env=keys) as broker:
        yield S3Store(
            endpoint_url=f"http://127.0.0.1:{broker.port}",
            tls_endpoint_url=f"https://127.0.0.1:{broker.port + 1}",
            ca_file=str(broker.directory / "certs" / "ca.pem"),
            access_key=S3_ACCESS_KEY,
            secret_key=S3_SECRET_KEY,
            broker=broker,
        )


@contextlib.contextmanager
def seaweedfs() -> Iterator[S3Store]:
    """Yield an S3 object store: the one at OUTBOX_RELAY_TEST_S3_ENDPOINT if set (its keys
    in OUTBOX_RELAY_TEST_S3_ACCESS_KEY and _SECRET_KEY, default the local store's; an HTTPS
    endpoint in OUTBOX_RELAY_TEST_S3_TLS_ENDPOINT with its CA in _CA_FILE, else none), else
    a local SeaweedFS (no Docker path: like toxiproxy, it is built and run here)."""
    endpoint = os.environ.get("OUTBOX_RELAY_TEST_S3_ENDPOINT")
    if endpoint:
        yield S3Store(
            endpoint_url=endpoint,
            tls_endpoint_url=os.environ.get("OUTBOX_RELAY_TEST_S3_TLS_ENDPOINT"),
            ca_file=os.environ.get("OUTBOX_RELAY_TEST_S3_CA_FILE"),
            access_key=os.environ.get("OUTBOX_RELAY_TEST_S3_ACCESS_KEY", S3_ACCESS_KEY),
            secret_key=os.environ.get("OUTBOX_RELAY_TEST_S3_SECRET_KEY", S3_SECRET_KEY),
            broker=None,
        )
        return
    with local_seaweedfs() as store:
        yield store


# The users of the local NATS server (scripts/services/nats.sh), handed to the script so
# that the two always agree: a password user and an nkey user (its seed below, the public
# key given to the server). A loopback test server's credentials, not secrets.
NATS_USER = "relay"
NATS_PASSWORD = "relay-nats-test-secret"
NATS_NKEY_SEED = "SUAB5U3B6AJ6KRAHXRMKNP3HTDYX7NPN5YDFHZQZI7C7YYHAYIG7FVPVC4"
NATS_NKEY_PUBLIC = "UAJ47PC2FBW73WYFWXNRHBJU7PF5CP7PBL5YNPQAACRXK6RVZDASW2CH"


@dataclass(frozen=True)
class NatsServer:
    """How to reach a NATS server with JetStream: its URL (clients without credentials
    are let in), and the local one's process if it is local (stop() and start() it again:
    its streams stay)."""

    url: str
    broker: LocalBroker | None

    @property
    def tls_url(self) -> str:
        """The local server's TLS twin (nats.sh: TLS required on PORT+2, its own streams),
        verified by ca_file."""
        assert self.broker is not None, "only a local server has a TLS twin"
        return f"tls://127.0.0.1:{self.broker.port + 2}"

    @property
    def ca_file(self) -> str:
        assert self.broker is not None, "only a local server has the test CA"
        return str(self.broker.directory / "tls" / "ca.pem")


@contextlib.contextmanager
def local_nats() -> Iterator[NatsServer]:
    """A NATS server of its own, started by scripts/services/nats.sh (which scripts/test
    builds; a missing one is built here, from the Go module proxy): plain clients on PORT,
    TLS required on PORT+2 (another server, its own streams), monitoring on PORT+1 and +3."""
    users = {"NATS_USER": NATS_USER, "NATS_PASSWORD": NATS_PASSWORD, "NATS_NKEY_USER": NATS_NKEY_PUBLIC}
    with local_broker("nats.sh", 4, env=users) as broker:
        yield NatsServer(f"nats://127.0.0.1:{broker.port}", broker)


@contextlib.contextmanager
def nats() -> Iterator[NatsServer]:
    """Yield a NATS server with JetStream: the one at OUTBOX_RELAY_TEST_NATS_URL if set
    (letting clients in without credentials), else a local one (no Docker path: like
    toxiproxy, it is built and run here)."""
    url = os.environ.get("OUTBOX_RELAY_TEST_NATS_URL")
    if url:
        yield NatsServer(url, None)
        return
    with local_nats() as server:
        yield server


# The identity the tests sign SQS requests with. ElasticMQ checks no signature (it takes
# any keys: tried, see docs/how-to/sqs.md), so these are a name, not a secret.
SQS_ACCESS_KEY = "outbox-relay-test"
SQS_SECRET_KEY = "elasticmq-takes-any-key"
SQS_REGION = "us-east-1"


@dataclass(frozen=True)
class SqsServer:
    """How to reach an SQS-compatible server, and the local ElasticMQ's process if it is
    local (stop() and start() it again: its queues and messages persist in its DIR)."""

    endpoint_url: str
    access_key: str
    secret_key: str
    region: str
    broker: LocalBroker | None

    @property
    def env(self) -> dict[str, str]:
        """The environment boto3 takes the identity from (AWS_* variables)."""
        return {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_REGION": self.region,
        }


@contextlib.contextmanager
def local_elasticmq() -> Iterator[SqsServer]:
    """An ElasticMQ of its own, started by scripts/services/elasticmq.sh (which scripts/test
    fetches; missing jars are fetched here, with Maven): the SQS API on PORT."""
    with local_broker("elasticmq.sh", 1) as broker:
        yield SqsServer(f"http://127.0.0.1:{broker.port}", SQS_ACCESS_KEY, SQS_SECRET_KEY, SQS_REGION, broker)


@contextlib.contextmanager
def elasticmq() -> Iterator[SqsServer]:
    """Yield an SQS-compatible server: the one at OUTBOX_RELAY_TEST_SQS_ENDPOINT if set (keys
    in OUTBOX_RELAY_TEST_SQS_ACCESS_KEY and _SECRET_KEY, default the local server's), else a
    local ElasticMQ (no Docker path: like SeaweedFS, it is fetched and run here)."""
    endpoint = os.environ.get("OUTBOX_RELAY_TEST_SQS_ENDPOINT")
    if endpoint:
        yield SqsServer(
            endpoint,
            os.environ.get("OUTBOX_RELAY_TEST_SQS_ACCESS_KEY", SQS_ACCESS_KEY),
            os.environ.get("OUTBOX_RELAY_TEST_SQS_SECRET_KEY", SQS_SECRET_KEY),
            os.environ.get("AWS_REGION", SQS_REGION),
            None,
        )
        return
    with local_elasticmq() as server:
        yield server
