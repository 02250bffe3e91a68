"""A 3-node RabbitMQ cluster on loopback, from `scripts/services/rabbitmq.sh
cluster-start`, for the cluster tests and the soak (plain Python: no pytest needed).

    with rabbitmq_cluster() as cluster:
        cluster.urls                  # the nodes' AMQP URLs, node 1 first
        cluster.nodes[0].stop()       # rabbitmqctl stop; start() brings it back
        cluster.nodes[2].kill()       # SIGKILL
        cluster.nodes[1].partition()  # cut off its peers (see rabbitmq.sh); heal()
        cluster.nodes[0].freeze()     # SIGSTOP; thaw()
        cluster.leader("orders")      # the node leading a quorum queue

Always local processes (a cluster behind an environment variable or in a container
could not be stopped node by node from here).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from tests.services import SCRIPTS, stable_port_block
from tests.support.waiting import wait_for

SCRIPT = SCRIPTS / "rabbitmq.sh"
NODES = 3
PORTS_PER_NODE = 4  # AMQP, distribution, epmd (node 1's is the cluster's), AMQPS
CTL_TIMEOUT = 120  # seconds: an Erlang CLI start is slow on a loaded 2-core machine
# How long a node may take to boot (rabbitmq.sh's default is 90 s): with other suites on
# the same 2 cores a node was seen taking more than that.
START_TIMEOUT = os.environ.get("RABBITMQ_START_TIMEOUT", "300")


def _run(*args: str, timeout: float = 300) -> str:
    result = subprocess.run(
        [str(SCRIPT), *args],
        capture_output=True,
        text=True,
        check=False,
        timeout=timeout,
        env={**os.environ, "RABBITMQ_START_TIMEOUT": START_TIMEOUT},
    )
    if result.returncode != 0:
        tail = (result.stderr or result.stdout).strip().splitlines()[-15:]
        raise RuntimeError(f"rabbitmq.sh {args[0]} failed:\n" + "\n".join(tail))
    return result.stdout


@dataclass
class ClusterNode:
    """Node `number` (1-3) of a cluster."""

    cluster: RabbitCluster
    number: int

    @property
    def port(self) -> int:
        return self.cluster.port + PORTS_PER_NODE * (self.number - 1)

    @property
    def name(self) -> str:
        """The Erlang node name, as RabbitMQ reports a queue's leader and members."""
        return f"outbox-{self.port}@localhost"

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}/%2F"

    def _node(self, command: str) -> None:
        _run(command, str(self.cluster.directory), str(self.number), timeout=600)

    def start(self) -> None:
        """Start it again; returns once it serves AMQP (it rejoins its cluster itself)."""
        self._node("node-start")

    def stop(self) -> None:
        """A clean stop (`rabbitmqctl stop`): clients see their connection closed."""
        self._node("node-stop")

    def kill(self) -> None:
        """SIGKILL: no clean shutdown; clients see a reset."""
        self._node("node-kill")

    def partition(self) -> None:
        """Cut it off its peers (the Erlang distribution only; clients still reach it)."""
        self._node("node-partition")

    def heal(self) -> None:
        self._node("node-heal")

    def freeze(self) -> None:
        """SIGSTOP: the node holds its connections open and answers nothing."""
        os.kill(self.pid(), signal.SIGSTOP)

    def thaw(self) -> None:
        os.kill(self.pid(), signal.SIGCONT)

    def pid(self) -> int:
        return int((self.cluster.directory / f"node{self.number}" / "rabbitmq.pid").read_text().strip())

    def ctl(self, *args: str) -> str:
        """`rabbitmqctl ARGS` against this node; RuntimeError when it does not answer."""
        return _run("node-ctl", str(self.cluster.directory), str(self.number), *args, timeout=CTL_TIMEOUT)


@dataclass
class RabbitCluster:
    directory: Path
    port: int
    nodes: list[ClusterNode] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.nodes = [ClusterNode(self, n) for n in range(1, NODES + 1)]

    @property
    def urls(self) -> list[str]:
        return [node.url for node in self.nodes]

    def node(self, name: str) -> ClusterNode:
        """The node of an Erlang node name."""
        (found,) = [node for node in self.nodes if node.name == name]
        return found

    def _ask(self, *args: str) -> str:
        """The first answer of a node that gives one (a stopped or paused node does not)."""
        errors = []
        for node in self.nodes:
            try:
                return node.ctl(*args)
            except (RuntimeError, subprocess.TimeoutExpired) as exc:
                errors.append(f"node {node.number}: {str(exc).splitlines()[-1]}")
        raise RuntimeError("no node answered: " + "; ".join(errors))

    def queues(self) -> dict[str, dict[str, object]]:
        """Each queue's type, leader, members and online members (`rabbitmqctl list_queues`)."""
        rows = json.loads(
            self._ask("list_queues", "name", "type", "leader", "members", "online", "--formatter", "json")
        )
        return {str(row["name"]): row for row in rows}

    def leader(self, queue: str) -> ClusterNode | None:
        """The node leading a quorum queue, None while it has none."""
        leader = self.queues().get(queue, {}).get("leader")
        return self.node(str(leader)) if leader and leader in {n.name for n in self.nodes} else None

    def wait_online(self, queue: str, timeout: float = 120) -> None:
        """Until every node runs a member of the quorum queue: only then can it lose one."""
        wait_for(
            lambda: len(self.queues().get(queue, {}).get("online") or []) == NODES,
            timeout,
            f"the {NODES} members of quorum queue {queue!r} online",
            interval=1,
        )

    def running(self) -> list[str]:
        """The nodes a majority node sees running (`cluster_status`)."""
        return list(json.loads(self._ask("cluster_status", "--formatter", "json")).get("running_nodes", []))

    def wait_all_running(self, timeout: float = 180) -> None:
        everyone = {node.name for node in self.nodes}
        wait_for(
            lambda: set(self.running()) == everyone, timeout, "all 3 RabbitMQ nodes running in one cluster", interval=1
        )


@contextlib.contextmanager
def rabbitmq_cluster() -> Iterator[RabbitCluster]:
    """A fresh 3-node cluster in a temporary directory, stopped and removed afterwards.

    A start is tried twice, on a new block of ports the second time: the ports were
    free when chosen, but other suites on the machine start services too, and a node
    whose port was taken meanwhile exits at boot."""
    for attempt in (1, 2):
        cluster = RabbitCluster(
            Path(tempfile.mkdtemp(prefix="outbox-relay-rabbitmq-cluster-")), stable_port_block(NODES * PORTS_PER_NODE)
        )
        try:
            _run("cluster-start", str(cluster.directory), str(cluster.port), timeout=900)
        except RuntimeError:
            shutil.rmtree(cluster.directory, ignore_errors=True)
            if attempt == 2:
                raise
            continue
        break
    try:
        yield cluster
    finally:
        with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
            _run("cluster-stop", str(cluster.directory))
        shutil.rmtree(cluster.directory, ignore_errors=True)
