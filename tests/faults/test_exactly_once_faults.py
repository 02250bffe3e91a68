"""Exactly once into Kafka under faults (issue 19, tests): the relay run by the real CLI
from the WAL source with ``exactly_once: true`` on its Kafka broker, writers committing
throughout. A read_committed consumer, read to each partition's end, must see every
committed message exactly once, in each key's commit order, whatever stops where:
the relay SIGKILLed again and again during a large drain, Kafka killed for longer than
every timeout, PostgreSQL restarted fast and immediately, a frozen relay fenced by a
second one on the same slot. A read_uncommitted consumer also sees the records of the
transactions a killed relay left open, aborted by the next one: the advice of
docs/how-to/kafka.md, "Exactly once into Kafka".
"""

from __future__ import annotations

import asyncio
import random
import signal
import time
import uuid
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from prometheus_client.parser import text_string_to_metric_families

from outbox_relay.demo import local_postgres
from tests.consumers import kafka_create_topic, kafka_read_to_end
from tests.faults.harness import (
    OWN_PG_SETTINGS,
    Ledger,
    OpenTransactions,
    Outbox,
    check_exactly_once,
    commit_backlog,
    exactly_once_route,
    http_port,
    outbox_in,
    relay_dsn,
    streaming,
    writers_for,
)
from tests.services import LocalBroker
from tests.support.cli import RelayProcess
from tests.support.configs import PATIENT, write_config
from tests.support.waiting import wait_for
from tests.support.wal import confirmed_flush

TOPIC = "orders.created"  # what the writers and the backlogs enqueue
# The drain killed again and again: 200,000 messages (the figure) drain in about
# 13 s without kills on this 2-core machine, so ten kills with restarts fit in it.
BACKLOG = 200_000
KILLS = 10
CLIENTS = ["aiokafka", "librdkafka"]


def logged(relay: RelayProcess, event: str) -> int:
    return sum(1 for line in relay.logs() if line.get("event") == event)


def events(relay: RelayProcess) -> list[str]:
    return [str(line.get("event")) for line in relay.logs()]


def slot_at(outbox: Outbox) -> int:
    return confirmed_flush(outbox.dsn, outbox.slot or "")


def confirmed_past(outbox: Outbox, position: int, timeout: float, what: str) -> None:
    wait_for(lambda: slot_at(outbox) >= position, timeout, what, interval=0.02)


def circuit_gauge(port: int, broker: str = "kafka") -> float | None:
    """outbox_relay_broker_circuit_open{broker} as the relay's /metrics says it."""
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "outbox_relay_broker_circuit_open" and sample.labels.get("broker") == broker:
                return sample.value
    return None


def console_says_circuit_open(dsn: str, broker: str = "kafka") -> bool:
    """What the relay's last heartbeat row says, the console's view of the broker."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute(
            "SELECT bool_or((brokers -> %s ->> 'circuit_open')::boolean) FROM outbox.relays", (broker,)
        ).fetchone()
    return bool(row and row[0])


def outage_told(relay: RelayProcess, dsn: str, port: int) -> bool:
    """A broker outage told on each channel an operator reads: the log line, the gauge
    the alert fires on, and the heartbeat the console shows."""
    return "broker_circuit_open" in events(relay) and circuit_gauge(port) == 1 and console_says_circuit_open(dsn)


async def until(predicate: Callable[[], object], timeout: float, what: str) -> None:
    """Blocking `wait_for` off the event loop (the Kafka probes run on it)."""
    await asyncio.to_thread(wait_for, predicate, timeout, what)


async def open_transaction(probe: OpenTransactions, timeout: float = 60) -> None:
    """Until a transaction with records is open (polled as fast as Kafka answers: the
    fault that follows should land inside it)."""
    deadline = time.monotonic() + timeout
    while not await probe.any():
        assert time.monotonic() < deadline, f"no transaction with records open within {timeout}s"


def asleep(relay: RelayProcess) -> bool:
    """Whether the relay's process sleeps (its event loop waits on the network)."""
    stat = Path(f"/proc/{relay.proc.pid}/stat").read_text()
    return stat[stat.rindex(")") + 2] == "S"


async def waiting_in_a_transaction(relay: RelayProcess, probe: OpenTransactions, timeout: float = 60) -> None:
    """Until `relay` waits on the network with a transaction open: during a drain, for
    Kafka's answer to records it sent or to its commit (a call under a timeout), not
    busy between two calls (a freeze then ends at its next request, refused)."""
    deadline = time.monotonic() + timeout
    while not (await probe.any() and asleep(relay)):
        assert time.monotonic() < deadline, f"the relay not waiting inside a transaction within {timeout}s"


# About 90 s on a quiet machine; 170-240 s were measured at load average ~20.
@pytest.mark.timeout(480)
@pytest.mark.parametrize("client", CLIENTS)
async def test_sigkilled_again_and_again_during_a_large_drain(
    db: str, kafka_bootstrap: str, tmp_path: Path, client: str
) -> None:
    topic = f"eos-kill-{uuid.uuid4().hex[:8]}"
    await kafka_create_topic(kafka_bootstrap, topic)
    rng = random.Random(19)
    kills: list[bool] = []  # for each kill: whether it was aimed inside an open transaction
    started = time.monotonic()
    with outbox_in(db, "wal") as outbox:
        config = write_config(
            tmp_path / "relay.yaml",
            db,
            **exactly_once_route(kafka_bootstrap, topic, client=client),
            timing=PATIENT,
            **outbox.settings(),
        )
        first = outbox.position()
        backlog = commit_backlog(outbox, TOPIC, BACKLOG)
        end = outbox.position()
        # The kills at random points of the drain: where the slot's confirmed position
        # reaches each (or at the next relay's first confirm, if it starts past one).
        points = sorted(first + int(rng.uniform(0.02, 0.85) * (end - first)) for _ in range(KILLS))
        relay = RelayProcess(config)
        writers = writers_for(outbox, TOPIC).start()
        try:
            async with OpenTransactions(kafka_bootstrap, topic) as open_transactions:
                for i, point in enumerate(points):
                    await asyncio.to_thread(outbox.wait_streaming)
                    await until(lambda p=point: slot_at(outbox) >= p, 60, "the drain at the next kill's point")
                    # Every other kill aimed inside a transaction that has written records
                    # (one always lies ahead during the drain): what it wrote is aborted
                    # by the next relay's start, and only read_uncommitted shows it.
                    aimed = i % 2 == 1
                    if aimed:
                        await open_transaction(open_transactions)
                    relay.kill()  # SIGKILL: no abort, no confirm, nothing
                    assert slot_at(outbox) < end, f"kill {i + 1} came after the drain: make the backlog larger"
                    kills.append(aimed)
                    relay = RelayProcess(config)
            ledger = writers.stop()
            await asyncio.to_thread(outbox.wait_dispatched, 120)
            assert relay.terminate() == 0
        finally:
            writers.stop()
            relay.close()
        parked = outbox.parked()
    took = time.monotonic() - started
    ledger.committed.update(backlog)
    committed = await kafka_read_to_end(kafka_bootstrap, topic, isolation_level="read_committed")
    check_exactly_once(committed, ledger, uncertain=writers.uncertain)
    assert parked == 0, "a SIGKILL parks nothing"
    # read_uncommitted: the same messages, and the copies the killed relays' open
    # transactions wrote before the next relay aborted them.
    everything = await kafka_read_to_end(kafka_bootstrap, topic, isolation_level="read_uncommitted")
    copies = Counter(r.message_id for r in everything)
    aborted = len(everything) - len(committed)
    assert set(copies) == {r.message_id for r in committed}, "read_uncommitted: the same messages, no others"
    assert aborted > 0, "read_uncommitted shows the aborted records read_committed hides"
    print(
        f"client={client} kills={len(kills)} (aimed {sum(kills)}) backlog={BACKLOG} committed={len(ledger.committed)} "
        f"read_committed={len(committed)} duplicates=0 read_uncommitted={len(everything)} "
        f"aborted_copies={aborted} messages_seen_twice_uncommitted={sum(1 for c in copies.values() if c > 1)} "
        f"took={took:.1f}s"
    )


@pytest.mark.timeout(240)
@pytest.mark.parametrize("client", CLIENTS)
async def test_kafka_killed_for_longer_than_every_timeout(
    db: str, own_kafka: LocalBroker, tmp_path: Path, client: str
) -> None:
    bootstrap = f"127.0.0.1:{own_kafka.port}"
    topic = f"eos-outage-{uuid.uuid4().hex[:8]}"
    await kafka_create_topic(bootstrap, topic)
    down_for = 8.0  # beyond publish_timeout, request_timeout and park_after below
    with outbox_in(db, "wal") as outbox:
        config = write_config(
            tmp_path / "relay.yaml",
            db,
            **exactly_once_route(bootstrap, topic, client=client, request_timeout="3s"),
            timing=PATIENT,
            publish_timeout="2s",
            max_attempts=2,  # were an outage to spend attempts, messages would be dead-lettered
            # At least once parks what waits into the table after park_after; exactly
            # once never parks for an outage, however long: the stream pauses.
            **outbox.settings(park_after="1s"),
        )
        relay = RelayProcess(config)
        port = http_port(relay)
        writers = writers_for(outbox, TOPIC).start()
        try:
            await asyncio.to_thread(outbox.wait_streaming)
            own_kafka.kill()  # SIGKILL: what the relay has in flight gets no answer
            killed = time.monotonic()
            await until(lambda: slot_at(outbox) < outbox.position(), 30, "messages waiting for Kafka")
            # The outage lasts at least this long, and until the relay told it everywhere
            # (on a loaded machine that can take longer than down_for). Wherever the kill
            # lands, a publish or a commit or between them, the broker's circuit opens.
            await asyncio.sleep(max(0.0, down_for - (time.monotonic() - killed)))
            await until(lambda: outage_told(relay, db, port), 60, "the outage told on every channel")
            seen = set(events(relay))
            own_kafka.start()
            back = outbox.position()
            await until(lambda: slot_at(outbox) >= back, 120, "everything committed during the outage published")
            await until(lambda: circuit_gauge(port) == 0, 30, "the circuit closed after the outage")
            ledger = writers.stop()
            await asyncio.to_thread(outbox.wait_dispatched, 120)
            assert relay.terminate() == 0
        finally:
            writers.stop()
            relay.close()
        parked = outbox.parked()
    with psycopg.connect(db) as conn:
        dead = conn.execute("SELECT count(*) FROM outbox.messages WHERE dead_lettered_at IS NOT NULL").fetchone()
    assert "broker_circuit_open" in seen, "the relay saw the outage"
    assert parked == 0, "exactly once parks nothing for an outage: the outbox table stays empty"
    assert dead == (0,)
    assert logged(relay, "wal_messages_parked") == 0
    # The records failed when the producer was dropped are the relay's business, not an
    # error line each from asyncio at shutdown (kafka_aiokafka._fail_buffered).
    unread = [e for e in events(relay) if "exception was never retrieved" in e]
    assert unread == [], unread[:3]
    committed = await kafka_read_to_end(bootstrap, topic, isolation_level="read_committed")
    check_exactly_once(committed, ledger, uncertain=writers.uncertain)
    print(
        f"client={client} outage={down_for}s committed={len(ledger.committed)} read_committed={len(committed)} parked=0"
    )


@pytest.mark.timeout(240)
@pytest.mark.parametrize("client", CLIENTS)
async def test_kafka_away_when_the_exactly_once_producer_starts_is_told_then_drained(
    db: str, own_kafka: LocalBroker, tmp_path: Path, client: str
) -> None:
    """The outage found where no publish times out: the transactional producer cannot
    start (here at the relay's start; in a run, after a commit or a begin that failed).
    Before the circuit was opened there too, the relay only logged its retries: no
    gauge, no alert, the console showing Kafka connected for as long as it lasted."""
    bootstrap = f"127.0.0.1:{own_kafka.port}"
    topic = f"eos-away-{uuid.uuid4().hex[:8]}"
    await kafka_create_topic(bootstrap, topic)
    with outbox_in(db, "wal") as outbox:
        config = write_config(
            tmp_path / "relay.yaml",
            db,
            **exactly_once_route(bootstrap, topic, client=client, request_timeout="3s"),
            timing=PATIENT,
            publish_timeout="2s",
            **outbox.settings(),
        )
        own_kafka.kill()
        try:
            backlog = commit_backlog(outbox, TOPIC, 1_000)
            relay = RelayProcess(config)
            port = http_port(relay)
            await until(lambda: "wal_exactly_once_producer_unavailable" in events(relay), 60, "the producer refused")
            await until(lambda: outage_told(relay, db, port), 60, "the outage told on every channel")
            assert slot_at(outbox) < outbox.position(), "nothing confirmed while Kafka is away"
        finally:
            own_kafka.start()
        try:
            await asyncio.to_thread(outbox.wait_dispatched, 120)
            await until(lambda: circuit_gauge(port) == 0, 30, "the circuit closed once the producer started")
            assert relay.terminate() == 0
        finally:
            relay.close()
        parked = outbox.parked()
    assert parked == 0
    assert "broker_circuit_closed" in events(relay)
    committed = await kafka_read_to_end(bootstrap, topic, isolation_level="read_committed")
    check_exactly_once(committed, Ledger(committed=backlog))


@pytest.mark.timeout(240)
@pytest.mark.parametrize("client", CLIENTS)
async def test_postgres_restarted_fast_and_immediate_mid_stream(
    own_pg: local_postgres.LocalPostgres, kafka_bootstrap: str, tmp_path: Path, client: str
) -> None:
    dsn = own_pg.dsn
    topic = f"eos-pg-{uuid.uuid4().hex[:8]}"
    await kafka_create_topic(kafka_bootstrap, topic)
    backlog: dict[str, tuple[str, int]] = {}
    went_back: list[int] = []  # bytes of WAL the slot's confirmed position lost at each restart
    with outbox_in(dsn, "wal") as outbox:
        config = write_config(
            tmp_path / "relay.yaml",
            dsn,
            **exactly_once_route(kafka_bootstrap, topic, client=client),
            timing=PATIENT,
            **outbox.settings(),
        )
        relay = RelayProcess(config)
        writers = writers_for(outbox, TOPIC).start()
        try:
            for i, mode in enumerate(("fast", "immediate")):
                await asyncio.to_thread(outbox.wait_streaming)
                # Mid-stream: a backlog the relay is draining, in transactions, when the
                # server goes down; what it had committed to Kafka and not yet confirmed
                # (and, before PostgreSQL 17, more: the slot's position on disk is older)
                # comes again from the slot, and Kafka's position skips it.
                start = outbox.position()
                backlog.update(commit_backlog(outbox, TOPIC, 20_000, start=i * 20_000, seed=i))
                await until(lambda s=start: slot_at(outbox) > s, 60, "the backlog's drain under way")
                before = slot_at(outbox)
                streamed = logged(relay, "wal_relay_started")
                own_pg.stop(mode)
                await asyncio.sleep(1)  # the outage lasts this long
                own_pg.start(OWN_PG_SETTINGS)
                went_back.append(before - slot_at(outbox))
                await until(lambda n=streamed: logged(relay, "wal_relay_started") > n, 60, f"streaming after {mode}")
            ledger = writers.stop()
            await asyncio.to_thread(outbox.wait_dispatched, 120)
            assert relay.terminate() == 0
        finally:
            writers.stop()
            relay.close()
        parked = outbox.parked()
    ledger.committed.update(backlog)
    committed = await kafka_read_to_end(kafka_bootstrap, topic, isolation_level="read_committed")
    check_exactly_once(committed, ledger, uncertain=writers.uncertain)
    assert parked == 0, "a database restart parks nothing"
    print(
        f"client={client} committed={len(ledger.committed)} read_committed={len(committed)} duplicates=0 "
        f"slot went back by {went_back} bytes at the restarts"
    )


# The first relay frozen (SIGSTOP) while it waits inside a transaction, and thawed once
# the second one took the slot and registered the transactional id: `briefly` (within
# its timeouts: the broker refuses its next request, it is fenced), or past its
# publish_timeout and request_timeout (its calls time out when it is thawed and it
# registers the id again, fencing the second relay in turn, then finds that relay's
# position past its own: superseded). Seconds frozen after the takeover, and what the
# thawed relay must say.
FROZEN = {"briefly": (0.0, "wal_producer_fenced"), "past_its_timeouts": (5.0, "wal_producer_superseded")}
REPLACED = ("wal_producer_fenced", "wal_producer_superseded")
THAWED = (*REPLACED, "wal_relay_restarting")  # or its stream gone: it had nothing in flight


@pytest.mark.timeout(240)
@pytest.mark.parametrize("frozen", list(FROZEN))
@pytest.mark.parametrize("client", CLIENTS)
async def test_a_second_relay_on_the_slot_fences_a_frozen_one(
    db: str, kafka_bootstrap: str, tmp_path: Path, client: str, frozen: str
) -> None:
    longer, expected = FROZEN[frozen]
    topic = f"eos-fence-{uuid.uuid4().hex[:8]}"
    await kafka_create_topic(kafka_bootstrap, topic)
    names = ("eos-a", "eos-b")
    backlog: dict[str, tuple[str, int]] = {}
    victim, other, lines = "", "", []
    # Past its timeouts: short ones, so that the freeze stays short.
    request_timeout: dict[str, Any] = {"request_timeout": "3s"} if longer else {}
    publish_timeout: dict[str, Any] = {"publish_timeout": "2s"} if longer else {}
    with outbox_in(db, "wal") as outbox:
        configs = {
            name: write_config(
                tmp_path / f"{name}.yaml",
                relay_dsn(db, name),  # the walsender of each relay's stream shows its name
                **exactly_once_route(kafka_bootstrap, topic, client=client, **request_timeout),
                timing=PATIENT,
                **publish_timeout,
                **outbox.settings(),
            )
            for name in names
        }
        relays = {name: RelayProcess(config) for name, config in configs.items()}
        writers = writers_for(outbox, TOPIC).start()
        try:
            async with OpenTransactions(kafka_bootstrap, topic) as open_transactions:
                # A thawed relay that had nothing in flight (its freeze fell between two
                # calls) finds its stream gone and stands by: no fence to see, so the
                # relay streaming then is frozen again.
                for tries in range(1, 5):
                    await until(lambda: streaming(outbox) in relays, 30, "one relay streams")
                    victim = streaming(outbox) or ""
                    other = next(name for name in names if name != victim)
                    await asyncio.to_thread(outbox.wait_streaming)
                    # A backlog keeps the victim inside transactions; frozen in one, it
                    # keeps the slot (its walsender) and its producer.
                    start = outbox.position()
                    backlog.update(commit_backlog(outbox, TOPIC, 20_000, start=tries * 20_000, seed=tries))
                    await until(lambda s=start: slot_at(outbox) > s, 60, "the backlog's drain under way")
                    await waiting_in_a_transaction(relays[victim], open_transactions)
                    relays[victim].proc.send_signal(signal.SIGSTOP)
                    registered = logged(relays[other], "wal_exactly_once_started")
                    with psycopg.connect(db, autocommit=True) as conn:
                        conn.execute(
                            "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots WHERE slot_name = %s",
                            (outbox.slot,),
                        )
                    # The other relay takes the slot and registers the same transactional
                    # id, which fences the frozen one's producer (and aborts its transaction).
                    await until(lambda o=other: streaming(outbox) == o, 30, f"{other} takes the slot")
                    await until(
                        lambda o=other, n=registered: logged(relays[o], "wal_exactly_once_started") > n,
                        30,
                        f"{other} registered the transactional id",
                    )
                    took_over = slot_at(outbox)
                    await until(lambda p=took_over: slot_at(outbox) > p, 30, f"{other} publishing")
                    await asyncio.sleep(longer)  # frozen this much longer
                    noticed = Counter(events(relays[victim]))
                    relays[victim].proc.send_signal(signal.SIGCONT)
                    await until(
                        lambda v=victim, n=noticed: any(logged(relays[v], e) > n[e] for e in THAWED),
                        30,
                        f"{victim} thawed noticed",
                    )
                    if logged(relays[victim], expected) > noticed[expected]:
                        break
                else:
                    raise AssertionError(f"no frozen relay logged {expected} in {tries} freezes")
            await asyncio.to_thread(outbox.wait_streaming)  # one of them goes on
            ledger = writers.stop()
            await asyncio.to_thread(outbox.wait_dispatched, 120)
            lines = events(relays[victim])  # before the stops: a standby may stream during them
            fenced_other = logged(relays[other], "wal_producer_fenced")
            for relay in relays.values():
                assert relay.terminate() == 0
        finally:
            writers.stop()
            for relay in relays.values():
                relay.close()
        parked = outbox.parked()
    ledger.committed.update(backlog)
    committed = await kafka_read_to_end(kafka_bootstrap, topic, isolation_level="read_committed")
    check_exactly_once(committed, ledger, uncertain=writers.uncertain)
    assert parked == 0
    after = lines[lines.index(expected) :]
    assert sum(after.count(e) for e in REPLACED) == 1, f"replaced: one line ({after})"
    if longer:
        # Its new producer fenced the relay that had taken over, which stood by; one of
        # the two streamed the slot again from Kafka's position.
        assert fenced_other >= 1, f"{other} fenced by the thawed relay's new producer"
    else:
        assert "wal_exactly_once_started" not in after, "a fenced relay publishes nothing more (the other streams)"
    print(
        f"client={client} frozen={frozen} {victim} said {expected} after {tries} freeze(s); "
        f"committed={len(ledger.committed)} read_committed={len(committed)} duplicates=0"
    )
