"""A RabbitMQ broker with several addresses (`urls`: the nodes of a cluster), through
the real CLI: `check` connects through the first address that answers, and when none
does says so in one line that names each address and no password. Failing over while
the relay runs is tested against a real 3-node cluster (tests/clusters)."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlsplit

from outbox_relay.demo.local_postgres import free_port
from tests.support.cli import run_cli
from tests.support.configs import write_config

SECRET = "n0t-4-l0g"


def _check(db: str, tmp_path: Path, urls: list[str]) -> tuple[int, str]:
    brokers = {"mail": {"type": "rabbitmq", "urls": urls, "connect_timeout": "5s"}}
    config = write_config(tmp_path / "relay.yaml", db, brokers=brokers, routes=[{"topic": "*", "broker": "mail"}])
    checked = run_cli("check", "--config", str(config))
    return checked.returncode, checked.stdout + checked.stderr


def test_check_connects_through_the_next_address_when_the_first_refuses(db: str, amqp_url: str, tmp_path: Path) -> None:
    dead = f"amqp://relay:{SECRET}@127.0.0.1:{free_port()}/%2F"
    code, output = _check(db, tmp_path, [dead, amqp_url])
    assert code == 0, output
    assert "broker    ok  mail (rabbitmq)" in output
    assert SECRET not in output


def test_check_names_every_address_that_failed_and_no_password(db: str, amqp_url: str, tmp_path: Path) -> None:
    ports = [free_port(), free_port()]
    # The second refuses the login: a reason from the broker itself, with the password sent.
    refused = amqp_url.replace(f"//{urlsplit(amqp_url).netloc.split('@')[0]}@", f"//guest:{SECRET}@")
    urls = [f"amqp://relay:{SECRET}@127.0.0.1:{ports[0]}/%2F", refused, f"amqps://relay:{SECRET}@127.0.0.1:{ports[1]}/"]
    code, output = _check(db, tmp_path, urls)
    assert code == 1, output
    (line,) = [line for line in output.splitlines() if line.startswith("broker    FAIL")]
    assert "mail (rabbitmq): cannot connect to RabbitMQ at any of its 3 addresses: " in line
    where = urlsplit(refused)
    for address in (f"127.0.0.1:{ports[0]}", f"{where.hostname}:{where.port}", f"127.0.0.1:{ports[1]}"):
        assert f"{address}: " in line, line
    assert SECRET not in output
