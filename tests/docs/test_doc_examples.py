"""The documentation's examples run as written: each configuration a page shows is loaded
by the relay's own loader and its adapters are built, as `outbox-relay run` would."""

from __future__ import annotations

from pathlib import Path

import pytest

from outbox_relay import config as config_module
from outbox_relay.assembly import build_adapters
from tests.support.cli import run_cli
from tests.support.docs import code_blocks, page, section

ENV = {"DATABASE_URL": "postgresql://app@db.internal/shop", "AUDIT_TOKEN": "t0ken"}


def _load(yaml_text: str, env: dict[str, str] = ENV) -> config_module.Config:
    cfg = config_module.parse(yaml_text, source="relay.yaml", env=env)
    build_adapters(cfg)  # every broker block's options are valid for its adapter
    return cfg


def test_the_configuration_reference_example_runs_as_written() -> None:
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
