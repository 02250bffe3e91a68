"""`outbox-relay check` against the real database and brokers: it names a route whose
destinations the broker would refuse (issue 17, item 9), and a mistyped schema's
installed neighbour (item 10)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any

import psycopg
import pytest

from outbox_relay.operations import schema_manager
from tests.support.cli import run_cli
from tests.support.configs import write_config


def _route_failures(checked: subprocess.CompletedProcess[str]) -> dict[int, str]:
    """The `route FAIL` lines of a check, by route index."""
    found = {}
    for line in checked.stdout.splitlines():
        match = re.match(r"route +FAIL +routes\[(\d+)\] ", line)
        if match:
            found[int(match.group(1))] = line
    return found


@pytest.mark.parametrize("client", ["aiokafka", "librdkafka"])
def test_check_names_each_route_whose_topics_kafka_would_refuse(
    db: str, kafka_bootstrap: str, tmp_path: Path, client: str
) -> None:
    routes: list[dict[str, Any]] = [
        {"topic": "orders.*", "broker": "events"},
        {"topic": "ux.*", "broker": "events", "destination": "ux bad topic!"},
        {"topic": "tenant:*", "broker": "events"},  # each message's topic, which has a ':'
        {"topic": "files/*", "broker": "events"},
        {"topic": "audit:*", "broker": "events", "destination": "audit"},  # fine: named
        {"topic": "*", "broker": "events"},  # any topic: nothing to say beforehand
    ]
    brokers = {"events": {"type": "kafka", "bootstrap_servers": kafka_bootstrap, "client": client}}
    config = write_config(tmp_path / "relay.yaml", db, brokers=brokers, routes=routes)
    checked = run_cli("check", "--config", str(config))
    assert checked.returncode == 1, checked.stdout + checked.stderr
    failed = _route_failures(checked)
    assert sorted(failed) == [1, 2, 3], checked.stdout
    assert "'ux.*'" in failed[1] and "events (kafka)" in failed[1] and "'ux bad topic!'" in failed[1]
    assert "' '" in failed[1] and "'!'" in failed[1], "says which characters Kafka refuses"
    assert "'tenant:*'" in failed[2] and "':'" in failed[2] and "destination" in failed[2]
    assert "'files/*'" in failed[3] and "'/'" in failed[3]
    assert "database  ok" in checked.stdout and "broker    ok  events (kafka)" in checked.stdout

    fine = write_config(tmp_path / "fine.yaml", db, brokers=brokers, routes=[routes[0], routes[4], routes[5]])
    passed = run_cli("check", "--config", str(fine))
    assert passed.returncode == 0, passed.stdout + passed.stderr
    assert "FAIL" not in passed.stdout
    # librdkafka's configuration warnings are about the adapter's own settings: debug.
    assert "CONFWARN" not in checked.stdout + checked.stderr + passed.stdout + passed.stderr


def test_check_names_a_route_whose_rabbitmq_exchange_name_is_too_long(db: str, amqp_url: str, tmp_path: Path) -> None:
    routes = [
        {"topic": "mail.*", "broker": "mail", "destination": "x" * 256},
        {"topic": "*", "broker": "mail"},  # the exchange option; the topic is the routing key
    ]
    brokers = {"mail": {"type": "rabbitmq", "url": amqp_url, "exchange": "outbox.check"}}
    config = write_config(tmp_path / "relay.yaml", db, brokers=brokers, routes=routes)
    checked = run_cli("check", "--config", str(config))
    assert checked.returncode == 1, checked.stdout + checked.stderr
    failed = _route_failures(checked)
    assert sorted(failed) == [0], checked.stdout
    assert "mail (rabbitmq)" in failed[0] and "255 bytes" in failed[0]
    assert "broker    ok  mail (rabbitmq)" in checked.stdout


def test_an_adapter_without_naming_rules_is_not_checked(db: str, tmp_path: Path) -> None:
    routes = [{"topic": "a:*", "broker": "sink", "destination": "ux bad topic!"}]
    config = write_config(tmp_path / "relay.yaml", db, sink=tmp_path / "out.jsonl", routes=routes)
    checked = run_cli("check", "--config", str(config))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "FAIL" not in checked.stdout


def test_a_mistyped_schema_is_answered_with_the_installed_one(db: str, tmp_path: Path) -> None:
    config = write_config(tmp_path / "relay.yaml", db, schema="outbx")
    checked = run_cli("check", "--config", str(config))
    assert checked.returncode == 1, checked.stdout + checked.stderr
    line = next(line for line in checked.stdout.splitlines() if line.startswith("database"))
    assert "FAIL" in line and "did you mean 'outbox'?" in line, line
    assert "schema install" not in line, "a typo is not a reason to install a second outbox"
    status = run_cli("status", "--config", str(config))
    assert status.returncode == 1 and status.stderr.count("\n") == 1, status.stderr
    assert "did you mean 'outbox'?" in status.stderr


def test_a_schema_unlike_any_installed_one_lists_them_and_says_how_to_install(db: str, tmp_path: Path) -> None:
    with psycopg.connect(db) as conn:
        schema_manager.install(conn, "billing_events")
    config = write_config(tmp_path / "relay.yaml", db, schema="zz")
    checked = run_cli("check", "--config", str(config))
    assert checked.returncode == 1, checked.stdout + checked.stderr
    line = next(line for line in checked.stdout.splitlines() if line.startswith("database"))
    assert "did you mean" not in line and "billing_events, outbox" in line, line
    assert "run `outbox-relay schema install --schema zz`" in line
