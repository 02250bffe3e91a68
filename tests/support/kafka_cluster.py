"""A 3-node Kafka cluster on loopback (scripts/services/kafka.sh cluster-start), for the
cluster scenarios (tests/clusters) and the soak: `kafka_cluster()` yields a
`KafkaCluster` with its bootstrap string, each node (stop, start, kill), and what a
scenario aims a fault with: a partition's leader and ISR, the active controller, a
topic with 3 replicas and `min.insync.replicas=2`, and the wait for a healthy cluster.

Blocking calls only (confluent-kafka's AdminClient, a raw DescribeQuorum request), so
a script outside pytest and asyncio can use it as well as a test.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import socket
import struct
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from confluent_kafka.admin import AdminClient, NewTopic  # type: ignore[attr-defined]

from tests.services import SCRIPTS, LocalBroker, stable_port_block

NODE_IDS = (1, 2, 3)
PORTS_PER_NODE = 3  # PLAINTEXT, CONTROLLER, SASL_SSL (kafka.sh)


@dataclass
class KafkaCluster:
    """Nodes 1-3 in `directory`/node1..3; node N's PLAINTEXT port is
    port + 3(N-1), its controller port the next one."""

    directory: Path
    port: int
    _admin: AdminClient | None = field(default=None, repr=False)

    @property
    def nodes(self) -> dict[int, LocalBroker]:
        script = SCRIPTS / "kafka.sh"
        return {n: LocalBroker(script, self.directory / f"node{n}", self.node_port(n)) for n in NODE_IDS}

    def node(self, node_id: int) -> LocalBroker:
        """Node `node_id` (1-3): stop() (SIGTERM, a controlled shutdown), kill()
        (SIGKILL), start() (on its ports, with its data; returns once registered)."""
        return self.nodes[node_id]

    def node_port(self, node_id: int) -> int:
        return self.port + PORTS_PER_NODE * (node_id - 1)

    @property
    def bootstrap(self) -> str:
        return ",".join(f"127.0.0.1:{self.node_port(n)}" for n in NODE_IDS)

    def _kafka_sh(self, *args: str) -> None:
        result = subprocess.run([str(SCRIPTS / "kafka.sh"), *args], capture_output=True, text=True, check=False)
        if result.returncode != 0:
            tail = (result.stderr or result.stdout).strip().splitlines()[-20:]
            raise RuntimeError(f"kafka.sh {args[0]} failed:\n" + "\n".join(tail))

    def start(self) -> None:
        self._kafka_sh("cluster-start", str(self.directory), str(self.port))

    def stop(self) -> None:
        self._admin = None  # it would try to reconnect to the stopped nodes forever
        self._kafka_sh("cluster-stop", str(self.directory))

    def running(self, node_id: int) -> bool:
        pid_file = self.directory / f"node{node_id}" / "kafka.pid"
        try:
            pid = int(pid_file.read_text().split()[0])
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except (OSError, ValueError, IndexError):
            return False
        return str(self.directory / f"node{node_id}").encode() in cmdline

    def admin(self) -> AdminClient:
        # Kept: a dropped AdminClient fails its own pending futures ("handle destroyed").
        if self._admin is None:
            self._admin = AdminClient(
                {"bootstrap.servers": self.bootstrap, "socket.connection.setup.timeout.ms": 3000},
                logger=logging.getLogger("tests.kafka_cluster"),  # not librdkafka's raw lines on stderr
            )
        return self._admin

    def create_topic(self, topic: str, partitions: int = 3, **config: str) -> None:
        """A topic with 3 replicas that acks (acks=all) only with 2 of them in sync."""
        new = NewTopic(topic, partitions, 3, config={"min.insync.replicas": "2", **config})
        self.admin().create_topics([new], request_timeout=30)[topic].result(timeout=60)

    def partition(self, topic: str, partition: int, timeout: float = 10) -> tuple[int, list[int]]:
        """(leader node id, ISR) of a partition as the cluster's metadata has it now."""
        metadata = self.admin().list_topics(topic, timeout=timeout)
        found = metadata.topics[topic]
        if found.error is not None:
            raise RuntimeError(f"no metadata for {topic}: {found.error}")
        described = found.partitions[partition]
        return int(described.leader), [int(n) for n in described.isrs]

    def leader(self, topic: str, partition: int = 0) -> int:
        return self.partition(topic, partition)[0]

    def controller(self, timeout: float = 10) -> int:
        """The active controller's node id: the leader of the metadata quorum, asked of
        a running node with DescribeQuorum (brokers forward it to the controller). A
        KRaft broker's Metadata answer names a random broker as "controller", not it."""
        deadline = time.monotonic() + timeout
        while True:
            for node_id in NODE_IDS:
                if not self.running(node_id):
                    continue
                with contextlib.suppress(OSError, EOFError, struct.error):
                    leader = describe_quorum_leader(self.node_port(node_id))
                    if leader >= 0:
                        return leader
            if time.monotonic() > deadline:
                raise RuntimeError(f"no node answered DescribeQuorum with a leader within {timeout}s")
            time.sleep(0.2)

    def healthy(self) -> bool:
        """All 3 nodes running and registered, and every partition of every topic led
        and fully in sync (3 replicas in its ISR): a fault aimed now has the whole
        cluster to fall back on."""
        if not all(self.running(n) for n in NODE_IDS):
            return False
        try:
            metadata = self.admin().list_topics(timeout=5)
        except Exception:
            return False
        if sorted(metadata.brokers) != list(NODE_IDS):
            return False
        for topic in metadata.topics.values():
            if topic.error is not None:
                return False
            for described in topic.partitions.values():
                if described.leader < 0 or len(described.isrs) < len(described.replicas):
                    return False
        return True

    def restore(self, timeout: float = 180) -> None:
        """Start every node that is not running, then wait until the cluster is healthy."""
        for node_id in NODE_IDS:
            if not self.running(node_id):
                self.node(node_id).start()
        deadline = time.monotonic() + timeout
        while not self.healthy():
            if time.monotonic() > deadline:
                raise RuntimeError(f"the Kafka cluster in {self.directory} not healthy within {timeout}s")
            time.sleep(0.5)


@contextlib.contextmanager
def kafka_cluster() -> Iterator[KafkaCluster]:
    """A fresh 3-node cluster on free loopback ports, stopped and removed afterwards."""
    port = stable_port_block(PORTS_PER_NODE * len(NODE_IDS))
    cluster = KafkaCluster(Path(tempfile.mkdtemp(prefix="outbox-relay-kafka-cluster-")), port)
    try:
        cluster.start()
        yield cluster
    finally:
        with contextlib.suppress(RuntimeError):
            cluster.stop()
        shutil.rmtree(cluster.directory, ignore_errors=True)


def _uvarint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _read_uvarint(data: bytes, offset: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[offset]
        offset += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, offset
        shift += 7


def describe_quorum_leader(port: int) -> int:
    """The leader id of the KRaft metadata partition (__cluster_metadata, 0), from a
    DescribeQuorum v0 request to 127.0.0.1:`port`; -1 while there is none. Neither
    client library has this request, so it is written here (a flexible version:
    compact strings and arrays, tagged fields)."""
    client = b"outbox-relay-tests"
    header = struct.pack(">hhih", 55, 0, 7, len(client)) + client + _uvarint(0)
    topic = b"__cluster_metadata"
    body = _uvarint(2) + _uvarint(len(topic) + 1) + topic  # one topic
    body += _uvarint(2) + struct.pack(">i", 0) + _uvarint(0)  # one partition, 0
    body += _uvarint(0) + _uvarint(0)  # the topic's and the body's tagged fields
    request = header + body
    with socket.create_connection(("127.0.0.1", port), timeout=3) as sock:
        sock.settimeout(5)
        sock.sendall(struct.pack(">i", len(request)) + request)
        (size,) = struct.unpack(">i", _recv(sock, 4))
        data = _recv(sock, size)
    correlation = struct.unpack_from(">i", data, 0)[0]
    if correlation != 7:
        raise EOFError("unexpected correlation id")
    _, offset = _read_uvarint(data, 4)  # response header's tagged fields
    (error,) = struct.unpack_from(">h", data, offset)
    offset += 2
    if error != 0:
        return -1
    topics, offset = _read_uvarint(data, offset)
    if topics < 2:
        return -1
    name_length, offset = _read_uvarint(data, offset)
    offset += name_length - 1
    partitions, offset = _read_uvarint(data, offset)
    if partitions < 2:
        return -1
    _index, partition_error, leader = struct.unpack_from(">ihi", data, offset)
    return -1 if partition_error != 0 else int(leader)


def _recv(sock: socket.socket, size: int) -> bytes:
    buffer = b""
    while len(buffer) < size:
        chunk = sock.recv(size - len(buffer))
        if not chunk:
            raise EOFError
        buffer += chunk
    return buffer
