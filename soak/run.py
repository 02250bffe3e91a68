"""One soak, from the services' start to the verdict."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from soak import checker, faults, report
from soak.environment import (
    BATCH,
    QUORUM,
    RABBITMQ_TOPIC,
    RETENTION,
    WORKERS,
    WRITERS_TOPIC,
    Replicas,
    Soak,
    relay_configs,
    started_services,
)
from soak.sampling import Sampler
from soak.writers import LARGE_BYTES, LARGE_ONE_IN, SHAPES, MixedWriters
from tests.consumers import RabbitQueue
from tests.faults.harness import Audit, audit, outbox_in
from tests.support.outbox import count

DRAIN_TIMEOUT_S = 180.0


@dataclass(frozen=True)
class Options:
    minutes: float
    seed: int
    out: Path
    rate: float = 100.0
    source: str = "table"
    kafka: str = "single"  # or "cluster": 3 brokers, topics with 3 replicas and min.insync.replicas 2
    rabbitmq: str | None = None  # "single" or "cluster": a quarter of the messages through RabbitMQ too
    toxiproxy: bool = False  # the relays reach their services through toxiproxy
    postgres: str = "single"  # or "failover": a primary and its synchronous standby
    replicas: int = 3
    only: list[str] | None = None
    gap: tuple[float, float] = (5.0, 15.0)
    sample_every: float = 2.0


def say(message: str) -> None:
    print(f"[soak] {datetime.now(UTC):%H:%M:%S} {message}", flush=True)


def run(options: Options) -> dict[str, Any]:
    """Run the soak; return its summary (summary["failures"] empty when it passed)."""
    begun = time.monotonic()
    options.out.mkdir(parents=True, exist_ok=True)
    say(f"seed {options.seed}, {options.minutes:g} min, source {options.source}, out {options.out}")
    with started_services(
        options.postgres, kafka=options.kafka, rabbitmq=options.rabbitmq, toxiproxy=options.toxiproxy
    ) as started:
        bootstrap = started.bootstrap
        topic = f"soak-{uuid.uuid4().hex[:8]}"
        started.create_topic(topic)
        say(f"services up after {time.monotonic() - begun:.0f} s: PostgreSQL {started.dsn}, Kafka {bootstrap}")
        with outbox_in(started.dsn, options.source) as outbox:
            if started.amqp:  # the queue declared before anyone publishes
                RabbitQueue(started.amqp[0], topic, f"{topic}.q", arguments=QUORUM).close()
            configs = relay_configs(options.out, outbox, started, topic, options.replicas)
            replicas = Replicas(configs)
            soak = Soak(
                options.out,
                options.source,
                outbox,
                started.postgres,
                started.kafka,
                bootstrap,
                topic,
                replicas,
                started.pg_settings,
                started.amqp,
                started.extra,
            )
            try:
                return _soak(soak, options, begun)
            finally:
                replicas.close()


def _soak(soak: Soak, options: Options, begun: float) -> dict[str, Any]:
    seconds = options.minutes * 60
    kinds = faults.available(soak, options.only)
    planned = faults.plan(kinds, options.seed, seconds, options.gap)
    say(f"fault kinds: {', '.join(k.name for k in kinds)}")
    say("schedule: " + "; ".join(f"+{p.gap:g}s {p.kind} for {p.hold:g}s" for p in planned))
    rabbitmq = RABBITMQ_TOPIC if soak.amqp else None
    writers = MixedWriters(
        soak.outbox.dsn, WRITERS_TOPIC, rate=options.rate, seed=options.seed, rabbitmq_topic=rabbitmq
    )
    soak.replicas.start_all()
    started, wall_start = time.monotonic(), time.time()
    sampler = Sampler(
        soak.outbox.dsn, soak.replicas, lambda: len(writers.ledger.committed), started, options.sample_every
    )
    writers.start()
    sampler.start()
    schedule = faults.Schedule(
        soak, planned, started, started + seconds, lambda: len(writers.ledger.committed), options.seed
    )
    writer_error = ""
    try:
        schedule.run(lambda gap: _sleep_until(min(time.monotonic() + gap, started + seconds)), say)
        _sleep_until(started + seconds)
        soak.replicas.restart_the_dead(time.monotonic() - started)
        for name, relay in soak.replicas.running.items():
            if relay is None:
                soak.replicas.start(name)  # the last fault's victim, if its heal failed
    finally:
        writers_s = time.monotonic() - started
        try:
            writers.stop()
        except AssertionError as exc:
            writer_error = str(exc)
    ledger = writers.ledger
    say(f"writers stopped: {len(ledger.committed)} committed, {len(ledger.rolled_back)} rolled back; draining")
    drain_began = time.monotonic()
    try:
        soak.outbox.wait_dispatched(DRAIN_TIMEOUT_S)
        drained = True
    except AssertionError:
        drained = False
    drain_s = time.monotonic() - drain_began
    samples = sampler.stop()
    samples.append(sampler.take())
    soak.replicas.terminate_all()
    dead_lettered = count(soak.outbox.dsn, "dead_lettered_at IS NOT NULL")
    say(f"drained in {drain_s:.0f} s; reading {soak.topic} back")
    queue = None
    if soak.amqp:
        queue = RabbitQueue(soak.amqp[0], soak.topic, f"{soak.topic}.q", arguments=QUORUM)
    try:
        found = checker.read_back(soak.bootstrap, soak.topic, 120 + len(ledger.committed) / 1000, queue)
    finally:
        if queue is not None:
            queue.close()
    first = found.first_appended()
    result = audit(found.every(), ledger, uncertain=writers.uncertain)
    bound = checker.duplicate_bound(options.source, schedule.executed, first, options.replicas)
    rss = checker.rss_check(samples)
    failed = checker.failures(
        result,
        bound,
        rss,
        executed=schedule.executed,
        sigterm_exits=soak.replicas.sigterm_exits,
        unexpected_exits=soak.replicas.unexpected_exits,
        drained=drained,
        dead_lettered=dead_lettered,
    )
    if writer_error:
        failed.append(f"a writer failed: {writer_error}")
    delivered = report.throughput(first, wall_start, seconds)
    summary = _summary(options, soak, planned, schedule.executed, result, bound, rss, samples, delivered)
    summary["throughput"]["mean_committed_per_s"] = round(result.committed / writers_s, 1)
    summary.update(
        writers_seconds=round(writers_s, 1),
        failures=failed,
        ok=not failed,
        drained=drained,
        drain_seconds=round(drain_s, 1),
        dead_lettered=dead_lettered,
        uncertain_commits=len(writers.uncertain),
        wall_seconds=round(time.monotonic() - begun, 1),
    )
    report.write_json(options.out / "summary.json", summary)
    title = (
        f"soak {options.minutes:g} min, seed {options.seed}, {options.source} source, {options.replicas} relays: "
        f"{len(schedule.executed)} faults, {result.committed} committed, lost {len(result.lost)}, "
        f"phantom {len(result.phantom)}, order violations {result.order_violations}, duplicates {result.duplicates}"
    )
    report.plot(options.out / "soak.png", samples, delivered, schedule.executed, title)
    return summary


def _sleep_until(moment: float) -> bool:
    """Sleep until `moment` (time.monotonic()); False: the schedule goes on."""
    time.sleep(max(0.0, moment - time.monotonic()))
    return False


def _summary(
    options: Options,
    soak: Soak,
    planned: list[faults.Planned],
    executed: list[faults.Executed],
    result: Audit,
    bound: int,
    rss: dict[str, Any],
    samples: list[Any],
    delivered: list[tuple[float, float]],
) -> dict[str, Any]:
    healed = [f for f in executed if f.t_healed is not None and not f.error]
    known = [s for s in samples if s.pending is not None]
    return {
        "seed": options.seed,
        "minutes": options.minutes,
        "source": options.source,
        "replicas": options.replicas,
        "postgres": options.postgres,
        "kafka": options.kafka,
        "rabbitmq": options.rabbitmq,
        "toxiproxy": sorted(soak.extra.get("toxiproxy", {})),
        "relay": {"batch_size": BATCH, "workers": WORKERS, "retention": RETENTION, "postgres": soak.pg_settings},
        "writers": {
            "rate_target": options.rate,
            "key_shapes": SHAPES,
            "large_payload": {"bytes": LARGE_BYTES, "one_in": LARGE_ONE_IN},
            "rolled_back_one_in": 7,
        },
        "checker": {**result.summary(), "duplicates_bound": bound},
        "faults": {
            "kinds": sorted({k.name for k in faults.available(soak, options.only)}),
            "planned": [p.__dict__ for p in planned],
            "executed": [f.as_dict() for f in executed],
            "injected": len(executed),
            "healed": len(healed),
            "by_kind": {k: sum(1 for f in executed if f.kind == k) for k in sorted({f.kind for f in executed})},
        },
        "rss": rss,
        "lag": {
            "max_pending": max((s.pending or 0 for s in known), default=0),
            "max_oldest_pending_s": round(max((s.oldest_pending_s or 0 for s in known), default=0), 1),
        },
        "table": {
            "max_rows": max((s.rows or 0 for s in known), default=0),
            "max_dead_tuples": max((s.dead_tuples or 0 for s in known), default=0),
        },
        "throughput": {
            "window_s": report.BUCKET_S,
        },
        "relays": {
            "sigterm_exits": soak.replicas.sigterm_exits,
            "unexpected_exits": soak.replicas.unexpected_exits,
            "logs": sorted(str(r.log_path) for _, r in soak.replicas.every),
        },
        "series": {"samples": [s.as_dict() for s in samples], "delivered_per_s": delivered},
    }
