"""`exactly_once` through the public contract: the CLI refuses what cannot work, in one
line, before anything is published (issue 19, points 1 and 5)."""

from __future__ import annotations

from pathlib import Path

import psycopg

from outbox_relay import enqueue
from tests.support.cli import run_cli
from tests.support.configs import write_config
from tests.support.outbox import pending


def _kafka(bootstrap: str, **options: object) -> dict[str, object]:
    return {"type": "kafka", "bootstrap_servers": bootstrap, "exactly_once": True, **options}


def test_exactly_once_on_two_brokers_is_refused_in_one_line(db: str, kafka_bootstrap: str, tmp_path: Path) -> None:
    brokers = {"a": _kafka(kafka_bootstrap), "b": _kafka(kafka_bootstrap)}
    routes = [{"topic": "a.*", "broker": "a"}, {"topic": "b.*", "broker": "b"}]
    config = write_config(tmp_path / "relay.yaml", db, brokers=brokers, routes=routes)
    for command in ("check", "run"):
        result = run_cli(command, "--config", str(config), timeout=60)
        assert result.returncode == 2, result.stdout + result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1, result.stderr
        assert "brokers.b.exactly_once" in lines[0] and "exactly_once is set on 2 brokers (a, b)" in lines[0]


def test_exactly_once_with_a_retention_under_an_hour_is_refused_in_one_line(
    db: str, kafka_bootstrap: str, tmp_path: Path
) -> None:
    """A takeover reads which messages were parked (kept in the table) so as not to send
    them again: retention must not delete them first. An hour passes the check."""
    brokers = {"events": _kafka(kafka_bootstrap)}
    routes = [{"topic": "*", "broker": "events"}]
    for retention, seconds in (("0s", "0s"), ("59m", "3540s")):
        config = write_config(tmp_path / "relay.yaml", db, brokers=brokers, routes=routes, retention=retention)
        for command in ("check", "run"):
            result = run_cli(command, "--config", str(config), timeout=60)
            assert result.returncode == 2, result.stdout + result.stderr
            lines = result.stderr.strip().splitlines()
            assert len(lines) == 1, result.stderr
            assert "relay.retention" in lines[0], lines[0]
            assert f"must be at least 1h with brokers.events.exactly_once (got {seconds})" in lines[0], lines[0]
    config = write_config(tmp_path / "relay.yaml", db, brokers=brokers, routes=routes, retention="1h")
    checked = run_cli("check", "--config", str(config), timeout=60)
    # Past the configuration: the check goes on to the outbox, in table mode here.
    assert "exactly   FAIL  brokers.events.exactly_once needs the WAL source" in checked.stdout, checked.stdout
    assert "relay.retention" not in checked.stdout + checked.stderr


def test_an_offsets_topic_kafka_would_refuse_is_named(db: str, kafka_bootstrap: str, tmp_path: Path) -> None:
    brokers = {"events": _kafka(kafka_bootstrap, offsets_topic="bad topic!")}
    config = write_config(tmp_path / "relay.yaml", db, brokers=brokers, routes=[{"topic": "*", "broker": "events"}])
    result = run_cli("check", "--config", str(config))
    assert result.returncode == 2, result.stdout + result.stderr
    assert "brokers.events.offsets_topic" in result.stderr and "' '" in result.stderr, result.stderr


def test_exactly_once_with_the_table_source_stops_run_in_one_line_naming_the_switch(
    db: str, kafka_bootstrap: str, tmp_path: Path
) -> None:
    """The outbox of `db` is in table mode (the default): `run` refuses at start with one
    line that says why and what to do, and publishes nothing (a pending row stays)."""
    with psycopg.connect(db) as conn:
        enqueue(conn, "orders.created", {"n": 1}, key="k")
    brokers = {"events": _kafka(kafka_bootstrap)}
    config = write_config(tmp_path / "relay.yaml", db, brokers=brokers, routes=[{"topic": "*", "broker": "events"}])
    checked = run_cli("check", "--config", str(config), timeout=60)
    assert checked.returncode == 1, checked.stdout + checked.stderr
    assert "exactly   FAIL  brokers.events.exactly_once needs the WAL source" in checked.stdout, checked.stdout
    result = run_cli("run", "--config", str(config), timeout=60)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "brokers.events.exactly_once needs the WAL source" in result.stderr, result.stderr
    assert "outbox-relay schema source wal" in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: brokers.events.exactly_once needs")
    assert "relay_started" not in result.stderr, "refused before any source ran"
    assert pending(db) == 1


def test_check_passes_exactly_once_in_wal_mode(db: str, kafka_bootstrap: str, tmp_path: Path) -> None:
    from tests.support.wal import outbox_in_wal_mode

    with outbox_in_wal_mode(db) as slot_name:
        brokers = {"events": _kafka(kafka_bootstrap)}
        config = write_config(
            tmp_path / "relay.yaml",
            db,
            brokers=brokers,
            routes=[{"topic": "*", "broker": "events", "destination": "orders"}],
            wal={"slot": slot_name},
        )
        checked = run_cli("check", "--config", str(config), timeout=60)
    assert "exactly   ok  events: transactions from the WAL source" in checked.stdout, checked.stdout
    assert "FAIL" not in checked.stdout, checked.stdout
