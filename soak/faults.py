"""The fault kinds the soak draws from, and its schedule.

A fault kind is one function registered with `@fault(...)`: it injects the fault
into the running `Soak` and returns how to heal it. Its registration says

- `needs`: the capabilities it acts on (Soak.has): `relays`, `postgres`, `kafka`;
  a kind whose needs the soak lacks is never drawn, so a kind for a service the soak
  does not start yet (a Kafka cluster, a PostgreSQL standby, toxiproxy) can be
  registered before that service is;
- `hold`: how long the fault lasts (seconds, drawn uniformly) before it is healed;
- `heals_in`: about how long its heal takes (a Kafka broker's start: tens of seconds
  on a loaded machine), so that the schedule injects no fault it could not heal
  before the soak's end (the longest heal seen so far counts, if longer);
- `in_flight`: what it may deliver twice, for the checker's bound on duplicates:
  `relay` (one relay's batches in hand), `relays` (every relay's: PostgreSQL went
  away under all of them), `broker` (every relay's calls to the broker, twice: the
  calls in flight when the outage began and the first ones after it).

Adding one is a few lines:

    @fault("kafka_leader_kill", needs={"kafka_cluster"}, hold=(5, 20), heals_in=40, in_flight="broker")
    def kafka_leader_kill(soak: Soak, rng: random.Random) -> Injected:
        broker = soak.extra["kafka_cluster"].leader_of(soak.topic, 0)
        broker.kill()
        return Injected(f"broker {broker.node_id} SIGKILLed", broker.start)
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from soak.environment import Soak

IN_FLIGHT = ("relay", "relays", "broker")


@dataclass
class Injected:
    """A fault in place: what was done, and how to undo it (returns what it did)."""

    detail: str
    heal: Callable[[], object]


@dataclass(frozen=True)
class FaultKind:
    name: str
    needs: frozenset[str]
    hold: tuple[float, float]
    heals_in: float
    in_flight: str
    inject: Callable[[Soak, random.Random], Injected]
    weight: float
    outages: int  # how many times over it has `in_flight` (a rolling restart: once per broker)


REGISTRY: dict[str, FaultKind] = {}


def fault(
    name: str,
    *,
    needs: set[str],
    hold: tuple[float, float],
    heals_in: float,
    in_flight: str,
    weight: float = 1.0,
    outages: int = 1,
) -> Callable[[Callable[[Soak, random.Random], Injected]], Callable[[Soak, random.Random], Injected]]:
    assert in_flight in IN_FLIGHT, in_flight

    def register(inject: Callable[[Soak, random.Random], Injected]) -> Callable[[Soak, random.Random], Injected]:
        REGISTRY[name] = FaultKind(name, frozenset(needs), hold, heals_in, in_flight, inject, weight, outages)
        return inject

    return register


@fault("relay_sigkill", needs={"relays"}, hold=(0, 3), heals_in=1, in_flight="relay", weight=3)
def relay_sigkill(soak: Soak, rng: random.Random) -> Injected:
    """A replica SIGKILLed (no cleanup at all), started again after the hold."""
    name = soak.replicas.pick(rng)
    return Injected(soak.replicas.kill(name), lambda: soak.replicas.start(name))


@fault("relay_sigterm", needs={"relays"}, hold=(0, 5), heals_in=1, in_flight="relay", weight=2)
def relay_sigterm(soak: Soak, rng: random.Random) -> Injected:
    """A replica stopped with SIGTERM (it must exit 0 within its shutdown timeout),
    started again after the hold."""
    name = soak.replicas.pick(rng)
    return Injected(soak.replicas.terminate(name), lambda: soak.replicas.start(name))


@fault("kafka_kill", needs={"kafka"}, hold=(2, 10), heals_in=40, in_flight="broker")
def kafka_kill(soak: Soak, rng: random.Random) -> Injected:
    """The Kafka broker SIGKILLed, started again after the hold."""
    soak.kafka.kill()
    return Injected("Kafka SIGKILLed", soak.kafka.start)


@fault("kafka_stop", needs={"kafka"}, hold=(2, 10), heals_in=40, in_flight="broker")
def kafka_stop(soak: Soak, rng: random.Random) -> Injected:
    """The Kafka broker stopped cleanly (SIGTERM), started again after the hold."""
    soak.kafka.stop()
    return Injected("Kafka stopped", soak.kafka.start)


@fault("rabbitmq_stop", needs={"rabbitmq"}, hold=(2, 10), heals_in=30, in_flight="broker")
def rabbitmq_stop(soak: Soak, rng: random.Random) -> Injected:
    """The RabbitMQ node stopped (rabbitmqctl stop), started again after the hold."""
    node = soak.extra["rabbitmq"]
    node.stop()
    return Injected("RabbitMQ stopped", node.start)


def _rabbitmq_back(soak: Soak, heal: Callable[[], object]) -> Callable[[], str]:
    """A RabbitMQ cluster fault's heal: `heal`, then every node running in one cluster
    and every member of the soak's quorum queue online again."""

    def back() -> str:
        heal()
        cluster = soak.extra["rabbitmq_cluster"]
        cluster.wait_all_running()
        cluster.wait_online(f"{soak.topic}.q")
        return "every node running, every queue member online"

    return back


@fault("rabbitmq_node_stop", needs={"rabbitmq_cluster"}, hold=(2, 10), heals_in=60, in_flight="broker")
def rabbitmq_node_stop(soak: Soak, rng: random.Random) -> Injected:
    """A node of the RabbitMQ cluster stopped (its clients' connections closed: the relay
    connects to another of its urls), started again after the hold."""
    node = rng.choice(soak.extra["rabbitmq_cluster"].nodes)
    node.stop()
    return Injected(f"RabbitMQ node {node.number} stopped", _rabbitmq_back(soak, node.start))


@fault("rabbitmq_leader_kill", needs={"rabbitmq_cluster"}, hold=(2, 10), heals_in=60, in_flight="broker")
def rabbitmq_leader_kill(soak: Soak, rng: random.Random) -> Injected:
    """The leader of the soak's quorum queue SIGKILLed: another member takes over."""
    cluster = soak.extra["rabbitmq_cluster"]
    node = cluster.leader(f"{soak.topic}.q") or rng.choice(cluster.nodes)
    node.kill()
    return Injected(f"RabbitMQ node {node.number}, the queue's leader, SIGKILLed", _rabbitmq_back(soak, node.start))


@fault("rabbitmq_partition", needs={"rabbitmq_cluster"}, hold=(10, 30), heals_in=60, in_flight="broker")
def rabbitmq_partition(soak: Soak, rng: random.Random) -> Injected:
    """A node cut off its peers (pause_minority: it pauses, its clients go elsewhere),
    the partition healed after the hold."""
    node = rng.choice(soak.extra["rabbitmq_cluster"].nodes)
    node.partition()
    return Injected(f"RabbitMQ node {node.number} partitioned away", _rabbitmq_back(soak, node.heal))


def _restore(soak: Soak) -> Callable[[], str]:
    """A cluster fault's heal: every node started again, and the cluster healthy (every
    partition led and fully in sync) before the schedule goes on."""

    def heal() -> str:
        soak.extra["kafka_cluster"].restore()
        return "every broker up, every partition in sync"

    return heal


@fault("kafka_leader_kill", needs={"kafka_cluster"}, hold=(2, 10), heals_in=60, in_flight="broker", weight=2)
def kafka_leader_kill(soak: Soak, rng: random.Random) -> Injected:
    """The leader of one of the topic's partitions SIGKILLed: the relays' producers move
    to the new leader (acks=all, min.insync.replicas 2 still met by the other two)."""
    cluster = soak.extra["kafka_cluster"]
    partition = rng.randrange(3)
    leader = cluster.leader(soak.topic, partition)
    cluster.node(leader).kill()
    return Injected(f"broker {leader}, leader of partition {partition}, SIGKILLed", _restore(soak))


@fault("kafka_two_down", needs={"kafka_cluster"}, hold=(20, 60), heals_in=60, in_flight="broker")
def kafka_two_down(soak: Soak, rng: random.Random) -> Injected:
    """2 of the 3 brokers stopped: the one left answers metadata but acks nothing
    (NotEnoughReplicas under min.insync.replicas 2), the case the half-open circuit is for."""
    cluster = soak.extra["kafka_cluster"]
    down = sorted(rng.sample([1, 2, 3], 2))
    for node in down:
        cluster.node(node).stop()
    return Injected(f"brokers {down[0]} and {down[1]} stopped", _restore(soak))


@fault("kafka_rolling_restart", needs={"kafka_cluster"}, hold=(0, 0), heals_in=180, in_flight="broker", outages=3)
def kafka_rolling_restart(soak: Soak, rng: random.Random) -> Injected:
    """Each broker in turn stopped and started again, the next one only once the cluster
    is healthy: every partition's leader moves at least once."""
    cluster = soak.extra["kafka_cluster"]
    for node in (1, 2, 3):
        cluster.node(node).stop()
        _restore(soak)()
    return Injected("brokers 1, 2, 3 restarted in turn", _restore(soak))


@fault("kafka_controller_kill", needs={"kafka_cluster"}, hold=(2, 10), heals_in=60, in_flight="broker")
def kafka_controller_kill(soak: Soak, rng: random.Random) -> Injected:
    """The active controller (the metadata quorum's leader) SIGKILLed."""
    cluster = soak.extra["kafka_cluster"]
    controller = cluster.controller()
    cluster.node(controller).kill()
    return Injected(f"broker {controller}, the active controller, SIGKILLed", _restore(soak))


def postgres_restart(mode: str) -> Callable[[Soak, random.Random], Injected]:
    def inject(soak: Soak, rng: random.Random) -> Injected:
        soak.postgres.stop(mode)
        return Injected(f"PostgreSQL stopped ({mode})", lambda: soak.postgres.start(soak.pg_settings))

    inject.__doc__ = f"PostgreSQL stopped with pg_ctl -m {mode}, started again after the hold."
    return inject


fault("postgres_fast", needs={"postgres"}, hold=(1, 4), heals_in=5, in_flight="relays")(postgres_restart("fast"))
fault("postgres_immediate", needs={"postgres"}, hold=(1, 4), heals_in=5, in_flight="relays")(
    postgres_restart("immediate")
)


@fault("postgres_failover", needs={"postgres_standby"}, hold=(1, 5), heals_in=10, in_flight="relays")
def postgres_failover(soak: Soak, rng: random.Random) -> Injected:
    """The primary SIGKILLed (every process at once: a crashed host), its synchronous
    standby promoted after the hold; writers and relays follow it through their DSN's
    second host (target_session_attrs=read-write). Once: the new primary has no standby,
    and the PostgreSQL restarts act on it from then on."""
    pair = soak.extra.pop("postgres_standby")
    pair.kill_primary()

    def heal() -> str:
        pair.promote()
        soak.postgres = pair.standby
        return f"standby (port {pair.standby.port}) promoted"

    return Injected(f"primary (port {pair.primary.port}) SIGKILLed", heal)


# Network faults between the relays and one of their services, through toxiproxy
# (tests/support/toxiproxy.py; --toxiproxy): each kind's toxics on the proxy of a
# service drawn at random, removed by its heal. (kind, hold, what, the toxics to add:
# (type, stream, attributes)); `cut` disables the proxy instead (every connection
# dropped, new ones refused).
NETWORK: dict[str, tuple[tuple[float, float], str, list[tuple[str, str, dict[str, Any]]]]] = {
    "net_latency": (
        (10, 30),
        "500 ms +/- 100 ms of latency",
        [("latency", "downstream", {"latency": 500, "jitter": 100})],
    ),
    "net_bandwidth": (
        (10, 30),
        "10 KB/s each way",
        [("bandwidth", s, {"rate": 10}) for s in ("downstream", "upstream")],
    ),
    "net_black_hole": (
        (5, 20),
        "a black hole: bytes dropped, no reset",
        [("timeout", s, {"timeout": 0}) for s in ("downstream", "upstream")],
    ),
    "net_reset_peer": (
        (1, 5),
        "every connection reset (TCP RST) at its first data",
        [("reset_peer", "upstream", {"timeout": 0})],
    ),
    "net_slicer": (
        (10, 30),
        "answers cut into 1-127 byte pieces, 1 ms apart",
        [("slicer", "downstream", {"average_size": 64, "size_variation": 63, "delay": 1000})],
    ),
    "net_cut": ((1, 5), "the proxy disabled: connections dropped, new ones refused", []),
}


def network_fault(name: str) -> Callable[[Soak, random.Random], Injected]:
    hold, what, toxics = NETWORK[name]

    def inject(soak: Soak, rng: random.Random) -> Injected:
        proxies = soak.extra["toxiproxy"]
        service = rng.choice(sorted(proxies))
        proxy = proxies[service]
        if not toxics:
            proxy.disable()
            return Injected(f"{service}: {what}", proxy.enable)
        names = [proxy.add(kind, stream=stream, **attributes) for kind, stream, attributes in toxics]
        return Injected(f"{service}: {what}", lambda: proxy.remove(*names))

    inject.__doc__ = f"Between the relays and a service: {what}, for {hold[0]:g}-{hold[1]:g} s."
    return inject


for _name, (_hold, _, _) in NETWORK.items():
    fault(_name, needs={"toxiproxy"}, hold=_hold, heals_in=5, in_flight="broker")(network_fault(_name))


@dataclass
class Planned:
    """One fault of the schedule: `gap` quiet seconds after the previous one healed,
    then `kind` for `hold` seconds."""

    kind: str
    gap: float
    hold: float


def available(soak: Soak, only: list[str] | None = None) -> list[FaultKind]:
    kinds = [k for k in REGISTRY.values() if k.needs <= soak.capabilities()]
    if only:
        unknown = set(only) - set(REGISTRY)
        if unknown:
            raise ValueError(f"unknown fault kinds: {', '.join(sorted(unknown))} (known: {', '.join(REGISTRY)})")
        kinds = [k for k in kinds if k.name in only]
    return kinds


def plan(kinds: list[FaultKind], seed: int, seconds: float, gap: tuple[float, float]) -> list[Planned]:
    """The schedule, drawn from `seed` alone: faults until their gaps and holds fill
    `seconds` (healing takes time too, so the soak runs the ones that fit)."""
    rng = random.Random(seed)
    schedule: list[Planned] = []
    total = 0.0
    while kinds:
        kind = rng.choices(kinds, [k.weight for k in kinds])[0]
        item = Planned(kind.name, round(rng.uniform(*gap), 1), round(rng.uniform(*kind.hold), 1))
        total += item.gap + item.hold
        if total > seconds:
            break
        schedule.append(item)
    return schedule


@dataclass
class Executed:
    kind: str
    in_flight: str
    t_injected: float  # seconds since the soak began
    wall_injected: float  # time.time(): the broker's append times are on this clock
    hold: float
    committed_before: int  # messages the writers had committed when it began
    outages: int = 1
    detail: str = ""
    t_healed: float | None = None
    healed: str = ""
    error: str = ""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Schedule:
    """Runs a plan against a soak until `deadline` (time.monotonic()); records what
    happened. A failed heal stops the schedule: the services are not what the soak
    assumes any more."""

    soak: Soak
    planned: list[Planned]
    started: float
    deadline: float
    committed: Callable[[], int]
    seed: int
    executed: list[Executed] = field(default_factory=list)
    heal_took: dict[str, float] = field(default_factory=dict)  # the longest heal seen, per kind

    def run(self, stop: Callable[[float], bool], say: Callable[[str], None]) -> None:
        rng = random.Random(self.seed + 1)  # victims: drawn apart from the schedule itself
        for i, item in enumerate(self.planned):
            kind = REGISTRY[item.kind]
            if not kind.needs <= self.soak.capabilities():
                continue  # an earlier fault used up what it needs (the standby, once promoted)
            heal = max(kind.heals_in, self.heal_took.get(kind.name, 0.0))
            if time.monotonic() + item.gap + item.hold + heal > self.deadline:
                continue  # it would outlast the soak: a shorter one later may still fit
            if stop(item.gap):
                return
            record = Executed(
                item.kind,
                kind.in_flight,
                round(time.monotonic() - self.started, 2),
                time.time(),
                item.hold,
                self.committed(),
                kind.outages,
            )
            self.executed.append(record)
            try:
                injected = kind.inject(self.soak, rng)
            except Exception as exc:
                record.error = f"inject: {type(exc).__name__}: {exc}"
                say(f"fault {i + 1} {item.kind}: {record.error}")
                continue
            record.detail = injected.detail
            say(f"fault {i + 1}/{len(self.planned)} {item.kind}: {injected.detail}; healing in {item.hold:.1f} s")
            time.sleep(item.hold)  # the fault lasts this long
            healing = time.monotonic()
            try:
                record.healed = str(injected.heal() or "")
            except Exception as exc:
                record.error = f"heal: {type(exc).__name__}: {exc}"
                say(f"fault {i + 1} {item.kind}: {record.error}; the schedule stops")
                return
            record.t_healed = round(time.monotonic() - self.started, 2)
            self.heal_took[kind.name] = max(self.heal_took.get(kind.name, 0.0), time.monotonic() - healing)
            say(f"fault {i + 1} {item.kind} healed after {record.t_healed - record.t_injected:.1f} s")
