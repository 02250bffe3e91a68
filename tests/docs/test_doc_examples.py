"""The documentation's examples run as written: each configuration a page shows is loaded
by the relay's own loader and its adapters are built, as `outbox-relay run` would."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
from collections.abc import Callable
from pathlib import Path

import psycopg
import pytest

from outbox_relay import config as config_module
from outbox_relay.assembly import build_adapters
from tests.support import outbox
from tests.support.cli import exe, run_cli
from tests.support.docs import code_blocks, page, section
from tests.support.waiting import wait_for

ENV = {"DATABASE_URL": "postgresql://app@db.internal/shop", "AUDIT_TOKEN": "t0ken"}


def _load(yaml_text: str, env: dict[str, str] = ENV) -> config_module.Config:
    cfg = config_module.parse(yaml_text, source="relay.yaml", env=env)
    build_adapters(cfg)  # every broker block's options are valid for its adapter
    return cfg


def test_the_configuration_reference_example_loads_as_written() -> None:
    (example,) = code_blocks(page("reference/configuration.md"), "yaml")
    cfg = _load(example)
    assert set(cfg.brokers) == {"events", "audit"}
    assert [route.broker for route in cfg.routes] == ["events", "audit"]


def _quick_start(name: str) -> str:
    return code_blocks(section(page(name), "## Quick start"), "yaml")[0]


@pytest.mark.parametrize(
    ("name", "broker", "kind"), [("how-to/kafka.md", "kafka", "kafka"), ("how-to/rabbitmq.md", "rabbit", "rabbitmq")]
)
def test_each_quick_start_has_brokers_and_routes_together(name: str, broker: str, kind: str) -> None:
    cfg = _load(_quick_start(name))
    assert {key: block.type for key, block in cfg.brokers.items()} == {broker: kind}
    assert len(cfg.routes) == 2 and all(route.broker == broker for route in cfg.routes)


def _check(tmp_path: Path, name: str, env: dict[str, str]) -> str:
    config = tmp_path / "relay.yaml"
    config.write_text(_quick_start(name))
    result = run_cli("check", "--config", str(config), env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def test_the_kafka_quick_start_checks_out_against_a_real_broker(tmp_path: Path, db: str, kafka_bootstrap: str) -> None:
    out = _check(tmp_path, "how-to/kafka.md", {"DATABASE_URL": db, "KAFKA_BOOTSTRAP": kafka_bootstrap})
    assert "broker    ok  kafka (kafka)" in out


def test_the_rabbitmq_quick_start_checks_out_against_a_real_broker(tmp_path: Path, db: str, amqp_url: str) -> None:
    out = _check(tmp_path, "how-to/rabbitmq.md", {"DATABASE_URL": db, "AMQP_URL": amqp_url})
    assert "broker    ok  rabbit (rabbitmq)" in out


def _same_but_ids_and_times(text: str) -> str:
    text = re.sub(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", "<id>", text)
    text = re.sub(r"\d{4}-\d\d-\d\dT[\d:.]+(\+00:00|Z)", "<time>", text)
    text = re.sub(r"\b\d+(\.\d+)?(ms|s|m|h)\b", "<age>", text)
    return "\n".join(" ".join(line.split()) for line in text.strip().splitlines())


def _run_until(config: Path, env: dict[str, str], done: Callable[[], bool]) -> str:
    """`outbox-relay run` until `done()`, stopped as Ctrl-C stops it; its standard output."""
    proc = subprocess.Popen(
        [*exe(), "run", "--config", str(config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env={**os.environ, **env},
    )
    try:
        wait_for(done, 30, "the relay published what it could")
    finally:
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0
    return out


def test_the_first_relay_tutorial_shows_what_the_commands_print(tmp_path: Path, db: str) -> None:
    text = page("tutorials/first-relay.md")
    step = {n: section(text, heading) for n, heading in enumerate(re.findall(r"^## \d\..*$", text, re.M), 1)}
    env = {"DATABASE_URL": db}
    config = tmp_path / "relay.yaml"
    # As written, plus a free health port: other relays may run beside this test.
    config.write_text("http: {port: 0}\n" + code_blocks(step[2], "yaml")[0])
    with psycopg.connect(db, autocommit=True) as conn:
        conn.execute(code_blocks(step[3], "sql")[0].encode())
    expected = [block for block in code_blocks(text, "") if block.startswith("schema outbox")]

    before = run_cli("status", "--config", str(config), env=env)
    assert _same_but_ids_and_times(before.stdout) == _same_but_ids_and_times(expected[0])

    published = _run_until(config, env, lambda: outbox.dispatched(db) == 2 and len(outbox.dead_letters(db)) == 1)
    assert [json.loads(line)["topic"] for line in published.splitlines()] == ["orders.created", "orders.paid"]
    (shown,) = [block for block in code_blocks(step[4], "") if block.startswith("{")]
    assert _same_but_ids_and_times(published) == _same_but_ids_and_times(shown)

    after = run_cli("status", "--config", str(config), env=env)
    assert _same_but_ids_and_times(after.stdout) == _same_but_ids_and_times(expected[1])
    listed = run_cli("dead-letters", "list", "--config", str(config), env=env)
    (shown,) = [block for block in code_blocks(step[5], "") if re.match(r"[0-9a-f]{8}-", block)]
    assert _same_but_ids_and_times(listed.stdout) == _same_but_ids_and_times(shown)

    with config.open("a") as file:
        file.write(code_blocks(step[5], "yaml")[0])
    requeued = run_cli("dead-letters", "requeue", "--config", str(config), "--all", env=env)
    assert requeued.stdout.strip() == "requeued 1 message(s)"
    published = _run_until(config, env, lambda: outbox.dispatched(db) == 3)
    assert [json.loads(line)["topic"] for line in published.splitlines()] == ["billing.invoiced"]
